"""The one training loop, for both modes; one optimizer step reads top to bottom in
`run_training`.

The mode is two parameters of the loop, a window source and the observation path:

- cache mode (`train`): `DeviceData`, the whole cached group on the device; a batch is cut by
  index (`gather_windows`), and its observations are already normalized vectors;
- finetune mode (`dprgb.trainer.finetune.finetune`): `StreamSource`, raw feature frames
  streamed from the zarr stores by DataLoader workers; the policy encodes them
  (`DiffusionRGBPolicy.nobs_from`), so the encoder trains with the head.

A source gives each epoch's window order, this rank's micro-batches of it from any point
(exact resume), and the validation batches. Under `torchrun` (WORLD_SIZE > 1) it runs DDP:
every rank draws the same window order and takes its shard of every batch; rank 0 alone
logs, validates and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from dprgb.cache.reader import CachedGroup
from dprgb.pipeline.encoders import encoder_fingerprint
from dprgb.pipeline.errors import DprgbError
from dprgb.trainer import checkpoint as ckpt_io
from dprgb.trainer.config import TrainConfig
from dprgb.trainer.normalizer import LinearNormalizer, fit_minmax, fit_standardize, identity
from dprgb.trainer.policy import DiffusionRGBPolicy, build_policy_config
from dprgb.trainer.windows import gather_windows, window_episodes, window_rows

# ---- data -------------------------------------------------------------------------------


def split_episodes(group: CachedGroup, val_per_task: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last `val_per_task` episodes (by source episode index) of every task.

    A task with `val_per_task` episodes or fewer keeps them all for training. Returns
    (train_mask (E,) bool, val episode ids (V,) int64, ascending).
    """
    E = len(group.episode_ends)
    train_mask = np.ones(E, dtype=bool)
    if val_per_task > 0:
        for task in np.unique(group.episode_task):
            eps = np.flatnonzero(group.episode_task == task)
            if len(eps) > val_per_task:
                order = eps[np.argsort(group.episode_index[eps], kind="stable")]
                train_mask[order[-val_per_task:]] = False
    return train_mask, np.flatnonzero(~train_mask).astype(np.int64)


def fit_normalizer(features: torch.Tensor, actions: torch.Tensor, train_rows: torch.Tensor,
                   obs_normalization: str) -> LinearNormalizer:
    """Statistics over the training rows only: obs per config, actions min-max to [-1, 1]."""
    obs = features[train_rows]  # (N_train, D)
    fit_obs = {"identity": lambda x: identity(x.shape[-1]), "minmax": fit_minmax,
               "standardize": fit_standardize}[obs_normalization]
    norm = LinearNormalizer({"obs": fit_obs(obs), "action": fit_minmax(actions[train_rows])})
    return norm.to(features.device)


