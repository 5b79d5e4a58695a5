"""Finetune mode (stage 2): the encoder and the diffusion head trained end to end on raw
features, bypassing the cache. `dprgb train --group arm7 --finetune [--init PATH]`.

`finetune` sets the run up and hands it to the one training loop (`run_training`) with a
`StreamSource` (raw frames from the zarr stores, see streaming.py) as its window source and a
policy that holds the encoder, so each step is `obs = encoder(frames)` -> normalize -> the
same head and loss as cache mode. Decisions:

- The encoder is built exactly as precompute builds it (`encoder_spec` from the same config
  keys, `EncoderSpec.load`), and fingerprinted the same way (`encoder_fingerprint` with the
  same options), so its fingerprint is the one a cache made by it carries. Its parameters
  train at `encoder_lr` (the head at `lr`), in train mode (an RGB2PC context encoder's
  dropout is active, as in features_model's training); `freeze_encoder` keeps it frozen and
  in eval mode, computing exactly what precompute computes, while still streaming raw features.
- `init_checkpoint` (`--init`): a cache-trained `final_policy.pt` (its EMA weights start both
  the model and the EMA) or a `checkpoints/latest.pt` (model and EMA separately), giving the
  head, the EMA and the normalizer. It is refused, unless `allow_encoder_mismatch`, when the
  encoder it was trained on (its `cache_fingerprint`; for a finetuned one, the encoder it
  started from) is not the configured encoder: its head would be fed other features than it
  learned on. A finetuned init also hands on its encoder weights. Its model options (horizon,
  down_dims, ...) must equal the configured ones.
- The observation normalizer is FIXED while the encoder trains: taken from the init (fitted
  on cached features of this very encoder, so step 0 feeds the head exactly the inputs it was
  trained on), else fitted once, before training, on the frozen initial encoder's outputs
  over the training steps (a pass over the training data, as precompute does; each DDP rank
  does it alike). Refitting while training would move the head's inputs under it and leave
  the EMA weights paired with a normalizer they never saw; a fixed affine map after the
  encoder costs nothing in expressiveness, since the encoder's last layer can absorb any
  rescaling it needs. The action normalizer is the init's, or fitted on the training actions.
- Checkpoints: the policy holds the encoder (`policy.encoder`), so `policy_state` and the EMA
  carry the finetuned encoder; `config["encoder"]` records how to rebuild it (spec, options,
  backbone dims and order) and the fingerprint of the ORIGINAL encoder it started from;
  `config["cache_fingerprint"]` is that of the saved (EMA) encoder (see `final_config`).
- The train/validation split, window ids and actions are the cache path's (`raw_group`
  mirrors `CachedGroup`), so validation numbers are comparable with stage 1's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprgb.cache.reader import CachedGroup
from dprgb.pipeline.config import DataConfig
from dprgb.pipeline.encoders import encoder_fingerprint
from dprgb.pipeline.episodes import scan_task
from dprgb.pipeline.errors import DprgbError
from dprgb.pipeline.precompute import (
    EncoderSpec,
    PrecomputeConfig,
    encode_steps,
    encoder_spec,
    open_job_episode,
)
from dprgb.trainer import checkpoint as ckpt_io
from dprgb.trainer.config import TrainConfig
from dprgb.trainer.normalizer import LinearNormalizer
from dprgb.trainer.policy import MODEL_KEYS, DiffusionRGBPolicy, build_policy_config
from dprgb.trainer.streaming import RawGroup, StreamSource, raw_group
from dprgb.trainer.train import (
    fit_normalizer,
    run_record,
    run_training,
    split_episodes,
    training_session,
)

ENCODER_PREFIX = "encoder."


@dataclass
class InitState:
    """What `--init` provides: the checkpoint's config, model and EMA weights, normalizer."""

    path: Path
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    normalizer: dict[str, torch.Tensor]

    @property
    def origin_fingerprint(self) -> str | None:
        """The encoder its head was trained on: the cache's, or a finetuned run's start."""
        encoder = self.config.get("encoder")
        return encoder["fingerprint"] if encoder else self.config.get("cache_fingerprint")

    def encoder_state(self) -> dict[str, torch.Tensor]:
        n = len(ENCODER_PREFIX)
        return {k[n:]: v for k, v in self.model.items() if k.startswith(ENCODER_PREFIX)}


