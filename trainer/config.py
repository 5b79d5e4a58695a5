"""`TrainConfig`: every option of `dprgb train`, one typed dataclass validated when built."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dprgb.pipeline.errors import DprgbError
from dprgb.trainer.schedulers import BETA_SCHEDULES, PREDICTION_TYPES

OBS_NORMALIZATIONS = ("identity", "minmax", "standardize")
INFERENCE_SCHEDULERS = ("ddim", "ddpm")


@dataclass
class TrainConfig:
    # windows (diffusion_policy names: horizon H, n_obs_steps To, n_action_steps Ta)
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # optimisation
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    # windows per micro-batch, summed over DDP ranks (each rank takes its shard); an optimizer
    # step uses grad_accum_steps micro-batches
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-6
    adam_betas: tuple[float, float] = (0.95, 0.999)
    lr_warmup_steps: int = 500
    grad_accum_steps: int = 1
    grad_clip_norm: float = 1.0  # 0 = no clipping
    amp: bool = False  # bf16 autocast (meant for CUDA; allowed on CPU)
    seed: int = 0
    # EMA of the weights (diffusion_policy EMAModel: warmup then capped decay)
    ema_power: float = 0.75
    ema_inv_gamma: float = 1.0
    ema_max_decay: float = 0.9999
    ema_update_after_step: int = 0
    # ConditionalUnet1D
    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    cond_predict_scale: bool = True
    # noise schedule
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    inference_scheduler: str = "ddim"
    num_inference_steps: int = 10
    # observations
    obs_normalization: str = "minmax"
    obs_encoder_dim: int = 0  # 0 = flatten the raw normalized obs; else Linear-Mish-Linear to this
    # validation, logging, checkpoints
    val_episodes_per_task: int = 1
    val_every_epochs: int = 10
    checkpoint_every_epochs: int = 0  # 0 = only at the end
    log_every_steps: int = 50
    compile: bool = False
    device: str = "auto"
    wandb: bool = False
    tensorboard: bool = False
    save_dir: str = "runs"
    allow_stale_cache: bool = False
    # finetune mode (stage 2): the encoder trains with the head on raw features, no cache.
    # The options after `finetune` apply to finetune mode only; cache mode ignores them.
    finetune: bool = False
    freeze_encoder: bool = False  # keep the encoder frozen (still streaming raw features)
    encoder_lr: float = 1e-5  # the encoder's learning rate; `lr` is the head's
    # start from a cache-trained final_policy.pt (or checkpoints/latest.pt): head, EMA, normalizer
    init_checkpoint: str = ""
    allow_encoder_mismatch: bool = False  # init from a checkpoint made with another encoder
    num_workers: int = 2  # DataLoader processes decoding raw features (0: in the training process)
    prefetch_factor: int = 2  # micro-batches each worker decodes ahead
    block_windows: int = 8  # consecutive windows of one episode kept together by the sampler

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.default))
        self._validate()

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> TrainConfig:
        """Build from a resolved YAML/CLI mapping; keys this config does not own are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in m.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples as lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def _validate(self) -> None:
        for name in ("horizon", "n_obs_steps", "n_action_steps", "epochs", "batch_size",
                     "grad_accum_steps", "kernel_size", "n_groups", "diffusion_step_embed_dim",
                     "num_train_timesteps", "num_inference_steps", "log_every_steps",
                     "val_every_epochs", "prefetch_factor", "block_windows"):
            if getattr(self, name) <= 0:
                raise DprgbError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")
        for name in ("max_steps", "lr_warmup_steps", "seed", "ema_update_after_step",
                     "obs_encoder_dim", "val_episodes_per_task", "checkpoint_every_epochs",
                     "num_workers"):
            if getattr(self, name) < 0:
                raise DprgbError(f"{name} must be >= 0, got {name}={getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DprgbError(f"lr must be a positive number, got {self.lr=}")
        if not (self.encoder_lr >= 0 and math.isfinite(self.encoder_lr)):
            raise DprgbError(f"encoder_lr must be a number >= 0, got {self.encoder_lr=}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise DprgbError(
                f"weight_decay and grad_clip_norm must be >= 0, got "
                f"{self.weight_decay=}, {self.grad_clip_norm=}"
            )
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise DprgbError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas=}")
        if not (self.ema_power > 0 and self.ema_inv_gamma > 0 and 0.0 <= self.ema_max_decay <= 1.0):
            raise DprgbError(
                f"need ema_power > 0, ema_inv_gamma > 0, 0 <= ema_max_decay <= 1, got "
                f"{self.ema_power=}, {self.ema_inv_gamma=}, {self.ema_max_decay=}"
            )
        if not self.down_dims or any(d <= 0 or d % self.n_groups for d in self.down_dims):
            raise DprgbError(
                f"down_dims must be positive multiples of n_groups, got "
                f"{self.down_dims=}, {self.n_groups=}"
            )
        if self.kernel_size % 2 == 0:
            raise DprgbError(f"kernel_size must be odd (same-length Conv1d): {self.kernel_size=}")
        # each level but the last halves the time axis (Downsample1d) and the up path doubles it
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise DprgbError(
                f"horizon must be divisible by 2**(len(down_dims)-1) = {factor}, got "
                f"{self.horizon=}, {self.down_dims=}"
            )
        if self.n_obs_steps > self.horizon:
            raise DprgbError(f"need n_obs_steps <= horizon: {self.n_obs_steps=}, {self.horizon=}")
        if self.n_action_steps + self.n_obs_steps - 1 > self.horizon:
            raise DprgbError(
                "executed actions start at index n_obs_steps - 1 and must fit in the horizon: "
                f"need n_action_steps + n_obs_steps - 1 <= horizon, got "
                f"{self.n_action_steps=}, {self.n_obs_steps=}, {self.horizon=}"
            )
        if self.num_inference_steps > self.num_train_timesteps:
            raise DprgbError(
                f"num_inference_steps must be <= num_train_timesteps, got "
                f"{self.num_inference_steps=}, {self.num_train_timesteps=}"
            )
        for name, choices in (
            ("obs_normalization", OBS_NORMALIZATIONS),
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("inference_scheduler", INFERENCE_SCHEDULERS),
        ):
            if getattr(self, name) not in choices:
                raise DprgbError(f"{name} must be one of {choices}: {name}={getattr(self, name)!r}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise DprgbError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device=}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default; YAML lists become tuples."""
    bad = DprgbError(f"{name} must be {type(default).__name__}, got {name}={value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if isinstance(default, float):
        # PyYAML reads `1e-4` (no dot) as a string; accept numeric strings
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        elem = type(default[0])
        return tuple(_coerce(f"{name}[{i}]", v, elem(0)) for i, v in enumerate(value))
    raise AssertionError(f"unhandled field type for {name}")
