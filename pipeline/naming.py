"""Task and episode names (FORMATS.md section 1).

Task: `<base>-<config>-<n>_<camera>`, e.g. `beat_block_hammer-demo_randomized-20_head_camera`.
Episodes are `episode_0` in feature stores and `episode0` in trajectories: map by the integer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dprgb.pipeline.errors import DprgbError

_TASK_RE = re.compile(r"^(?P<base>[^-]+)-(?P<config>[^-]+)-(?P<n>\d+)_(?P<camera>.+)$")
_EPISODE_RE = re.compile(r"^episode_?(?P<index>\d+)$")
HEAD_CAMERA_SPELLINGS = ("head_camera", "sapien_head_camera")


@dataclass(frozen=True)
class TaskName:
    base: str  # RoboTwin task, e.g. beat_block_hammer
    config: str  # demo_randomized or demo_clean
    n: int  # episode count the data set was labelled with (a label only: count files)
    camera: str  # head_camera, sapien_head_camera, left_camera, ...

    @property
    def is_head_camera(self) -> bool:
        return self.camera in HEAD_CAMERA_SPELLINGS


def parse_task_name(task: str) -> TaskName:
    match = _TASK_RE.match(task)
    if match is None:
        raise DprgbError(
            f"task name {task!r} is not of the form <base>-<config>-<n>_<camera> "
            "(e.g. beat_block_hammer-demo_randomized-20_head_camera)"
        )
    return TaskName(match["base"], match["config"], int(match["n"]), match["camera"])


def episode_index(name: str | Path) -> int | None:
    """The integer of `episode_3`, `episode3`, `episode_3.zarr`, `episode3.hdf5`; else None."""
    stem = Path(name).name.split(".")[0]
    match = _EPISODE_RE.match(stem)
    return None if match is None else int(match["index"])


def step_from_frame_path(frame_path: str) -> int:
    """Frame identity is the image file name: `.../step_0012.png` is step 12."""
    stem = Path(frame_path).stem
    if "step_" not in stem:
        raise ValueError(f"frame path {frame_path!r} has no step_XXXX name")
    return int(stem.split("step_")[-1])


def backbone_from_root(root: str | Path) -> str:
    """`features_croco_v2_encoder_dict_unified_zarr` -> `croco` (the word after `features_`)."""
    name = Path(root).name
    if not name.startswith("features_") or len(name.split("_")) < 2:
        raise DprgbError(
            "cannot tell the backbone from the directory name; name it in the config "
            "(rgb_zarr_roots: [{backbone: vggt, path: ...}])",
            path=root,
        )
    return name.split("_")[1]
