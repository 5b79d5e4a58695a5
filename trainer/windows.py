"""Training windows over a concatenated group, computed once as a row-index matrix.

The semantics are those of diffusion_policy's `SequenceSampler` (`common/sampler.py`):
a window of `horizon` rows of episode e starts at `start - pad_before` for every
`start` in `[0, L - horizon + pad_before + pad_after]` (L = episode length); rows that
fall outside the episode are replaced by the episode's first or last row (edge
replication), never by a neighbouring episode's rows. Here that becomes one int64 matrix
`rows` (W, H) of clamped absolute row numbers, built once with numpy and kept on the
device, so a batch is `features[rows[ids]]`: one gather, no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dprgb.errors import DprgbError


def _check_episode_ends(episode_ends: np.ndarray) -> np.ndarray:
    ends = np.asarray(episode_ends, dtype=np.int64)
    assert ends.ndim == 1, f"episode_ends must be 1-D, got shape {ends.shape}"
    assert np.all(np.diff(ends, prepend=0) >= 0), "episode_ends must be non-decreasing from 0"
    return ends


def windows_per_episode(episode_ends: np.ndarray, horizon: int, pad_before: int = 0,
                        pad_after: int = 0) -> np.ndarray:
    """(E,) number of windows of each episode (0 for episodes too short for any window)."""
    ends = _check_episode_ends(episode_ends)
    assert horizon > 0 and pad_before >= 0 and pad_after >= 0, (horizon, pad_before, pad_after)
    lengths = np.diff(ends, prepend=0)
    return np.maximum(lengths - horizon + pad_before + pad_after + 1, 0) * (lengths > 0)


def window_episodes(episode_ends: np.ndarray, horizon: int, pad_before: int = 0,
                    pad_after: int = 0) -> np.ndarray:
    """(W,) int64 episode id of each window, in the order of `window_starts`."""
    counts = windows_per_episode(episode_ends, horizon, pad_before, pad_after)
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


def window_starts(episode_ends: np.ndarray, horizon: int, pad_before: int = 0,
                  pad_after: int = 0) -> np.ndarray:
    """(W,) int64 absolute row where each window starts before padding is applied.

    May lie up to `pad_before` rows before its episode's first row; the window's last
    unpadded row lies at most `pad_after` rows after the episode's last row. Windows are
    ordered by episode, then by start.
    """
    ends = _check_episode_ends(episode_ends)
    counts = windows_per_episode(ends, horizon, pad_before, pad_after)
    first = np.concatenate([[0], ends[:-1]]) - pad_before  # (E,) start of each episode's window 0
    first_window = np.cumsum(counts) - counts  # (E,) index of each episode's window 0
    offsets = np.arange(counts.sum(), dtype=np.int64) - np.repeat(first_window, counts)
    starts = np.repeat(first, counts) + offsets
    # invariants: inside the padded episode range, strictly increasing within an episode
    ep = np.repeat(np.arange(len(ends)), counts)
    ep_start = np.concatenate([[0], ends[:-1]])[ep]
    assert np.all(starts >= ep_start - pad_before)
    assert np.all(starts + horizon <= ends[ep] + pad_after)
    assert np.all(np.diff(starts)[ep[1:] == ep[:-1]] == 1)
    return starts


def window_rows(episode_ends: np.ndarray, horizon: int, pad_before: int = 0,
                pad_after: int = 0) -> np.ndarray:
    """(W, horizon) int64 absolute rows of every window, clamped to the window's own episode."""
    ends = _check_episode_ends(episode_ends)
    starts = window_starts(ends, horizon, pad_before, pad_after)  # (W,)
    ep = window_episodes(ends, horizon, pad_before, pad_after)  # (W,)
    lo = np.concatenate([[0], ends[:-1]])[ep]  # (W,) first row of the episode
    hi = ends[ep] - 1  # (W,) last row of the episode
    rows = starts[:, None] + np.arange(horizon, dtype=np.int64)[None, :]  # (W, H)
    rows = np.clip(rows, lo[:, None], hi[:, None])
    assert rows.shape == (len(starts), horizon)
    assert np.all((rows >= lo[:, None]) & (rows <= hi[:, None])), "window crosses an episode"
    return rows


def gather_windows(features: torch.Tensor, actions: torch.Tensor, rows: torch.Tensor,
                   window_ids: torch.Tensor, n_obs_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a batch of windows out of the device-resident group.

    features (N, D), actions (N, A), rows (W, H) from `window_rows` (same device),
    window_ids (B,) -> obs (B, To, D) = the first To rows of each window, action (B, H, A).
    """
    idx = rows[window_ids]  # (B, H)
    return features[idx[:, :n_obs_steps]], actions[idx]


def split_episodes(episode_task: np.ndarray, episode_index: np.ndarray,
                   val_per_task: int) -> np.ndarray:
    """(E,) bool train mask: the last `val_per_task` episodes (by source episode index) of
    every task are held out; a task with `val_per_task` episodes or fewer keeps all of them
    for training."""
    train_mask = np.ones(len(episode_task), dtype=bool)
    if val_per_task > 0:
        for task in np.unique(episode_task):
            eps = np.flatnonzero(episode_task == task)
            if len(eps) > val_per_task:
                order = eps[np.argsort(episode_index[eps], kind="stable")]
                train_mask[order[-val_per_task:]] = False
    return train_mask


@dataclass
class WindowIndex:
    """Every window of a group and the train/held-out split, computed once.

    Episode e is rows `episode_ends[e-1]:episode_ends[e]`. A window is `horizon` rows with
    `n_obs_steps - 1` padding rows before and `n_action_steps - 1` after (edge replication):
    the executed actions of the first window start at the episode's first step.
    """

    rows: np.ndarray  # (W, H) int64 absolute rows of every window
    window_episode: np.ndarray  # (W,) int64 episode of each window
    train_ids: np.ndarray  # (W_train,) windows of training episodes
    val_ids: np.ndarray  # (W_val,) windows of held-out episodes
    pads: tuple[int, int, int]  # (horizon, pad_before, pad_after): window_rows' arguments

    @classmethod
    def build(cls, episode_ends: np.ndarray, train_mask: np.ndarray, horizon: int,
              n_obs_steps: int, n_action_steps: int, *, for_training: bool = True) -> WindowIndex:
        pads = (horizon, n_obs_steps - 1, n_action_steps - 1)
        window_episode = window_episodes(episode_ends, *pads)
        is_train = train_mask[window_episode]
        if for_training and not is_train.any():
            lengths = np.diff(episode_ends, prepend=0)
            raise DprgbError(
                f"no training window: every training episode is shorter than a window "
                f"(horizon {horizon} with {pads[1]} + {pads[2]} padding rows); episode "
                f"lengths {sorted(set(lengths.tolist()))[:10]}"
            )
        return cls(window_rows(episode_ends, *pads), window_episode, np.flatnonzero(is_train),
                   np.flatnonzero(~is_train), pads)

    def episode_rows(self, length: int) -> np.ndarray:
        """(W_e, H) windows of one episode of `length` rows, as rows 0 .. length - 1."""
        return window_rows(np.array([length]), *self.pads)

    def windows_of(self, episodes: np.ndarray, among: np.ndarray) -> np.ndarray:
        """The ids in `among` whose window belongs to one of `episodes`."""
        return among[np.isin(self.window_episode[among], episodes)]
