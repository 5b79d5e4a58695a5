"""The YAML configuration: one file of defaults plus named groups; flags override it.

    rgb_zarr_roots: [data/features_croco_encoder_dict_unified_zarr, ...]
    traj_root: data/trajectories
    epochs: 100
    groups:
      arm7: {tasks: [shake_bottle-demo_clean-20_head_camera], epochs: 200}

A group's keys override the top-level ones, command-line flags override both. YAML
anchors do not cross files, so inheritance across files is spelled `extends: base.yaml`
(resolved relative to the extending file, which wins). Relative paths in a file are
relative to that file. Each command builds its own dataclass from the merged mapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dprgb.pipeline.errors import DprgbError
from dprgb.pipeline.naming import backbone_from_root

# Keys whose values are paths, resolved relative to the file that names them.
PATH_KEYS = ("traj_root", "cache_dir", "save_dir")
# Backbones whose 8 window copies of a frame are identical (per-frame models): any copy will do.
PER_FRAME_BACKBONES = ("croco", "dinov3")
SLOT_POLICIES = ("causal", "any")
ACTION_SOURCES = ("auto", "hdf5", "pkl")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise DprgbError(f"cannot read config: {err.strerror}", path=path) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise DprgbError(f"not valid YAML: {' '.join(str(err).split())}", path=path) from None
    if not isinstance(data, dict):
        raise DprgbError("config must be a mapping of keys to values", path=path)
    return data


def _resolve_paths(mapping: dict, base_dir: Path) -> dict:
    out = dict(mapping)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str((base_dir / out[key]).resolve())
    roots = out.get("rgb_zarr_roots")
    if isinstance(roots, (str, dict)):
        roots = [roots] if isinstance(roots, str) or "path" in roots else [{k: v} for k, v in roots.items()]
    if isinstance(roots, list):
        out["rgb_zarr_roots"] = [_resolve_root_entry(entry, base_dir) for entry in roots]
    encoder = out.get("encoder")
    if isinstance(encoder, str) and encoder.endswith((".pt", ".pth", ".ts")):
        out["encoder"] = str((base_dir / encoder).resolve())
    if isinstance(out.get("groups"), dict):
        out["groups"] = {name: _resolve_paths(group or {}, base_dir) for name, group in out["groups"].items()}
    return out


def _resolve_root_entry(entry: Any, base_dir: Path) -> Any:
    if isinstance(entry, str):
        return str((base_dir / entry).resolve())
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return {**entry, "path": str((base_dir / entry["path"]).resolve())}
    if isinstance(entry, dict) and len(entry) == 1:  # {backbone: path}
        ((backbone, path),) = entry.items()
        return {"backbone": backbone, "path": str((base_dir / str(path)).resolve())}
    return entry


def load_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with paths resolved and `extends:` applied."""
    path = Path(path).resolve()
    if path in _seen:
        raise DprgbError("config `extends` chain loops back to itself", path=path)
    data = _resolve_paths(_read_yaml(path), path.parent)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = load_config_file(path.parent / parent, (*_seen, path))
    groups = {**base.get("groups", {}), **data.get("groups", {})}
    merged = {**base, **data}
    if groups:
        merged["groups"] = groups
    return merged


