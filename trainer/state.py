"""The training state: the schedule, optimizer, LR schedule, EMA, random streams and counters
(`TrainingState`), and its file `checkpoints/latest.pt`: everything `train(..., resume=True)`
needs to continue exactly (weights, EMA weights, normalizer, optimizer, LR schedule, counters,
RNG states), the run's settings under "run_config" and the policy's under "policy_config";
written atomically, loaded with weights_only=True (dprgb.torch_files).
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dprgb.config import plain
from dprgb.errors import DprgbError
from dprgb.torch_files import atomic_save, check_format, load_torch_file
from dprgb.trainer.config import TrainConfig
from dprgb.trainer.distributed import DistInfo
from dprgb.trainer.policy import DiffusionRGBPolicy

TRAIN_STATE_FORMAT = "dprgb.train_state/2"
TRAIN_STATE_KEYS = ("format", "run_config", "policy_config", "model", "ema_model", "normalizer",
                    "optimizer", "lr_scheduler", "step", "epoch", "epoch_step", "rng")

# What a resume may change: how long the run goes on (and where its folder is named from,
# which is the folder being resumed). Every other setting is the run's: a resume that changes
# one would train on under settings config.yaml does not record.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "save_dir")


@dataclass
class Schedule:
    batch_size: int  # global micro-batch, windows
    steps_per_epoch: int  # optimizer steps
    total_steps: int  # the LR schedule's length
    stop_step: int  # where this run stops (max_steps)


def build_schedule(cfg: TrainConfig, n_train_windows: int, world_size: int) -> Schedule:
    """Every epoch sees whole batches only: dropping the ragged tail keeps shapes static
    (torch.compile, no recompiles); the permutation changes every epoch, so every window is
    still seen."""
    batch = cfg.batch_size
    if n_train_windows < batch * cfg.grad_accum_steps:
        batch = n_train_windows // cfg.grad_accum_steps
        if batch < world_size:
            raise DprgbError(
                f"only {n_train_windows} training windows: too few for {cfg.grad_accum_steps=}"
                f" on {world_size} processes"
            )
    steps_per_epoch = (n_train_windows // batch) // cfg.grad_accum_steps
    total = cfg.epochs * steps_per_epoch
    return Schedule(batch, steps_per_epoch, total, min(total, cfg.max_steps) if cfg.max_steps else total)


def build_optimizer(policy: DiffusionRGBPolicy, cfg: TrainConfig, encoder_lr: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: group 0 the head at `lr`, group 1 (finetune mode,
    encoder not frozen) the encoder at `encoder_lr`; the LR schedule scales both alike."""
    # One fused kernel on CUDA, and on the CPU since torch 2.4 (~14x faster than the default
    # per-tensor loop for the small UNet); foreach elsewhere.
    torch_version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    fused = device.type == "cuda" or (device.type == "cpu" and torch_version >= (2, 4))
    encoder = list(policy.encoder.parameters()) if policy.encoder is not None else []
    in_encoder = {id(p) for p in encoder}
    groups = [{"params": [p for p in policy.parameters() if id(p) not in in_encoder], "lr": cfg.lr}]
    trainable_encoder = [p for p in encoder if p.requires_grad]
    if trainable_encoder:
        groups.append({"params": trainable_encoder, "lr": encoder_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas,
                             weight_decay=cfg.weight_decay, fused=fused or None,
                             foreach=None if fused else True)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then half a cosine to 0 (diffusers' cosine schedule)."""

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def ema_decay(updates_done: int, cfg: TrainConfig) -> float:
    """diffusion_policy EMAModel: 1 - (1 + s / inv_gamma) ** -power, capped; 0 at first."""
    s = updates_done - cfg.ema_update_after_step - 1
    if s <= 0:
        return 0.0
    return min(max(1 - (1 + s / cfg.ema_inv_gamma) ** -cfg.ema_power, 0.0), cfg.ema_max_decay)


def build_ema(policy: DiffusionRGBPolicy) -> tuple[DiffusionRGBPolicy, Callable[[float], None]]:
    """A frozen copy plus an update(decay) closure over flat parameter/buffer lists."""
    ema = copy.deepcopy(policy).eval().requires_grad_(False)
    params, ema_params = list(policy.parameters()), list(ema.parameters())
    buffers, ema_buffers = list(policy.buffers()), list(ema.buffers())

    @torch.no_grad()
    def update(decay: float) -> None:
        # ema = decay * ema + (1 - decay) * param, one fused kernel per dtype/device group
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        torch._foreach_copy_(ema_buffers, buffers)

    return ema, update


def wrap_model(policy: DiffusionRGBPolicy, cfg: TrainConfig, dinfo: DistInfo, device: torch.device,
               trains_encoder: bool) -> torch.nn.Module:
    """What the step calls: the policy, its UNet compiled in place (parameter names and so
    checkpoints stay the same), under DDP when there are several processes."""
    if cfg.compile:
        policy.model.compile()
    if dinfo.world_size == 1:
        return policy
    return data_parallel(policy, device, trains_encoder)


def data_parallel(policy: DiffusionRGBPolicy, device: torch.device,
                  trains_encoder: bool) -> DistributedDataParallel:
    """The policy under DDP in the process group already joined (bench/gpu.py times it too)."""
    device_ids = [device.index] if device.type == "cuda" else None
    # No buffer sync at each forward: the only buffers are the constant normalizer (and the
    # encoder's constants). torch 2.13 renamed the switch (`broadcast_buffers` warns there).
    # A trainable encoder may hold parameters its forward never uses (an RGB2PC MoE gate's
    # noise scale): DDP must then look for unused ones.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
    return DistributedDataParallel(policy, device_ids=device_ids, find_unused_parameters=trains_encoder,
                                   **no_sync)


@dataclass
class TrainingState:
    """Everything a step changes; `save` and `restore` make resume exact."""

    policy: DiffusionRGBPolicy
    ema: DiffusionRGBPolicy
    ema_update: Callable[[float], None]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    # The window order (shuffle, and its state at the epoch's start) and the diffusion noise.
    generators: dict[str, torch.Generator]
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0

    @classmethod
    def build(cls, policy: DiffusionRGBPolicy, cfg: TrainConfig, encoder_lr: float, schedule: Schedule,
              device: torch.device, ema_state: dict | None) -> TrainingState:
        policy.train()  # a frozen encoder stays in eval mode (see DiffusionRGBPolicy.train)
        optimizer = build_optimizer(policy, cfg, encoder_lr, device)
        lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_warmup_steps, schedule.total_steps)
        ema, ema_update = build_ema(policy)
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        generators = {"shuffle": torch.Generator(device=device).manual_seed(cfg.seed),
                      "noise": torch.Generator(device=device).manual_seed(cfg.seed + 1000),
                      "shuffle_epoch_start": torch.Generator(device=device)}
        return cls(policy, ema, ema_update, optimizer, lr_scheduler, generators)

    def save(self, path: Path, resume_at: tuple[int, int], *, run_config: dict,
             policy_config: dict) -> None:
        """`resume_at` = (epoch, epoch_step): where a resumed run continues."""
        save_train_state(
            path, run_config=run_config, policy_config=plain(policy_config),
            model=self.policy.state_dict(), ema_model=self.ema.state_dict(),
            normalizer=self.policy.normalizer_state(), optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(), step=self.step, epoch=resume_at[0],
            epoch_step=resume_at[1], rng=rng_state(self.generators),
        )

    def restore(self, path: Path, *, run_config: dict, policy_config: dict) -> None:
        """Continue the run saved at `path`, refusing one made with another setup."""
        state = load_train_state(path)
        if _resume_key(state["policy_config"]) != _resume_key(plain(policy_config)):
            raise DprgbError("the checkpoint was trained with another model or data setup; "
                             "start a new run or restore the old settings", path=path)
        check_resume_settings(state["run_config"], run_config, path)
        self.policy.load_state_dict(state["model"])
        self.policy.set_normalizer(state["normalizer"])
        self.ema.load_state_dict(state["ema_model"])
        self.ema.set_normalizer(state["normalizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"], self.generators)
        self.step, self.epoch, self.epoch_step = state["step"], state["epoch"], state["epoch_step"]


def check_resume_settings(saved_config: dict, run_config: dict, path: Path) -> None:
    """Refuse a resume whose settings differ from the run's in anything but RESUME_MAY_CHANGE,
    naming each differing key with the run's value and the new one. A key the checkpoint does
    not record (saved by an older dprgb) is not compared."""
    saved, now = _flat(plain(saved_config)), _flat(plain(run_config))
    changed = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if changed:
        differ = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed)
        raise DprgbError(f"resuming continues the same run, but {differ}: only epochs and max_steps "
                         "may change; drop the other changes, or start a new run (another save_dir, "
                         "or --overwrite-run)", path=path)


