"""The configs of everything after the cache: the policy model, training, finetune.

`ModelConfig` is what a policy file saves verbatim and rebuilds the model from; `TrainConfig`
is the optimisation and bookkeeping of a run; `FinetuneConfig` is stage 2's own options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dprgb.config import Config
from dprgb.embodiment import ACTION_SPACES, PROPRIO_SOURCES
from dprgb.errors import DprgbError
from dprgb.trainer.schedulers import BETA_SCHEDULES, PREDICTION_TYPES

OBS_NORMALIZATIONS = ("identity", "minmax", "standardize")
INFERENCE_SCHEDULERS = ("ddim", "ddpm")
WANDB_MODES = ("offline", "online")


def _positive(config: Config, names: tuple[str, ...], strict: bool = True) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0 if strict else value < 0:
            raise DprgbError(f"{name} must be {'> 0' if strict else '>= 0'}, got {name}={value!r}")


def _one_of(config: Config, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise DprgbError(f"{name} must be one of {choices}: {name}={getattr(config, name)!r}")


@dataclass
class ModelConfig(Config):
    """The diffusion-policy head: windows, ConditionalUnet1D, noise schedule, observations."""

    # windows (diffusion_policy names: horizon H, n_obs_steps To, n_action_steps Ta)
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # ConditionalUnet1D
    down_dims: tuple[int, ...] = (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    cond_predict_scale: bool = True
    # noise schedule
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    # The recipe's defaults (prediction_type, lr, lr_warmup_steps) and their evidence, written
    # here only. "sample" (predict the clean action chunk), lr 1e-3 and 100 warmup steps, not the
    # reference's epsilon / 1e-4 / 500: bench/closed_loop.py, Meta-World, head [64, 128, 256],
    # batch 64, 30 demonstrations, 1500 steps. Pick-place (20 episodes): epsilon/1e-4/500 0.00,
    # sample/1e-4/500 0.75, epsilon/1e-3/100 0.60, sample/1e-3/100 0.80. Drawer-open,
    # button-press-topdown, plate-slide (50 episodes): 1.00, 1.00, 1.00 against 0.88, 1.00, 0.96,
    # with shorter episodes. Offline (demo data, ~900 steps of a [32, 64, 128] head): held-out
    # MSE 0.01-0.05x the mean-action baseline for sample, 2.1-3.4x for epsilon. Measured with the
    # small heads: with the default 100 M-parameter head, check lr on your data.
    prediction_type: str = "sample"
    clip_sample: bool = True
    inference_scheduler: str = "ddim"
    num_inference_steps: int = 10
    # observations
    obs_normalization: str = "minmax"
    # Linear-Mish-Linear from each step's observation to this size before the head (0: the raw
    # normalized observation flattened). 128, measured (bench/closed_loop.py, the recipe's setup
    # above, 50 held-out episodes, 128 against 0): pick-place from the state 1.00 against 0.84;
    # door-open, window-open, drawer-open from the state and from pixels 0.98-1.00 either way;
    # pick-place from pixels 0.36 against 0.44, within the noise of 50 episodes.
    obs_encoder_dim: int = 128
    # proprioception (the robot's state at each observed step, beside the features): "none",
    # "layout" (the joints of the task's action layout) or "full" (the whole state vector)
    proprio: str = "none"
    # one policy per action-size group ("per_group", 方案1 of features_model's DP_RGB guide) or one
    # over every task ("unified", 方案2): actions placed in the robot's joint slots, masked per task, and a
    # learned task embedding of this size appended to the global condition (0 = none)
    action_space: str = "per_group"
    task_embed_dim: int = 32

    def validate(self) -> None:
        _positive(self, ("horizon", "n_obs_steps", "n_action_steps", "kernel_size", "n_groups",
                         "diffusion_step_embed_dim", "num_train_timesteps", "num_inference_steps"))
        _positive(self, ("obs_encoder_dim",), strict=False)
        if not self.down_dims or any(d <= 0 or d % self.n_groups for d in self.down_dims):
            raise DprgbError(
                f"down_dims must be positive multiples of n_groups, got {self.down_dims=}, {self.n_groups=}"
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
        _one_of(self, "obs_normalization", OBS_NORMALIZATIONS)
        _one_of(self, "proprio", PROPRIO_SOURCES)
        _one_of(self, "action_space", ACTION_SPACES)
        _positive(self, ("task_embed_dim",), strict=False)
        _one_of(self, "beta_schedule", BETA_SCHEDULES)
        _one_of(self, "prediction_type", PREDICTION_TYPES)
        _one_of(self, "inference_scheduler", INFERENCE_SCHEDULERS)


@dataclass
class TrainConfig(Config):
    """Optimisation, validation, logging and checkpoints of a run (both modes)."""

    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    # windows per micro-batch, summed over DDP ranks (each rank takes its shard); an optimizer
    # step uses grad_accum_steps micro-batches
    batch_size: int = 256
    lr: float = 1e-3  # with 100 warmup steps: see prediction_type in ModelConfig for the evidence
    weight_decay: float = 1e-6
    adam_betas: tuple[float, float] = (0.95, 0.999)
    lr_warmup_steps: int = 100
    grad_accum_steps: int = 1
    grad_clip_norm: float = 1.0  # 0 = no clipping
    amp: bool = False  # bf16 autocast of the training step (meant for CUDA; allowed on CPU)
    compile: bool = False  # torch.compile the UNet
    seed: int = 0
    # EMA of the weights (diffusion_policy EMAModel: warmup then capped decay)
    ema_power: float = 0.75
    ema_inv_gamma: float = 1.0
    ema_max_decay: float = 0.9999
    ema_update_after_step: int = 0
    # validation, logging, checkpoints
    val_episodes_per_task: int = 1
    val_every_epochs: int = 10
    checkpoint_every_epochs: int = 0  # 0 = only at the end; N: also checkpoints/epoch_<E>.pt
    keep_checkpoints: int = 0  # epoch_<E>.pt files kept, the newest (0 = keep all)
    log_every_steps: int = 50
    wandb: bool = False
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) or online
    wandb_project: str = "dprgb"
    wandb_run_name: str | None = None  # None: wandb names the run
    tensorboard: bool = False
    save_dir: str = "runs"

    def validate(self) -> None:
        _positive(self, ("epochs", "batch_size", "grad_accum_steps", "log_every_steps", "val_every_epochs"))
        _positive(self, ("max_steps", "lr_warmup_steps", "seed", "ema_update_after_step",
                         "val_episodes_per_task", "checkpoint_every_epochs", "keep_checkpoints"),
                  strict=False)
        _one_of(self, "wandb_mode", WANDB_MODES)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DprgbError(f"lr must be a positive number, got {self.lr=}")
        if self.weight_decay < 0 or self.grad_clip_norm < 0:
            raise DprgbError(
                f"weight_decay and grad_clip_norm must be >= 0, got "
                f"{self.weight_decay=}, {self.grad_clip_norm=}"
            )
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise DprgbError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas=}")
        if not (self.ema_power > 0 and self.ema_inv_gamma > 0 and 0.0 <= self.ema_max_decay <= 1.0):
            raise DprgbError(
                f"need ema_power > 0, ema_inv_gamma > 0, 0 <= ema_max_decay <= 1, got "
                f"{self.ema_power=}, {self.ema_inv_gamma=}, {self.ema_max_decay=}"
            )


@dataclass
class FinetuneConfig(Config):
    """Stage 2: the encoder trains with the head on raw features streamed from the stores."""

    finetune: bool = False
    freeze_encoder: bool = False  # keep the encoder frozen (still streaming raw features)
    encoder_lr: float = 1e-5  # the encoder's learning rate; `lr` is the head's
    # start from a cache-trained final_policy.pt (or checkpoints/latest.pt): head, EMA, normalizer
    init_checkpoint: str = ""
    allow_encoder_mismatch: bool = False  # init from a checkpoint made with another encoder
    num_workers: int = 2  # DataLoader processes decoding raw features (0: in the training process)
    prefetch_factor: int = 2  # micro-batches each worker decodes ahead
    block_windows: int = 8  # consecutive windows of one episode kept together by the sampler

    def validate(self) -> None:
        _positive(self, ("prefetch_factor", "block_windows"))
        _positive(self, ("num_workers",), strict=False)
        if not (self.encoder_lr >= 0 and math.isfinite(self.encoder_lr)):
            raise DprgbError(f"encoder_lr must be a number >= 0, got {self.encoder_lr=}")