def resolve_config(
    path: str | Path | None,
    group: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict:
    """Defaults, then the named group's keys, then flags (None-valued flags are unset)."""
    data = load_config_file(path) if path is not None else {}
    groups = data.pop("groups", {}) or {}
    merged = dict(data)
    if group is not None and group in groups:
        merged.update(groups[group] or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    merged["groups"] = groups
    merged["group"] = group
    return merged


def check_known_keys(mapping: Mapping[str, Any], *config_types: type, source: str = "") -> None:
    """Refuse keys no command knows: a typo must not silently fall back to a default."""
    known = {"groups", "group", "extends"}
    for config_type in config_types:
        known.update(f.name for f in dataclasses.fields(config_type))
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise DprgbError(f"unknown config key(s) {', '.join(unknown)}", path=source or None)


def fields_of(config_type: type, mapping: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(config_type)}
    return {k: v for k, v in mapping.items() if k in names}


@dataclass(frozen=True)
class FeatureRoot:
    backbone: str
    path: Path


@dataclass
class DataConfig:
    """Where the data is and how actions are built from it."""

    rgb_zarr_roots: list[FeatureRoot]
    traj_root: Path
    tasks: list[str] | None = None  # None: every task found under the first feature root
    use_left_arm: bool = True
    use_right_arm: bool = True
    fuse_arms: bool = True  # False: keep only the arm that moves most in the task
    include_gripper: bool = True
    action_source: str = "auto"  # auto prefers HDF5 (the exact per-frame source)
    action_offset: int = 1  # action[t] = target[t + action_offset] (RoboTwin DP)
    slot_policy: dict[str, str] = field(default_factory=dict)  # backbone -> causal | any
    resample_segments: bool = False  # opt in to resampling planner segments onto frames

    def __post_init__(self) -> None:
        if not self.rgb_zarr_roots:
            raise DprgbError("no feature roots: set rgb_zarr_roots in the config")
        names = [root.backbone for root in self.rgb_zarr_roots]
        if len(set(names)) != len(names):
            raise DprgbError(f"two feature roots name the same backbone: {names=}")
        if self.action_source not in ACTION_SOURCES:
            raise DprgbError(f"{self.action_source=} must be one of {ACTION_SOURCES}")
        if self.action_offset < 0:
            raise DprgbError(f"{self.action_offset=} must be >= 0")
        if not (self.use_left_arm or self.use_right_arm):
            raise DprgbError("use_left_arm and use_right_arm are both false: no action left")
        for backbone, policy in self.slot_policy.items():
            if policy not in SLOT_POLICIES:
                raise DprgbError(f"slot_policy for {backbone}: {policy!r} not in {SLOT_POLICIES}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> DataConfig:
        values = fields_of(cls, mapping)
        if "rgb_zarr_roots" not in values or "traj_root" not in values:
            raise DprgbError("the config needs rgb_zarr_roots and traj_root (use --config FILE)")
        values["rgb_zarr_roots"] = parse_roots(values["rgb_zarr_roots"])
        values["traj_root"] = Path(values["traj_root"])
        if values.get("tasks") is not None:
            values["tasks"] = list(_as_list(values["tasks"]))
        return cls(**values)

    def slot_policy_for(self, backbone: str) -> str:
        default = "any" if backbone in PER_FRAME_BACKBONES else "causal"
        return self.slot_policy.get(backbone, default)

    def arm_settings(self) -> dict:
        return {
            "use_left_arm": self.use_left_arm,
            "use_right_arm": self.use_right_arm,
            "fuse_arms": self.fuse_arms,
            "include_gripper": self.include_gripper,
            "action_offset": self.action_offset,
        }


def _as_list(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        return [t for t in value.replace(",", " ").split() if t]
    return [str(v) for v in value]


def parse_roots(entries: Any) -> list[FeatureRoot]:
    """Entries are a path (backbone from `features_<name>_...`), `{backbone, path}`, or
    `{name: path}`."""
    if isinstance(entries, (str, Path)):
        entries = [entries]
    if isinstance(entries, dict):
        entries = [{"backbone": k, "path": v} for k, v in entries.items()]
    roots = []
    for entry in entries:
        if isinstance(entry, (str, Path)):
            roots.append(FeatureRoot(backbone_from_root(entry), Path(entry)))
        elif isinstance(entry, dict) and "path" in entry:
            backbone = entry.get("backbone") or backbone_from_root(entry["path"])
            roots.append(FeatureRoot(str(backbone), Path(entry["path"])))
        elif isinstance(entry, dict) and len(entry) == 1:
            ((backbone, path),) = entry.items()
            roots.append(FeatureRoot(str(backbone), Path(path)))
        else:
            raise DprgbError(f"rgb_zarr_roots entry {entry!r} is neither a path nor {{backbone, path}}")
    return roots
