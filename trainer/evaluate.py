"""Offline evaluation of a `final_policy.pt` on its held-out episodes.

For every window start of every held-out episode the policy samples an action chunk from
the window's observations; the executed actions (Ta steps from the latest observation) are
compared with the recorded ones. The baseline predicts the mean training action everywhere,
so `ratio` < 1 means the policy explains more than the average pose.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprgb.cache.reader import CachedGroup
from dprgb.pipeline.errors import DprgbError
from dprgb.trainer.checkpoint import load_policy
from dprgb.trainer.policy import DiffusionRGBPolicy
from dprgb.trainer.train import split_episodes
from dprgb.trainer.windows import window_episodes, window_rows


def held_out_episodes(config: dict[str, Any], group: CachedGroup, path: Path) -> np.ndarray:
    """Group episode ids of the checkpoint's recorded (task, episode) pairs, or the split."""
    if "val_episodes" not in config:
        return split_episodes(group, int(config.get("val_episodes_per_task", 1)))[1]
    by_key = {(group.tasks[int(t)], int(i)): e
              for e, (t, i) in enumerate(zip(group.episode_task, group.episode_index, strict=True))}
    ids = []
    for task, index in config["val_episodes"]:
        if (task, int(index)) not in by_key:
            raise DprgbError(f"held-out episode {index} of task {task} is not in this cache",
                             path=path)
        ids.append(by_key[(task, int(index))])
    return np.asarray(sorted(ids), dtype=np.int64)


@torch.no_grad()
def evaluate(checkpoint: Path, group: CachedGroup, *, plot_dir: Path | None = None,
             num_inference_steps: int | None = None, device: str = "cpu",
             batch_size: int = 256, seed: int = 0) -> dict[str, Any]:
    """Per task: MSE of sampled executed actions vs the recorded ones, and the baseline's."""
    checkpoint = Path(checkpoint)
    ckpt = load_policy(checkpoint)
    config = ckpt["config"]
    policy = DiffusionRGBPolicy(config)
    policy.load_state_dict(ckpt["policy_state"])
    policy.set_normalizer(ckpt["normalizer"])
    policy = policy.to(device).eval()
    fingerprint = config.get("cache_fingerprint")
    if fingerprint is not None and fingerprint != group.fingerprint:
        raise DprgbError(f"the policy was trained on cache {fingerprint}, this cache is "
                         f"{group.fingerprint}", path=checkpoint)
    if (group.obs_dim, group.action_dim) != (policy.obs_dim, policy.action_dim):
        raise DprgbError(f"the policy expects obs_dim {policy.obs_dim}, action_dim "
                         f"{policy.action_dim}; the cache has {group.obs_dim}, {group.action_dim}",
                         path=checkpoint)

    val_eps = held_out_episodes(config, group, checkpoint)
    if "train_action_mean" in config:
        mean_action = torch.tensor(config["train_action_mean"], dtype=torch.float32)
    else:  # older checkpoints: recompute from the training episodes
        train_rows = np.repeat(~np.isin(np.arange(len(group.episode_ends)), val_eps),
                               np.diff(group.episode_ends, prepend=0))
        mean_action = torch.as_tensor(group.actions[train_rows]).float().mean(0)
    mean_action = mean_action.to(device)

    To, Ta = policy.n_obs_steps, policy.n_action_steps
    pads = (policy.horizon, To - 1, Ta - 1)
    rows = torch.as_tensor(window_rows(group.episode_ends, *pads)).to(device)  # (W, H)
    w_episode = window_episodes(group.episode_ends, *pads)  # (W,)
    features = torch.as_tensor(group.features).to(device, torch.float32)  # (N, D)
    actions = torch.as_tensor(group.actions).to(device, torch.float32)  # (N, A)
    generator = torch.Generator(device=device).manual_seed(seed)

    results: dict[str, Any] = {}
    for task_id in np.unique(group.episode_task[val_eps]):
        task = group.tasks[int(task_id)]
        task_eps = val_eps[group.episode_task[val_eps] == task_id]
        ids = torch.as_tensor(np.flatnonzero(np.isin(w_episode, task_eps))).to(device)
        if len(ids) == 0:
            continue  # held-out episodes too short for a single window
        preds = []
        for chunk in ids.split(batch_size):
            obs = features[rows[chunk, :To]]  # (b, To, D)
            out = policy.predict_action({"obs": obs}, num_inference_steps=num_inference_steps,
                                        generator=generator)
            preds.append(out["action"])  # (b, Ta, A)
        pred = torch.cat(preds)  # (W_task, Ta, A)
        truth = actions[rows[ids, To - 1:To - 1 + Ta]]  # (W_task, Ta, A)
        mse_joint = (pred - truth).square().mean((0, 1))  # (A,)
        base_joint = (truth - mean_action).square().mean((0, 1))  # (A,)
        mse, base = mse_joint.mean().item(), base_joint.mean().item()
        results[task] = {
            "mse": mse,
            "baseline_mse": base,
            "ratio": mse / base if base > 0 else float("inf"),
            "mse_per_joint": mse_joint.tolist(),
            "baseline_mse_per_joint": base_joint.tolist(),
            "episodes": [int(group.episode_index[e]) for e in task_eps],
            "windows": len(ids),
        }
        if plot_dir is not None:
            # one episode: at each step, the first executed action vs the recorded one
            first = w_episode[ids.cpu().numpy()] == task_eps[0]
            step_rows = rows[ids[first], To - 1].cpu().numpy()  # (S,) latest-obs row
            start = int(group.episode_starts[task_eps[0]])
            plot_episode(Path(plot_dir) / f"{_safe(task)}.png",
                         steps=step_rows - start,
                         predicted=pred[torch.as_tensor(first, device=pred.device), 0].cpu().numpy(),
                         true=actions[torch.as_tensor(step_rows, device=device)].cpu().numpy(),
                         title=f"{task} episode {int(group.episode_index[task_eps[0]])}")
    return {"tasks": results}


def plot_episode(path: Path, *, steps: np.ndarray, predicted: np.ndarray, true: np.ndarray,
                 title: str) -> None:
    """One subplot per joint: recorded (solid) and predicted (dashed) action over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = true.shape[1]
    cols = min(A, 4)
    nrows = -(-A // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.2 * nrows), squeeze=False,
                             sharex=True)
    for j, ax in enumerate(axes.flat):
        if j >= A:
            ax.axis("off")
            continue
        ax.plot(steps, true[:, j], "k-", lw=1.2, label="recorded")
        ax.plot(steps, predicted[:, j], "C1--", lw=1.2, label="predicted")
        ax.set_title(f"joint {j}", fontsize=8)
        ax.tick_params(labelsize=7)
        if j >= A - cols:
            ax.set_xlabel("step", fontsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)
