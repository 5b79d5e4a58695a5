"""Checkpoints as data: tensors and plain containers, loadable with `weights_only=True`.

Two kinds, both written atomically (a temporary file in the same directory, then
`os.replace`), so a crash leaves the previous file intact:

- the training state `checkpoints/latest.pt`: everything `train(..., resume=True)` needs to
  continue exactly (weights, EMA weights, optimizer, LR schedule, counters, RNG states);
- the policy `final_policy.pt`: `{"config", "policy_state", "normalizer"}`, what
  `DiffusionRGBPolicy` needs for inference (see `policy.py`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprgb.pipeline.errors import DprgbError

TRAIN_STATE_FORMAT = "dprgb.train_state/1"
POLICY_FORMAT = "dprgb.policy/1"
TRAIN_STATE_KEYS = ("format", "config", "policy_config", "model", "ema_model", "optimizer",
                    "lr_scheduler", "step", "epoch", "epoch_step", "rng")
POLICY_KEYS = ("config", "policy_state", "normalizer")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, required: tuple[str, ...], what: str) -> dict[str, Any]:
    """torch.load(weights_only=True) onto the CPU, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DprgbError(f"no {what} file", path=path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, or holding pickled objects
        raise DprgbError(f"cannot read {what}: {type(e).__name__}: {e}", path=path) from None
    missing = [k for k in required if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise DprgbError(f"not a {what}: missing keys {missing}", path=path)
    return obj


def plain(obj: Any) -> Any:
    """Containers of numpy scalars/arrays -> Python ints, floats, lists (weights_only-safe)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# ---- RNG --------------------------------------------------------------------------------


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Global torch (CPU, every CUDA device) and Python RNGs, plus named torch.Generators."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, g in generators.items():
        g.set_state(state["generators"][name])


# ---- the two checkpoint kinds ---------------------------------------------------------------


def save_train_state(path: Path, *, config: dict, policy_config: dict, model: dict,
                     ema_model: dict, optimizer: dict, lr_scheduler: dict, step: int, epoch: int,
                     epoch_step: int, rng: dict, extra: dict | None = None) -> None:
    """Write `checkpoints/latest.pt`.

    (epoch, epoch_step) is where training continues: `epoch_step` optimizer steps of
    `epoch` are done, and `rng["generators"]["shuffle_epoch_start"]` regenerates that
    epoch's window permutation.
    """
    atomic_save({
        "format": TRAIN_STATE_FORMAT, "config": config, "policy_config": policy_config,
        "model": model, "ema_model": ema_model, "optimizer": optimizer,
        "lr_scheduler": lr_scheduler, "step": int(step), "epoch": int(epoch),
        "epoch_step": int(epoch_step), "rng": rng, **(extra or {}),
    }, path)


def load_train_state(path: Path) -> dict[str, Any]:
    state = load(path, TRAIN_STATE_KEYS, "training checkpoint")
    if state["format"] != TRAIN_STATE_FORMAT:
        raise DprgbError(f"training checkpoint format {state['format']!r}, "
                         f"expected {TRAIN_STATE_FORMAT!r}", path=path)
    return state


def save_policy(path: Path, *, config: dict, policy_state: dict[str, torch.Tensor],
                normalizer: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    """Write `final_policy.pt`: CPU tensors and a plain config."""
    atomic_save({
        "format": POLICY_FORMAT,
        "config": plain(config),
        "policy_state": {k: v.detach().cpu() for k, v in policy_state.items()},
        "normalizer": {k: v.detach().cpu() for k, v in normalizer.items()},
        **(extra or {}),
    }, path)


def load_policy(path: Path) -> dict[str, Any]:
    return load(path, POLICY_KEYS, "policy checkpoint")
