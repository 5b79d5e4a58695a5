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

import numpy as np
import torch


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