def _resume_key(policy_config: dict) -> dict:
    # the run record (training-mean action, step) is recomputed; float noise there is no mismatch
    return {k: v for k, v in policy_config.items() if k != "run"}


def _flat(run_config: dict[str, Any]) -> dict[str, Any]:
    """{"train": {...}, "finetune": {...}} -> one mapping of keys (no key is in two)."""
    return {k: v for section in run_config.values() if isinstance(section, dict) for k, v in section.items()}


def barrier(dinfo: DistInfo) -> None:
    if dinfo.world_size > 1:
        dist.barrier()


# ---- the file ---------------------------------------------------------------------------------


def save_train_state(path: Path, **state: Any) -> None:
    """Write `checkpoints/latest.pt` from the TRAIN_STATE_KEYS (but "format").

    (epoch, epoch_step) is where training continues: `epoch_step` optimizer steps of
    `epoch` are done, and `rng["generators"]["shuffle_epoch_start"]` regenerates that
    epoch's window permutation.
    """
    assert set(state) == set(TRAIN_STATE_KEYS) - {"format"}, sorted(set(state) ^ set(TRAIN_STATE_KEYS))
    atomic_save({"format": TRAIN_STATE_FORMAT, **state}, path, "checkpoint")


def load_train_state(path: Path) -> dict[str, Any]:
    obj = load_torch_file(path, "training checkpoint", required=("format",))
    check_format(obj, TRAIN_STATE_FORMAT, TRAIN_STATE_KEYS, "training checkpoint", path)
    return obj


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