@dataclass
class DeviceData:
    """The group on the device: normalized arrays, the window index, the window split."""

    nfeatures: torch.Tensor  # (N, D) normalized observations
    nactions: torch.Tensor  # (N, A) normalized actions
    actions: torch.Tensor  # (N, A) actions in data units (validation in raw units)
    rows: torch.Tensor  # (W, H) int64 rows of every window, see windows.py
    train_ids: torch.Tensor  # (W_train,) windows of training episodes
    val_ids: torch.Tensor  # (W_val,) windows of held-out episodes
    val_tasks: list[str]  # (W_val,) task name of each held-out window, for per-task metrics
    normalizer: LinearNormalizer
    action_mean: torch.Tensor  # (A,) mean training action (the evaluation baseline)
    n_obs_steps: int = 2

    # the window-source interface of `run_training` (see StreamSource for finetune mode)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """(W_train,) this epoch's training windows: a uniform permutation."""
        return self.train_ids[torch.randperm(len(self.train_ids), generator=generator,
                                             device=generator.device)]

    def train_batches(self, order: torch.Tensor, first: int, stop: int, batch_size: int,
                      dinfo: DistInfo) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches `first` .. `stop` - 1 of `order`: (nobs (b, To, D), naction
        (b, H, A)), cut from the device-resident group (one gather each)."""
        for k in range(first, stop):
            ids = rank_shard(order, k, batch_size, dinfo)
            yield gather_windows(self.nfeatures, self.nactions, self.rows, ids, self.n_obs_steps)

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """Held-out windows in order: (nobs, naction, action (b, H, A) in data units)."""
        for ids in self.val_ids.split(batch_size):
            nobs, naction = gather_windows(self.nfeatures, self.nactions, self.rows, ids,
                                           self.n_obs_steps)
            yield nobs, naction, self.actions[self.rows[ids]]

    def close(self) -> None:
        pass


class WindowSource(Protocol):
    """What `run_training` needs from a mode's data: `DeviceData` (cache), `StreamSource`
    (finetune). Batches' `obs` go to `DiffusionRGBPolicy.nobs_from`."""

    train_ids: torch.Tensor  # (W_train,) training window ids
    val_ids: torch.Tensor  # (W_val,) held-out window ids
    val_tasks: list[str]  # (W_val,) task name of each held-out window

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor: ...

    def train_batches(self, order: torch.Tensor, first: int, stop: int, batch_size: int,
                      dinfo: DistInfo) -> Iterator[tuple[Any, torch.Tensor]]: ...

    def val_batches(self, batch_size: int) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None: ...


def window_tasks(group: CachedGroup, selected: np.ndarray, pads: tuple[int, int, int]) -> list[str]:
    """Task name of each selected window (selected: (W,) bool over all windows)."""
    task_ids = group.episode_task[window_episodes(group.episode_ends, *pads)][selected]
    return [group.tasks[int(t)] for t in task_ids]


def rank_shard(order: torch.Tensor, k: int, batch_size: int, dinfo: DistInfo) -> torch.Tensor:
    """This rank's share of global micro-batch k: windows order[k*B:(k+1)*B], split by rank."""
    return order[k * batch_size:(k + 1) * batch_size].tensor_split(dinfo.world_size)[dinfo.rank]


def build_device_data(group: CachedGroup, train_mask: np.ndarray, cfg: TrainConfig,
                      device: torch.device) -> DeviceData:
    lengths = np.diff(group.episode_ends, prepend=0)
    features = torch.as_tensor(group.features).to(device, torch.float32)  # (N, D)
    actions = torch.as_tensor(group.actions).to(device, torch.float32)  # (N, A)
    train_rows = torch.as_tensor(np.repeat(train_mask, lengths)).to(device)  # (N,) bool
    normalizer = fit_normalizer(features, actions, train_rows, cfg.obs_normalization)

    pads = (cfg.horizon, cfg.n_obs_steps - 1, cfg.n_action_steps - 1)
    rows = torch.as_tensor(window_rows(group.episode_ends, *pads)).to(device)
    is_train = train_mask[window_episodes(group.episode_ends, *pads)]  # (W,)
    if not is_train.any():
        raise DprgbError(
            f"no training window: every training episode is shorter than a window "
            f"(horizon {cfg.horizon} with {cfg.n_obs_steps - 1} + {cfg.n_action_steps - 1} "
            f"padding rows); episode lengths {sorted(set(lengths.tolist()))[:10]}"
        )
    return DeviceData(
        nfeatures=normalizer.normalize("obs", features),
        nactions=normalizer.normalize("action", actions),
        actions=actions,
        rows=rows,
        train_ids=torch.as_tensor(np.flatnonzero(is_train)).to(device),
        val_ids=torch.as_tensor(np.flatnonzero(~is_train)).to(device),
        val_tasks=window_tasks(group, ~is_train, pads),
        normalizer=normalizer,
        action_mean=actions[train_rows].mean(0),
        n_obs_steps=cfg.n_obs_steps,
    )


# ---- setup helpers ------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized_here = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here)