def read_init(path: str | Path) -> InitState:
    """A `final_policy.pt` or a `checkpoints/latest.pt`, loaded with weights_only=True."""
    path = Path(path)
    obj = ckpt_io.load(path, (), "checkpoint")
    if all(k in obj for k in ckpt_io.POLICY_KEYS):
        state = obj["policy_state"]
        return InitState(path, obj["config"], state, state, obj["normalizer"])
    if obj.get("format") == ckpt_io.TRAIN_STATE_FORMAT:
        model = obj["model"]
        normalizer = {k.removeprefix("normalizer."): v for k, v in model.items()
                      if k.startswith("normalizer.")}
        return InitState(path, obj["policy_config"], model, obj["ema_model"], normalizer)
    raise DprgbError("not a dprgb policy (final_policy.pt) nor a training checkpoint (latest.pt)",
                     path=path)


def check_init_encoder(init: InitState, fingerprint: str, allow_mismatch: bool) -> None:
    origin = init.origin_fingerprint
    if origin != fingerprint and not allow_mismatch:
        raise DprgbError(
            f"the init checkpoint's head was trained on features of encoder {str(origin)[:12]}, "
            f"but the encoder to finetune is {fingerprint[:12]} (another encoder, its weights or "
            "options): its head would be fed other features than it learned on; configure the "
            "same encoder, or pass --allow-encoder-mismatch (allow_encoder_mismatch: true)",
            path=init.path,
        )


def check_init_model(init: InitState, policy_config: dict[str, Any]) -> None:
    keys = ("obs_dim", "action_dim", *MODEL_KEYS)
    differ = [f"{k}={init.config.get(k)!r} (now {policy_config[k]!r})" for k in keys
              if ckpt_io.plain(init.config.get(k)) != ckpt_io.plain(policy_config[k])]
    if differ:
        raise DprgbError("the init checkpoint's head has other model options: " + ", ".join(differ)
                         + "; configure the same ones", path=init.path)


