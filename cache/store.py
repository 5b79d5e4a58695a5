"""The cache's on-disk layout: one zarr format 3 group per episode, committed atomically.

    <cache_dir>/manifest.json                       what produced the cache (see manifest.py)
    <cache_dir>/<task>/episode_<i>/                 zarr v3 group, attrs = provenance
        features [T, D]   float32 (or float16)      fused observation per aligned step
        actions  [T, A]   float32                   action taken at that step
        steps    [T]      int64                     source step ids (step_XXXX)

Why per-episode groups rather than one concatenated replay buffer: an episode is the unit
of work and of staleness, and a group written under a temporary name and renamed into place
is committed atomically by the file system (rename within one directory). A crash leaves
each episode complete or absent; a rerun sees exactly which are missing. Training still
gets contiguous arrays: the reader concatenates a group's episodes once at load time.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from dprgb.errors import DprgbError
from dprgb.naming import episode_index

SCHEMA_VERSION = 1
PARTIAL_PREFIX = ".partial-"
TRASH_PREFIX = ".trash-"


@dataclass
class EpisodeRecord:
    task: str
    episode: int
    steps: np.ndarray  # (T,) int64 source step ids
    features: np.ndarray  # (T, D)
    actions: np.ndarray  # (T, A) float32
    attrs: dict  # provenance: source identity, encoder fingerprint, frames, created


def episode_path(cache_dir: Path, task: str, episode: int) -> Path:
    return Path(cache_dir) / task / f"episode_{episode}"


def cached_episodes(cache_dir: Path, task: str) -> dict[int, Path]:
    """Committed episodes of a task (temporary and trashed folders are not episodes)."""
    task_dir = Path(cache_dir) / task
    if not task_dir.is_dir():
        return {}
    found = {}
    for path in task_dir.iterdir():
        index = episode_index(path.name)
        if index is not None and not path.name.startswith("."):
            found[index] = path
    return dict(sorted(found.items()))


def cached_tasks(cache_dir: Path) -> list[str]:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def write_episode(
    cache_dir: Path,
    task: str,
    episode: int,
    steps: np.ndarray,
    features: np.ndarray,
    actions: np.ndarray,
    attrs: dict,
) -> Path:
    """Write under a temporary name, then rename into place: complete or absent."""
    assert len(steps) == len(features) == len(actions)
    final = episode_path(cache_dir, task, episode)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f"{PARTIAL_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(LocalStore(partial), mode="w", zarr_format=3, attributes=attrs)
    for name, data in (("features", features), ("actions", actions), ("steps", steps)):
        # One chunk per array: an episode is small ([T, D]) and always read whole.
        group.create_array(name, data=np.ascontiguousarray(data), chunks=data.shape)
    if final.exists():  # overwrite: move the old one aside first; never a half-replaced episode
        trash = final.parent / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(partial, final)
        shutil.rmtree(trash)
    else:
        os.rename(partial, final)
    return final


def read_episode(path: Path, task: str | None = None) -> EpisodeRecord:
    try:
        group = zarr.open_group(LocalStore(path, read_only=True), mode="r")
        return EpisodeRecord(
            task=task or path.parent.name,
            episode=int(group.attrs["episode"]),
            steps=group["steps"][:],
            features=group["features"][:],
            actions=group["actions"][:],
            attrs=dict(group.attrs),
        )
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise DprgbError(f"not a dprgb cache episode ({err})", path=path) from None


def read_episode_attrs(path: Path) -> dict:
    """Provenance only (no array data)."""
    try:
        return dict(zarr.open_group(LocalStore(path, read_only=True), mode="r").attrs)
    except (FileNotFoundError, ValueError) as err:
        raise DprgbError(f"not a dprgb cache episode ({err})", path=path) from None


def remove_leftovers(cache_dir: Path) -> int:
    """Delete temporary folders left by a crash (they were never committed)."""
    removed = 0
    for task in cached_tasks(cache_dir):
        for path in (Path(cache_dir) / task).iterdir():
            if path.name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    return removed


def remove_episode(cache_dir: Path, task: str, episode: int) -> None:
    path = episode_path(cache_dir, task, episode)
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash)