def build_device(cfg: TrainConfig, dinfo: DistInfo) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DprgbError(f"CUDA is not available on this machine: {cfg.device=}")
        # TF32 matmuls (convolutions already use it by default), as nanoGPT does
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device(f"cuda:{dinfo.local_rank}" if name == "cuda" else name)
    return torch.device(name)


def build_schedule(cfg: TrainConfig, n_train_windows: int, world_size: int) -> tuple[int, int]:
    """(micro-batch size, optimizer steps per epoch); every epoch sees whole batches only.

    Dropping the ragged tail keeps shapes static (torch.compile, no recompiles); the
    permutation changes every epoch, so every window is still seen.
    """
    batch = cfg.batch_size
    if n_train_windows < batch * cfg.grad_accum_steps:
        batch = n_train_windows // cfg.grad_accum_steps
        if batch < world_size:
            raise DprgbError(
                f"only {n_train_windows} training windows: too few for {cfg.grad_accum_steps=}"
                f" on {world_size} processes"
            )
    steps_per_epoch = (n_train_windows // batch) // cfg.grad_accum_steps
    return batch, steps_per_epoch


def build_optimizer(policy: DiffusionRGBPolicy, cfg: TrainConfig,
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
        groups.append({"params": trainable_encoder, "lr": cfg.encoder_lr})
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


def build_ema(policy: DiffusionRGBPolicy) -> tuple[DiffusionRGBPolicy, Any]:
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


class RunLogger:
    """metrics.jsonl, plus wandb (offline) and TensorBoard when asked for and importable."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, enabled: bool, console):
        self.enabled = enabled
        self.file = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.wandb = self.tb = None
        if not enabled:
            return
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project="dprgb", dir=str(out_dir), mode="offline",
                                        config=cfg.to_dict())
            except ImportError:
                console.print("wandb is not installed; logging to metrics.jsonl only")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                console.print("tensorboard is not installed; logging to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, float)}
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()


def build_progress(enabled: bool, total: int, done: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} steps/s"), TimeRemainingColumn(),
        console=console, disable=not enabled,
    )
    task = progress.add_task("train", total=total, completed=done, loss="-", lr="-", sps="-")
    return progress, task, console


@torch.no_grad()
def validate(ema: DiffusionRGBPolicy, source: WindowSource, cfg: TrainConfig,
             device: torch.device) -> dict[str, float]:
    """Held-out windows: denoising loss, and MSE of DDIM-sampled executed actions (EMA model),
    normalised and in data units, overall and per task (`val_action_mse_raw/<task>`)."""
    g = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # same draws every time
    start, Ta = cfg.n_obs_steps - 1, cfg.n_action_steps
    normalizer = ema.get_normalizer()
    loss_sum = torch.zeros((), device=device)
    se, se_raw = [], []  # per window, (b,) each
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        for obs, naction, action in source.val_batches(cfg.batch_size):
            nobs = ema.nobs_from(obs)  # (b, To, D)
            loss_sum += ema.compute_loss(nobs, naction, generator=g) * len(naction)
            npred = ema.conditional_sample(nobs, generator=g)[:, start:start + Ta].float()
            se.append((npred - naction[:, start:start + Ta]).square().mean((1, 2)))
            pred = normalizer.unnormalize("action", npred)  # (b, Ta, A)
            se_raw.append((pred - action[:, start:start + Ta]).square().mean((1, 2)))
    se_w, se_raw_w = torch.cat(se).cpu(), torch.cat(se_raw).cpu()  # (W_val,)
    metrics = {"val_loss": loss_sum.item() / len(se_w), "val_action_mse": se_w.mean().item(),
               "val_action_mse_raw": se_raw_w.mean().item()}
    tasks = np.asarray(source.val_tasks)
    for task in dict.fromkeys(source.val_tasks):
        metrics[f"val_action_mse_raw/{task}"] = se_raw_w[torch.from_numpy(tasks == task)].mean().item()
    return metrics


def gather_rank_states(g: torch.Generator, dinfo: DistInfo) -> list[torch.Tensor]:
    """Every rank's generator state (a collective: all ranks call it), rank order."""
    if dinfo.world_size == 1:
        return [g.get_state()]
    states: list[Any] = [None] * dinfo.world_size
    dist.all_gather_object(states, g.get_state())
    return states


# options that define the window order and noise stream; epochs and max_steps may change
RESUME_SAME = ("batch_size", "grad_accum_steps", "seed")
RESUME_SAME_FINETUNE = ("block_windows",)  # finetune's window order also depends on this


def _resume_key(policy_config: dict) -> dict:
    # the training-mean action is recomputed on resume; float noise there is no mismatch
    return {k: v for k, v in policy_config.items() if k != "train_action_mean"}


def run_record(group: Any, val_episodes: np.ndarray, action_mean: torch.Tensor,
               cfg: TrainConfig) -> dict[str, Any]:
    """The data part of a checkpoint's config, alike in both modes. `group`: a CachedGroup or
    a streaming RawGroup (same episode tables)."""
    return {
        "tasks": list(group.tasks),
        "action_layout": ckpt_io.plain(group.action_layout),
        "val_episodes": [[group.tasks[int(group.episode_task[e])], int(group.episode_index[e])]
                         for e in val_episodes],
        "train_action_mean": action_mean.tolist(),
        "seed": cfg.seed,
    }


def final_config(policy_config: dict, ema: DiffusionRGBPolicy, step: int) -> dict:
    """`final_policy.pt`'s config. With an encoder (finetune), `cache_fingerprint` becomes the
    fingerprint of the EMA encoder saved with it: the features this head consumes. It equals
    the original encoder's when the encoder stayed frozen, so `dprgb eval` on that cache works,
    and differs (eval refuses that cache) when the encoder was trained."""
    config = {**policy_config, "step": step}
    if ema.encoder is not None and policy_config.get("encoder"):
        options = policy_config["encoder"]["fingerprint_options"]
        config["cache_fingerprint"] = encoder_fingerprint(ema.encoder, options)
    return config


def checkpoint_path(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints" / "latest.pt"


def check_resume(out_dir: Path, resume: bool) -> None:
    if resume and not checkpoint_path(out_dir).is_file():
        raise DprgbError("resume asked for, but there is no checkpoint to resume from",
                         path=checkpoint_path(out_dir))


# ---- the loop -------------------------------------------------------------------------------


def train(cfg: TrainConfig, group: CachedGroup, out_dir: Path, *, resume: bool = False,
          progress: bool = True) -> Path:
    """Cache mode: train on `group`; returns the path of `out_dir/final_policy.pt`."""
    out_dir = Path(out_dir)
    with training_session(cfg, out_dir, resume) as (dinfo, device):
        train_mask, val_episodes = split_episodes(group, cfg.val_episodes_per_task)
        data = build_device_data(group, train_mask, cfg, device)
        policy_config = {
            **build_policy_config(cfg, group.obs_dim, group.action_dim),
            **run_record(group, val_episodes, data.action_mean, cfg),
            "cache_fingerprint": group.fingerprint,
        }
        policy = DiffusionRGBPolicy(policy_config).to(device)
        policy.set_normalizer(data.normalizer.state_dict())
        return run_training(cfg, data, policy, policy_config, out_dir, dinfo, device,
                            resume=resume, progress=progress)


@contextlib.contextmanager
def training_session(cfg: TrainConfig, out_dir: Path,
                     resume: bool) -> Iterator[tuple[DistInfo, torch.device]]:
    """What every training mode does first and last: check the resume request, join the
    process group (under torchrun), pick the device, seed the model init (identical on every
    rank); leave the process group at the end, also on errors."""
    check_resume(out_dir, resume)
    dinfo = build_distributed(cfg)
    try:
        device = build_device(cfg, dinfo)
        torch.manual_seed(cfg.seed)
        yield dinfo, device
    finally:
        if dinfo.initialized_here:
            dist.destroy_process_group()


def run_training(cfg: TrainConfig, source: WindowSource, policy: DiffusionRGBPolicy,
                 policy_config: dict, out_dir: Path, dinfo: DistInfo, device: torch.device, *,
                 resume: bool, progress: bool, ema_state: dict | None = None) -> Path:
    """The loop, for either mode. `policy` is built (normalizer set, initial weights loaded);
    `ema_state` starts the EMA elsewhere than at `policy` (finetune --init). Closes `source`."""
    ckpt_path, final_path = checkpoint_path(out_dir), out_dir / "final_policy.pt"
    batch_size, steps_per_epoch = build_schedule(cfg, len(source.train_ids), dinfo.world_size)
    micro_per_epoch = steps_per_epoch * cfg.grad_accum_steps
    total_steps = cfg.epochs * steps_per_epoch  # the LR schedule's length
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    policy.train()  # a frozen encoder stays in eval mode (see DiffusionRGBPolicy.train)
    optimizer = build_optimizer(policy, cfg, device)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_warmup_steps, total_steps)
    # Two streams: the window order (same on every rank) and the diffusion noise (per rank).
    shuffle_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * (dinfo.rank + 1))
    epoch_start_gen = torch.Generator(device=device)  # holds the current epoch's start state
    step, epoch, epoch_step = 0, 0, 0
    if resume:
        state = ckpt_io.load_train_state(ckpt_path)
        if _resume_key(state["policy_config"]) != _resume_key(ckpt_io.plain(policy_config)):
            raise DprgbError("the checkpoint was trained with another model or data setup; "
                             "start a new run or restore the old settings", path=ckpt_path)
        same = RESUME_SAME + (RESUME_SAME_FINETUNE if cfg.finetune else ())
        changed = [k for k in same if state["config"].get(k) != cfg.to_dict()[k]]
        if changed:
            raise DprgbError("resuming continues the same run: keep " + ", ".join(
                f"{k}={state['config'].get(k)!r} (now {getattr(cfg, k)!r})" for k in changed),
                path=ckpt_path)
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        rng = state["rng"]
        if len(rng["noise_per_rank"]) != dinfo.world_size:
            raise DprgbError(f"the checkpoint was written by {len(rng['noise_per_rank'])} "
                             f"processes; resume with as many, not {dinfo.world_size}",
                             path=ckpt_path)
        rng["generators"]["noise"] = rng["noise_per_rank"][dinfo.rank]
        ckpt_io.set_rng_state(rng, {"shuffle": shuffle_gen, "noise": noise_gen,
                                    "shuffle_epoch_start": epoch_start_gen})
        step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
        ema_state = state["ema_model"]

    ema, ema_update = build_ema(policy)
    if ema_state is not None:
        ema.load_state_dict(ema_state)
    if cfg.compile:
        policy.model.compile()  # in place: parameter names (and checkpoints) stay the same
    model = policy
    if dinfo.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: the only buffers are the constant normalizer (and the
        # encoder's constants). A trainable encoder may hold parameters its forward never
        # uses (an RGB2PC MoE gate's noise scale): DDP must then look for unused ones.
        trains_encoder = len(optimizer.param_groups) > 1
        model = DistributedDataParallel(policy, device_ids=device_ids, broadcast_buffers=False,
                                        find_unused_parameters=trains_encoder)

    if dinfo.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    bar, bar_task, console = build_progress(progress and dinfo.is_main, stop_step, step)
    logger = RunLogger(cfg, out_dir, dinfo.is_main, console)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    running_loss = torch.zeros((), device=device)  # summed on device; read at log steps only
    last_log_step, last_log_time = step, time.perf_counter()

    def save_checkpoint(next_epoch: int, next_epoch_step: int, final: bool) -> None:
        noise_states = gather_rank_states(noise_gen, dinfo)  # collective: every rank calls
        if not dinfo.is_main:
            return
        rng = ckpt_io.rng_state({"shuffle": shuffle_gen, "noise": noise_gen,
                                 "shuffle_epoch_start": epoch_start_gen})
        rng["noise_per_rank"] = noise_states
        ckpt_io.save_train_state(
            ckpt_path, config=cfg.to_dict(), policy_config=ckpt_io.plain(policy_config),
            model=policy.state_dict(), ema_model=ema.state_dict(),
            optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
            step=step, epoch=next_epoch, epoch_step=next_epoch_step, rng=rng,
        )
        if final:
            ckpt_io.save_policy(final_path, config=final_config(policy_config, ema, step),
                                policy_state=ema.state_dict(),
                                normalizer=policy.normalizer_state())

    with bar, contextlib.closing(logger), contextlib.closing(source):
        while step < stop_step:
            if epoch_step == 0:
                epoch_start_gen.set_state(shuffle_gen.get_state())
            else:  # resumed mid-epoch: redraw this epoch's order from its start state
                shuffle_gen.set_state(epoch_start_gen.get_state())
            order = source.epoch_order(shuffle_gen)  # (W_train,) window ids
            batches = source.train_batches(order, epoch_step * cfg.grad_accum_steps,
                                           micro_per_epoch, batch_size, dinfo)
            while epoch_step < steps_per_epoch and step < stop_step:
                lrs = lr_scheduler.get_last_lr()  # [head, encoder (finetune)]
                for micro in range(cfg.grad_accum_steps):
                    # this rank's shard of the global micro-batch: obs is (b, To, D) normalized
                    # vectors (cache) or raw frames the policy encodes (finetune); (b, H, A)
                    obs, naction = next(batches)
                    is_last_micro = micro == cfg.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if is_last_micro or dinfo.world_size == 1 \
                        else model.no_sync()  # DDP all-reduces on the last micro-batch only
                    with sync, autocast:
                        loss = model(obs, naction, generator=noise_gen) / cfg.grad_accum_steps
                    loss.backward()
                    running_loss += loss.detach()
                if cfg.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                ema_update(ema_decay(step, cfg))
                step += 1
                epoch_step += 1

                is_last_step = step == stop_step
                is_epoch_end = epoch_step == steps_per_epoch
                is_log_step = step % cfg.log_every_steps == 0 or is_last_step
                is_eval_step = len(source.val_ids) > 0 and (is_last_step or (
                    is_epoch_end and (epoch + 1) % cfg.val_every_epochs == 0))
                is_ckpt_step = is_last_step or (is_epoch_end and cfg.checkpoint_every_epochs > 0
                                                and (epoch + 1) % cfg.checkpoint_every_epochs == 0)
                if is_log_step:
                    now = time.perf_counter()
                    sps = (step - last_log_step) / (now - last_log_time)
                    mean_loss = running_loss.item() / (step - last_log_step)  # the one host sync
                    running_loss.zero_()
                    record = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lrs[0],
                              "steps_per_s": sps}
                    if len(lrs) > 1:
                        record["encoder_lr"] = lrs[1]
                    logger.log(record)
                    bar.update(bar_task, loss=f"{mean_loss:.4f}", lr=f"{lrs[0]:.2e}", sps=f"{sps:.1f}")
                    last_log_step, last_log_time = step, now
                paused_at = time.perf_counter()  # eval and checkpoints don't count as steps/s
                if is_eval_step and dinfo.is_main:
                    logger.log({"step": step, "epoch": epoch, **validate(ema, source, cfg, device)})
                if is_ckpt_step:
                    # where a resumed run continues: the next epoch, or the rest of this one
                    save_checkpoint(*((epoch + 1, 0) if is_epoch_end else (epoch, epoch_step)),
                                    final=is_last_step)
                last_log_time += time.perf_counter() - paused_at
                bar.update(bar_task, advance=1)
            if epoch_step == steps_per_epoch:
                epoch, epoch_step = epoch + 1, 0
    if dinfo.world_size > 1:
        dist.barrier()  # final_policy.pt is written before any rank returns
    return final_path
