"""Reading the fused-feature cache: a group's tasks as contiguous arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    action_layout: dict  # how the action vector was built (arms, dofs, gripper, offset)

    @property
    def obs_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)
