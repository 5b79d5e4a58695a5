"""The configs of everything before the training: the data, the encoder, the precompute.

Each is a `dprgb.config.Config`: built from the resolved YAML/CLI mapping, typed, validated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dprgb.config import Config, coerce, parsed
from dprgb.embodiment import ACTION_TYPES
from dprgb.errors import DprgbError
from dprgb.naming import SLOT_POLICIES, backbone_from_root, default_slot_policy

ACTION_SOURCES = ("auto", "hdf5", "pkl")
CACHE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class FeatureRoot:
    backbone: str
    path: Path


# What rgb_zarr_roots may be written as: one root, {backbone: path, ...}, or a list of roots
# (each a path, {backbone: path} or {backbone, path}; FeatureRoot objects from Python).
ROOT_FORMS = str | Path | dict[str, Any] | list[str | Path | dict[str, Any] | FeatureRoot]


@dataclass
class DataConfig(Config):
    """Where the data is and how actions are built from it."""

    rgb_zarr_roots: list[FeatureRoot] = parsed(  # (no default: from_mapping insists on it)
        lambda value: parse_roots(value), ROOT_FORMS,
        "a list of feature-root folders (each a path, {backbone: path} or {backbone, path})",
        "a feature-root folder: a path, {backbone: path} or {backbone, path}")
    traj_root: Path
    tasks: list[str] | None = parsed(  # None: every task found under the first feature root
        lambda value: parse_tasks(value), str | list[str] | None,
        "a list of task names (or one string of names separated by commas or spaces)", default=None)
    use_left_arm: bool = True
    use_right_arm: bool = True
    fuse_arms: bool = True  # False: keep only the arm that moves most in the task
    include_gripper: bool = True
    action_source: str = "auto"  # auto prefers HDF5 (the exact per-frame source)
    action_offset: int = 1  # action[t] = target[t + action_offset] (RoboTwin DP)
    action_type: str = "joint"  # what an arm's action is: dprgb.embodiment.ACTION_TYPES
    slot_policy: dict[str, str] = field(default_factory=dict)  # backbone -> causal | any
    resample_segments: bool = False  # opt in to resampling planner segments onto frames
    expert_data_num: int = 0  # use the first N episodes of each task, by episode number (0 = all)

    def validate(self) -> None:
        if not self.rgb_zarr_roots:
            raise DprgbError("no feature roots: set rgb_zarr_roots in the config (use --config FILE)")
        names = [root.backbone for root in self.rgb_zarr_roots]
        if len(set(names)) != len(names):
            raise DprgbError(f"two feature roots name the same backbone: {names=}")
        if self.action_source not in ACTION_SOURCES:
            raise DprgbError(f"{self.action_source=} must be one of {ACTION_SOURCES}")
        if self.action_offset < 0:
            raise DprgbError(f"{self.action_offset=} must be >= 0")
        if self.action_type not in ACTION_TYPES:
            raise DprgbError(f"{self.action_type=} must be one of {tuple(ACTION_TYPES)}")
        if self.expert_data_num < 0:
            raise DprgbError(f"{self.expert_data_num=} must be >= 0 (0 = every episode)")
        if not (self.use_left_arm or self.use_right_arm):
            raise DprgbError("use_left_arm and use_right_arm are both false: no action left")
        for backbone, policy in self.slot_policy.items():
            if policy not in SLOT_POLICIES:
                raise DprgbError(f"slot_policy for {backbone}: {policy!r} not in {SLOT_POLICIES}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> DataConfig:
        if "rgb_zarr_roots" not in mapping or "traj_root" not in mapping:
            raise DprgbError("the config needs rgb_zarr_roots and traj_root (use --config FILE)")
        return super().from_mapping(mapping)

    def slot_policy_for(self, backbone: str) -> str:
        return self.slot_policy.get(backbone, default_slot_policy(backbone))

    def arm_settings(self) -> dict:
        return {
            "use_left_arm": self.use_left_arm,
            "use_right_arm": self.use_right_arm,
            "fuse_arms": self.fuse_arms,
            "include_gripper": self.include_gripper,
            "action_offset": self.action_offset,
            # absent means joint actions, so caches made before action types existed stay fresh
            **({"action_type": self.action_type} if self.action_type != "joint" else {}),
        }

    def options(self) -> dict:
        """The data settings that change cached features or actions (the data fingerprint)."""
        backbones = [root.backbone for root in self.rgb_zarr_roots]
        return {
            "backbones": backbones,
            "slot_policy": {name: self.slot_policy_for(name) for name in backbones},
            "resample_segments": self.resample_segments,
            **self.arm_settings(),
        }


def parse_tasks(value: str | list[str] | None) -> list[str] | None:
    """Task names from a list, or from one string of names separated by commas or spaces."""
    if isinstance(value, str):
        return [t for t in value.replace(",", " ").split() if t]
    return None if value is None else list(value)


def parse_roots(entries: Any) -> list[FeatureRoot]:
    """Entries are a path (backbone from `features_<name>_...`), `{backbone, path}`, or
    `{name: path}`."""
    if isinstance(entries, (str, Path)) or (isinstance(entries, dict) and "path" in entries):
        entries = [entries]
    if isinstance(entries, dict):
        entries = [{k: v} for k, v in entries.items()]  # {backbone: path} pairs
    roots = []
    for i, entry in enumerate(entries):
        if isinstance(entry, FeatureRoot):
            roots.append(entry)
        elif isinstance(entry, (str, Path)):
            roots.append(FeatureRoot(_backbone_of(entry), Path(entry)))
        elif isinstance(entry, dict) and "path" in entry:
            path = coerce(f"rgb_zarr_roots[{i}].path", entry["path"], Path)
            backbone = coerce(f"rgb_zarr_roots[{i}].backbone", entry.get("backbone"), str | None)
            roots.append(FeatureRoot(backbone or _backbone_of(path), path))
        elif isinstance(entry, dict) and len(entry) == 1:
            ((backbone, path),) = entry.items()
            roots.append(FeatureRoot(str(backbone), coerce(f"rgb_zarr_roots[{i}].{backbone}", path, Path)))
        else:
            raise DprgbError(f"rgb_zarr_roots entry {entry!r} is neither a path nor {{backbone, path}}")
    return roots


def _backbone_of(root: str | Path) -> str:
    backbone = backbone_from_root(root)
    if backbone is None:
        raise DprgbError(
            "cannot tell the backbone from the directory name; name it in the config "
            "(rgb_zarr_roots: [{backbone: vggt, path: ...}])",
            path=root,
        )
    return backbone


@dataclass
class EncoderConfig(Config):
    """The frozen frame encoder precompute runs and finetune starts from."""

    # "reference", "pooled", "spatial", an RGB2PC checkpoint, TorchScript, module:factory. From
    # camera pixels without a trained RGB2PC, use "spatial": it keeps where things are, which the
    # reference encoder's statistics lose (README "From pixels" has the closed-loop numbers).
    encoder: str = "reference"
    encoder_weights: str | None = None  # state dict for a plugin / the reference encoder
    encoder_options: dict[str, Any] = field(default_factory=dict)  # e.g. {nhead: 20}
    encoder_amp: bool = False  # bf16 autocast for the encoder on CUDA (changes the features)


@dataclass
class PrecomputeConfig(Config):
    """The cache: where it is, how it is written, whether a stale one may be used."""

    cache_dir: Path = Path("cache")
    cache_dtype: str = "float32"
    batch_frames: int = 32  # frames per encoder call
    precompute_workers: int = 0  # parallel episodes; 0: one per core
    scheduler: str | None = None  # None: threads; "local": LocalCluster; else an address
    allow_stale_cache: bool = False  # train/eval on a cache that no longer matches its inputs

    def validate(self) -> None:
        if self.cache_dtype not in CACHE_DTYPES:
            raise DprgbError(f"{self.cache_dtype=} must be one of {CACHE_DTYPES}")
        if self.batch_frames < 1 or self.precompute_workers < 0:
            raise DprgbError(
                f"need batch_frames >= 1 and precompute_workers >= 0: {self.batch_frames=} "
                f"{self.precompute_workers=}"
            )

    @property
    def parallel_episodes(self) -> int:
        return self.precompute_workers or os.cpu_count() or 1
