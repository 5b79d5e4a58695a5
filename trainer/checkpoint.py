"""Checkpoints as data: tensors and plain containers, loadable with `weights_only=True`.

Two kinds, both written atomically (a temporary file in the same directory, then
`os.replace`), so a crash leaves the previous file intact:

- the training state `checkpoints/latest.pt`: everything `train(..., resume=True)` needs to
  continue exactly (weights, EMA weights, normalizer, optimizer, LR schedule, counters, RNG
  states), the run's settings under "run_config" and the policy's under "policy_config";
- the policy `final_policy.pt`, a file that describes itself:

      format          "dprgb.policy/2", checked when loaded
      config          the policy config (`policy.policy_config`): "model" (ModelConfig
                      verbatim), obs_dim, action_dim, tasks, each task's action layout,
                      the observation spec, the encoder record, the cache fingerprint, the run
      policy_state    the head's weights (EMA)
      normalizer      {"obs.scale", "obs.offset", "action.scale", "action.offset"}
      encoder_state   the encoder's weights (the frozen one of the cache, or the finetuned one)
      encoder_archive a TorchScript encoder's file bytes (uint8 tensor), for that kind only
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprgb.errors import DprgbError

TRAIN_STATE_FORMAT = "dprgb.train_state/2"
POLICY_FORMAT = "dprgb.policy/2"
TRAIN_STATE_KEYS = ("format", "run_config", "policy_config", "model", "ema_model", "normalizer",
                    "optimizer", "lr_scheduler", "step", "epoch", "epoch_step", "rng")
POLICY_KEYS = ("format", "config", "policy_state", "normalizer", "encoder_state")


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


def save_train_state(path: Path, **state: Any) -> None:
    """Write `checkpoints/latest.pt` from the TRAIN_STATE_KEYS (but "format").

    (epoch, epoch_step) is where training continues: `epoch_step` optimizer steps of
    `epoch` are done, and `rng["generators"]["shuffle_epoch_start"]` regenerates that
    epoch's window permutation.
    """
    assert set(state) == set(TRAIN_STATE_KEYS) - {"format"}, sorted(set(state) ^ set(TRAIN_STATE_KEYS))
    atomic_save({"format": TRAIN_STATE_FORMAT, **state}, path)


def load_train_state(path: Path) -> dict[str, Any]:
    return _checked(load(path, ("format",), "training checkpoint"), TRAIN_STATE_FORMAT, TRAIN_STATE_KEYS,
                    "training checkpoint", path)


def save_policy(path: Path, *, config: dict, policy_state: dict[str, torch.Tensor],
                normalizer: dict[str, torch.Tensor], encoder: torch.nn.Module) -> None:
    """Write `final_policy.pt`: CPU tensors, a plain config, the encoder as data."""
    obj = {
        "format": POLICY_FORMAT,
        "config": plain(config),
        "policy_state": {k: v.detach().cpu() for k, v in policy_state.items()},
        "normalizer": {k: v.detach().cpu() for k, v in normalizer.items()},
        "encoder_state": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
    }
    archive = getattr(encoder, "archive", b"")
    if archive:
        obj["encoder_archive"] = torch.frombuffer(bytearray(archive), dtype=torch.uint8)
    atomic_save(obj, path)


def load_policy(path: Path) -> dict[str, Any]:
    """A `final_policy.pt`, its format version checked; "encoder_archive" as bytes."""
    obj = _checked(load(path, ("format",), "policy file"), POLICY_FORMAT, POLICY_KEYS, "policy file", path)
    if "encoder_archive" in obj:
        obj["encoder_archive"] = obj["encoder_archive"].numpy().tobytes()
    return obj


def _checked(obj: dict[str, Any], expected: str, keys: tuple[str, ...], what: str,
             path: Path) -> dict[str, Any]:
    if obj["format"] != expected:
        raise DprgbError(f"{what} format {obj['format']!r} is not {expected!r}, the one this dprgb "
                         "reads (made by another dprgb version?)", path=path)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DprgbError(f"not a {what}: missing keys {missing}", path=path)
    return obj
