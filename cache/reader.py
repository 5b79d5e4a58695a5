"""Reading the fused-feature cache: a group's tasks as contiguous arrays."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dprgb.cache.manifest import read_manifest
from dprgb.cache.store import EpisodeRecord, cached_episodes, cached_tasks, read_episode
from dprgb.config import resolve_config
from dprgb.errors import DprgbError


@dataclass
class CachedGroup:
    """A group's episodes, concatenated in the style of the diffusion_policy replay buffer.

    Episode e occupies rows `episode_ends[e-1]:episode_ends[e]` (0 for e = 0) of
    `features` and `actions`.
    """

    tasks: list[str]  # task names; a task id indexes this list
    features: np.ndarray  # (N, D) float32, fused observation vector per step
    actions: np.ndarray  # (N, A) float32, the action taken at that step
    episode_ends: np.ndarray  # (E,) int64, exclusive end row of each episode
    episode_task: np.ndarray  # (E,) int64, task id of each episode
    episode_index: np.ndarray  # (E,) int64, source episode number within its task
    fingerprint: str  # encoder fingerprint of the cache the arrays came from
    action_layouts: dict[str, dict]  # task -> how its action vector was built (arms, dofs, ...)

    @property
    def obs_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)


class Cache:
    """A fused-feature cache on disk (read-only view). `open_cache` makes one."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise DprgbError("no dprgb cache here (no manifest.json): run `dprgb precompute`", path=cache_dir)
        self.manifest = manifest

    @property
    def fingerprint(self) -> str:
        return self.manifest["encoder"]["fingerprint"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def tasks(self) -> list[str]:
        return [t for t in cached_tasks(self.cache_dir) if cached_episodes(self.cache_dir, t)]

    def episode_paths(self, task: str) -> dict[int, Path]:
        return cached_episodes(self.cache_dir, task)

    def episodes(self, tasks: list[str] | None = None,
                 only: dict[str, list[int]] | None = None) -> Iterator[EpisodeRecord]:
        """Every committed episode (or, for a task in `only`, those episodes): records with
        task, episode, steps, features, actions. Each is verified against its digests
        (store.py); a damaged one raises DprgbError."""
        for task in tasks or self.tasks():
            for episode, path in self.episode_paths(task).items():
                if only is None or task not in only or episode in only[task]:
                    yield read_episode(path, task)

    def damaged(self, tasks: list[str] | None = None) -> dict[str, list[dict]]:
        """task -> [{"episode", "path", "problem"}] for every committed episode that fails
        verification (reads every array: `dprgb inspect cache --verify`)."""
        report: dict[str, list[dict]] = {}
        for task in tasks or self.tasks():
            rows = report.setdefault(task, [])
            for episode, path in self.episode_paths(task).items():
                try:
                    read_episode(path, task)
                except DprgbError as err:
                    rows.append({"episode": episode, "path": str(path), "problem": err.problem})
        return report

    def load_group(self, tasks: list[str], only: dict[str, list[int]] | None = None) -> CachedGroup:
        """The tasks' episodes (for a task in `only`, those episodes) as contiguous arrays
        (one read per episode, one concatenate); refuses a damaged episode with one line
        naming its folder and the array."""
        records = []
        for task in tasks:
            if not self.episode_paths(task) or task not in self.manifest["tasks"]:
                raise DprgbError(
                    f"task {task!r} has no cached episodes: run `dprgb precompute`", path=self.cache_dir
                )
            records.extend(self.episodes([task], only))
        dims = {r.actions.shape[1] for r in records}
        if len(dims) > 1:
            by_task = {r.task: r.actions.shape[1] for r in records}
            raise DprgbError(f"one group cannot mix action dims: {by_task}", path=self.cache_dir)
        lengths = np.array([len(r.steps) for r in records], dtype=np.int64)
        return CachedGroup(
            tasks=list(tasks),
            features=np.concatenate([r.features for r in records]).astype(np.float32, copy=False),
            actions=np.concatenate([r.actions for r in records]).astype(np.float32, copy=False),
            episode_ends=np.cumsum(lengths),
            episode_task=np.array([tasks.index(r.task) for r in records], dtype=np.int64),
            episode_index=np.array([r.episode for r in records], dtype=np.int64),
            fingerprint=self.fingerprint,
            action_layouts={task: self.manifest["tasks"][task]["action_layout"] for task in tasks},
        )


def open_cache(cache_dir_or_config: str | Path) -> Cache:
    """`open_cache("cache/")` or `open_cache("dprgb.yaml")` (its `cache_dir`)."""
    path = Path(cache_dir_or_config)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        settings = resolve_config(path)
        if not settings.get("cache_dir"):
            raise DprgbError("config has no cache_dir", path=path)
        path = Path(settings["cache_dir"])
    return Cache(path)