def load_head(policy: DiffusionRGBPolicy, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's head (and normalizer buffers, and encoder if it has one); a
    cache-trained state has no encoder weights, the policy keeps its own."""
    own = policy.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(ENCODER_PREFIX))
    if unexpected or missing:
        raise DprgbError(f"the init checkpoint's weights do not fit the head (unexpected "
                         f"{unexpected[:4]}, missing {missing[:4]})", path=path)
    policy.load_state_dict({**own, **state})


def encoder_record(spec: EncoderSpec, encoder: torch.nn.Module, fingerprint: str,
                   fingerprint_options: dict, cfg: TrainConfig) -> dict[str, Any]:
    """`config["encoder"]`: how `DiffusionRGBPolicy` rebuilds the encoder, and where it came from."""
    return ckpt_io.plain({
        "spec": spec.spec,
        "weights": spec.weights,
        "options": json.loads(spec.options_json),
        "backbone_dims": [[name, int(dim)] for name, dim in spec.backbone_dims],
        "backbones": list(encoder.backbones),
        "autocast": spec.autocast,
        "fingerprint": fingerprint,  # the ORIGINAL encoder, before finetuning
        "fingerprint_options": fingerprint_options,
        "trainable": not cfg.freeze_encoder,
        "init": cfg.init_checkpoint or None,
    })


def fit_raw_normalizer(encoder: torch.nn.Module, group: RawGroup, train_mask: np.ndarray,
                       cfg: TrainConfig, pc: PrecomputeConfig, spec: EncoderSpec,
                       device: torch.device) -> LinearNormalizer:
    """Obs statistics over the encoder's outputs for every training step (precompute's
    `encode_steps`, batch by batch), actions over the training actions."""
    lengths = np.diff(group.episode_ends, prepend=0)
    actions = torch.as_tensor(group.actions[np.repeat(train_mask, lengths)])  # (N_train, A)
    if cfg.obs_normalization == "identity":  # only the width is used
        obs = torch.zeros(1, encoder.out_dim).expand(len(actions), -1)
    else:
        was_training = encoder.training
        encoder.eval()
        obs = torch.from_numpy(np.concatenate([
            encode_steps(encoder, open_job_episode(group.jobs[e]), batch_frames=pc.batch_frames,
                         device=str(device), autocast=spec.autocast)
            for e in np.flatnonzero(train_mask)
        ]))  # (N_train, D), row for row with `actions`
        encoder.train(was_training)
    every_row = torch.ones(len(actions), dtype=torch.bool)
    return fit_normalizer(obs, actions, every_row, cfg.obs_normalization)


@torch.no_grad()
def encode_group(policy: DiffusionRGBPolicy, data_cfg: DataConfig, tasks: list[str], *,
                 batch_frames: int = 32) -> CachedGroup:
    """The group as a cache made by `policy.encoder` would hold it, computed in memory from raw
    features (precompute's `encode_steps`): how a finetuned policy, whose encoder no cache
    holds, is evaluated (`evaluate(checkpoint, encode_group(...))`). Its fingerprint is the
    policy's `cache_fingerprint`, so `evaluate` accepts it for this policy only."""
    group = raw_group(data_cfg, [scan_task(data_cfg, task) for task in tasks])
    device = str(policy.normalizer["obs"].scale.device)
    features = [encode_steps(policy.encoder.eval(), open_job_episode(job), batch_frames=batch_frames,
                             device=device) for job in group.jobs]
    return CachedGroup(
        tasks=group.tasks,
        features=np.concatenate(features),
        actions=group.actions,
        episode_ends=group.episode_ends,
        episode_task=group.episode_task,
        episode_index=group.episode_index,
        fingerprint=policy.config["cache_fingerprint"],
        action_layout=group.action_layout,
    )


def finetune(cfg: TrainConfig, data_cfg: DataConfig, pc: PrecomputeConfig, tasks: list[str],
             out_dir: Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Finetune mode on `tasks` (a group); returns the path of `out_dir/final_policy.pt`."""
    out_dir = Path(out_dir)
    with training_session(cfg, out_dir, resume) as (dinfo, device):
        scans = [scan_task(data_cfg, task) for task in tasks]
        group = raw_group(data_cfg, scans)
        spec = encoder_spec(data_cfg, pc, scans)
        encoder, fingerprint_options = spec.load()
        origin = encoder_fingerprint(encoder, fingerprint_options)
        # read on resume too: the run's config (and so the resume check) includes it
        init = read_init(cfg.init_checkpoint) if cfg.init_checkpoint else None
        if init is not None:
            check_init_encoder(init, origin, cfg.allow_encoder_mismatch)
            if init.encoder_state():  # a finetuned init: go on from its encoder
                encoder.load_state_dict(init.encoder_state())
        encoder = encoder.to(device).requires_grad_(not cfg.freeze_encoder)

        train_mask, val_episodes = split_episodes(group, cfg.val_episodes_per_task)
        train_rows = np.repeat(train_mask, np.diff(group.episode_ends, prepend=0))
        action_mean = torch.as_tensor(group.actions[train_rows]).mean(0)
        policy_config = {
            **build_policy_config(cfg, encoder.out_dim, group.action_dim),
            **run_record(group, val_episodes, action_mean, cfg),
            "cache_fingerprint": encoder_fingerprint(encoder, fingerprint_options),
            "encoder": encoder_record(spec, encoder, origin, fingerprint_options, cfg),
        }
        if init is not None:
            check_init_model(init, policy_config)
        policy = DiffusionRGBPolicy(policy_config, encoder=encoder).to(device)
        ema_state = None
        if init is not None:
            load_head(policy, init.model, init.path)
            policy.set_normalizer(init.normalizer)
            ema_state = {k: v.clone() for k, v in {**policy.state_dict(), **init.ema}.items()}
        elif not resume:  # (a resumed run restores its normalizer with the weights)
            normalizer = fit_raw_normalizer(encoder, group, train_mask, cfg, pc, spec, device)
            policy.set_normalizer(normalizer.state_dict())
        source = StreamSource(group, train_mask, cfg, policy.get_normalizer(), device)
        return run_training(cfg, source, policy, policy_config, out_dir, dinfo, device,
                            resume=resume, progress=progress, ema_state=ema_state)
