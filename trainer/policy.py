"""`DiffusionRGBPolicy`: the diffusion-policy head on fused observation vectors.

    obs (B, To, D) --normalize--> nobs --[obs MLP]--> flatten (B, To*E) = global cond
    noise (B, H, A) --K denoising steps of ConditionalUnet1D--> naction --unnormalize--> action

Inference, as the seed guide writes it:

    ckpt = torch.load("final_policy.pt", weights_only=True)
    policy = DiffusionRGBPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["policy_state"])
    policy.set_normalizer(ckpt["normalizer"])
    policy.eval()
    action = policy.predict_action({"obs": obs})["action"]  # (B, n_action_steps, A)

A policy can also hold the frame encoder (`policy.encoder`), so that it acts on raw feature
maps: `predict_action({"features": {backbone: (B, To, Hf, Wf, C)}})` encodes each of the To
frames (B*To, D), then goes on as for `obs`. A finetuned checkpoint holds its encoder
(`config["encoder"]` says how to rebuild it, `policy_state` has its `encoder.*` weights); a
cache-trained one gets the frozen encoder it was cached with through
`from_checkpoint(path, encoder=...)` or `set_encoder`.

The normalizer lives in the module as buffers (`normalizer.obs.scale`, ...), so `.to(device)`
moves it and `policy_state` alone already restores it; `set_normalizer` writes the same
values again (and is what a freshly built policy needs before training).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dprgb.pipeline.encoders import load_encoder
from dprgb.pipeline.errors import DprgbError
from dprgb.trainer.checkpoint import load_policy
from dprgb.trainer.config import TrainConfig
from dprgb.trainer.normalizer import LinearNormalizer
from dprgb.trainer.schedulers import DDIMScheduler, DDPMScheduler
from dprgb.trainer.unet import ConditionalUnet1D

# TrainConfig options that shape the model or its sampling; with obs_dim and action_dim they
# rebuild the policy without the training config.
MODEL_KEYS = (
    "horizon", "n_obs_steps", "n_action_steps", "down_dims", "kernel_size", "n_groups",
    "diffusion_step_embed_dim", "cond_predict_scale", "num_train_timesteps", "beta_schedule",
    "prediction_type", "clip_sample", "inference_scheduler", "num_inference_steps",
    "obs_normalization", "obs_encoder_dim",
)
NORMALIZER_FIELDS = ("obs", "action")


def build_policy_config(cfg: TrainConfig, obs_dim: int, action_dim: int) -> dict[str, Any]:
    """The model part of a checkpoint's `config`: plain JSON-able values."""
    d = cfg.to_dict()
    return {"obs_dim": int(obs_dim), "action_dim": int(action_dim), **{k: d[k] for k in MODEL_KEYS}}


class _Affine(nn.Module):
    """One normalizer field as buffers: nx = x * scale + offset, (D,) each."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))


def build_encoder(encoder_config: Mapping[str, Any]) -> nn.Module:
    """The encoder skeleton a finetuned checkpoint's `config["encoder"]` describes (its weights
    come from `policy_state`): rebuilt from the same spec and options as precompute's."""
    spec = str(encoder_config["spec"])
    try:
        encoder, _ = load_encoder(spec, backbone_dims=dict(encoder_config["backbone_dims"]),
                                  options=dict(encoder_config.get("options") or {}))
    except DprgbError as err:
        raise DprgbError(f"cannot rebuild the policy's encoder from {spec!r} ({err.problem}); pass "
                         "the encoder module: from_checkpoint(path, encoder=...)",
                         path=err.path) from None
    return encoder


def _encoder_is_frozen(encoder: nn.Module) -> bool:
    return not any(p.requires_grad for p in encoder.parameters())


class DiffusionRGBPolicy(nn.Module):
    def __init__(self, config: Mapping[str, Any], encoder: nn.Module | None = None):
        """`encoder`: the frame encoder to hold (finetune). Without it, a config with an
        "encoder" entry (a finetuned checkpoint's) rebuilds one; otherwise there is none."""
        super().__init__()
        for key in ("obs_dim", "action_dim"):
            value = config.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DprgbError(f"policy config needs a positive int {key}: {key}={value!r}")
        # Validate and default the model options with the training config's own rules.
        cfg = TrainConfig.from_mapping({k: config[k] for k in MODEL_KEYS if k in config})
        self.config: dict[str, Any] = {**dict(config), **build_policy_config(
            cfg, config["obs_dim"], config["action_dim"])}
        self.obs_dim, self.action_dim = int(config["obs_dim"]), int(config["action_dim"])
        self.horizon, self.n_obs_steps = cfg.horizon, cfg.n_obs_steps
        self.n_action_steps = cfg.n_action_steps
        self.prediction_type = cfg.prediction_type
        self.inference_scheduler = cfg.inference_scheduler
        self.num_inference_steps = cfg.num_inference_steps

        enc = cfg.obs_encoder_dim
        self.obs_encoder = (
            nn.Sequential(nn.Linear(self.obs_dim, enc), nn.Mish(), nn.Linear(enc, enc))
            if enc else nn.Identity()
        )
        self.model = ConditionalUnet1D(
            input_dim=self.action_dim,
            global_cond_dim=cfg.n_obs_steps * (enc or self.obs_dim),
            diffusion_step_embed_dim=cfg.diffusion_step_embed_dim,
            down_dims=cfg.down_dims,
            kernel_size=cfg.kernel_size,
            n_groups=cfg.n_groups,
            cond_predict_scale=cfg.cond_predict_scale,
        )
        self.normalizer = nn.ModuleDict(
            {"obs": _Affine(self.obs_dim), "action": _Affine(self.action_dim)}
        )
        sched = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                     clip_sample=cfg.clip_sample, prediction_type=cfg.prediction_type)
        self.noise_scheduler = DDPMScheduler(**sched)  # training: the forward process
        self.schedulers = {"ddpm": self.noise_scheduler, "ddim": DDIMScheduler(**sched)}
        self.register_module("encoder", None)
        if encoder is None and config.get("encoder") is not None:
            encoder = build_encoder(config["encoder"])
        if encoder is not None:
            self._attach(encoder)

    # ---- the frame encoder ----------------------------------------------------------------

    def _attach(self, encoder: nn.Module) -> None:
        out_dim = getattr(encoder, "out_dim", None)
        if out_dim != self.obs_dim:
            raise DprgbError(f"the encoder gives {out_dim}-dim vectors; the policy takes "
                             f"obs_dim={self.obs_dim}")
        self.encoder = encoder

    def set_encoder(self, encoder: nn.Module) -> DiffusionRGBPolicy:
        """Attach the frozen encoder whose outputs this head was trained on (a cache-trained
        policy), so that `predict_action` accepts raw features. The caller vouches that it is
        the encoder the cache was built with (`config["cache_fingerprint"]`)."""
        self._attach(encoder.requires_grad_(False).eval())
        ref = self.normalizer["obs"].scale
        encoder.to(ref.device)
        return self

    def train(self, mode: bool = True) -> DiffusionRGBPolicy:
        super().train(mode)
        if self.encoder is not None and _encoder_is_frozen(self.encoder):
            self.encoder.eval()  # a frozen encoder computes as in precompute (no dropout)
        return self

    def encode(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{backbone: (N, Hf, Wf, C)} raw feature maps -> (N, D) observation vectors, in data
        units (not normalized). Maps are cast to float32 as precompute does."""
        if self.encoder is None:
            raise DprgbError("this policy has no encoder: load it with "
                             "DiffusionRGBPolicy.from_checkpoint(path, encoder=...) or set_encoder")
        return self.encoder({name: x.float() for name, x in features.items()})

    def observe(self, frames: Mapping[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """A finetune batch -> nobs (B, To, D): every distinct frame encoded once (U, D), then
        each window's To frames picked by `index` (B, To) rows of U, then normalized."""
        obs = self.encode(frames)[index]  # (U, D) -> (B, To, D)
        return self.get_normalizer().normalize("obs", obs)

    def nobs_from(self, obs: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
        """The head's input (B, To, D), normalized. A tensor is already that (cache mode:
        gathered from the normalized cache); {"frames", "index"} is a raw finetune batch."""
        if isinstance(obs, torch.Tensor):
            return obs
        return self.observe(obs["frames"], obs["index"])

    # ---- normalization ------------------------------------------------------------------

    def set_normalizer(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a flat {"obs.scale", "obs.offset", "action.scale", "action.offset"} dict."""
        try:
            norm = LinearNormalizer.from_state_dict(dict(state))
        except ValueError as e:
            raise DprgbError(f"bad normalizer state: {e}") from None
        if set(norm.fields) != set(NORMALIZER_FIELDS):
            raise DprgbError(
                f"normalizer must have fields {NORMALIZER_FIELDS}, got {sorted(norm.fields)}"
            )
        for name, module in self.normalizer.items():
            for key in ("scale", "offset"):
                value, buf = norm[name][key], getattr(module, key)
                if value.shape != buf.shape:
                    raise DprgbError(
                        f"normalizer {name}.{key} has shape {tuple(value.shape)}, "
                        f"the policy expects {tuple(buf.shape)}"
                    )
                with torch.no_grad():
                    buf.copy_(value)

    def get_normalizer(self) -> LinearNormalizer:
        """A view of the buffers (no copy) with the normalize/unnormalize API."""
        return LinearNormalizer(
            {name: {"scale": m.scale, "offset": m.offset} for name, m in self.normalizer.items()}
        )

    def normalizer_state(self) -> dict[str, torch.Tensor]:
        return self.get_normalizer().state_dict()

    # ---- training -----------------------------------------------------------------------

    def global_cond(self, nobs: torch.Tensor) -> torch.Tensor:
        """nobs (B, To, D) -> (B, To * E): per-step encoder (if any), then flatten."""
        return self.obs_encoder(nobs).flatten(1)

    def forward(self, obs: torch.Tensor | Mapping[str, Any], naction: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss; `forward` so that DDP and torch.compile wrap it (and DDP sees the
        encoder's gradients in finetune mode). obs: see `nobs_from`."""
        return self.compute_loss(self.nobs_from(obs), naction, generator=generator)

    def compute_loss(self, nobs: torch.Tensor, naction: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoising MSE on normalized data: nobs (B, To, D), naction (B, H, A) -> scalar.

        Noise and timesteps are drawn from `generator` (on its own device, so a run on one
        device draws the same stream every time) or from the global RNG.
        """
        B = naction.shape[0]
        device = generator.device if generator is not None else naction.device
        noise = torch.randn(naction.shape, generator=generator, device=device).to(naction.device)
        timesteps = torch.randint(0, self.noise_scheduler.num_train_timesteps, (B,),
                                  generator=generator, device=device).to(naction.device)
        noisy = self.noise_scheduler.add_noise(naction, noise, timesteps)  # (B, H, A)
        pred = self.model(noisy, timesteps, self.global_cond(nobs))  # (B, H, A)
        target = noise if self.prediction_type == "epsilon" else naction
        return F.mse_loss(pred.float(), target.float())

    # ---- inference ----------------------------------------------------------------------

    @torch.no_grad()
    def conditional_sample(self, nobs: torch.Tensor, *, num_inference_steps: int | None = None,
                           scheduler: str | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """nobs (B, To, D) -> sampled normalized action chunk (B, H, A)."""
        kind = scheduler or self.inference_scheduler
        if kind not in self.schedulers:
            raise DprgbError(f"scheduler must be one of {tuple(self.schedulers)}, got {kind!r}")
        sched = self.schedulers[kind]
        if num_inference_steps is None:
            # DDIM uses the configured few steps; DDPM, ancestral sampling, needs all of them.
            num_inference_steps = (self.num_inference_steps if kind == "ddim"
                                   else sched.num_train_timesteps)
        if not 1 <= num_inference_steps <= sched.num_train_timesteps:
            raise DprgbError(
                f"num_inference_steps must be in [1, {sched.num_train_timesteps}], "
                f"got {num_inference_steps=}"
            )
        sched.set_timesteps(num_inference_steps)  # CPU timesteps: stepping never syncs
        cond = self.global_cond(nobs)  # (B, To * E)
        shape = (nobs.shape[0], self.horizon, self.action_dim)
        noise_device = generator.device if generator is not None else nobs.device
        x = torch.randn(shape, generator=generator, device=noise_device).to(nobs.device)
        for t in sched.timesteps:
            t_batch = t.to(nobs.device).expand(shape[0])  # (B,)
            x = sched.step(self.model(x, t_batch, cond), t, x, generator=generator).prev_sample
        return x

    @torch.no_grad()
    def predict_action(self, obs_dict: Mapping[str, torch.Tensor], *,
                       num_inference_steps: int | None = None, scheduler: str | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{"obs": (B, To, D)} in data units -> {"action": (B, Ta, A), "action_pred": (B, H, A)}.

        Or {"features": {backbone: (B, To, Hf, Wf, C)}}, raw feature maps of the To latest
        frames, with an encoder (`self.encoder`). The executed actions start at index To - 1,
        the step of the latest observation.
        """
        ref = self.normalizer["obs"].scale
        if "features" in obs_dict and "obs" not in obs_dict:
            obs = self._encode_windows(obs_dict["features"])
        else:
            obs = torch.as_tensor(obs_dict["obs"]).to(device=ref.device, dtype=ref.dtype)
        if obs.ndim != 3 or obs.shape[1:] != (self.n_obs_steps, self.obs_dim):
            raise DprgbError(
                f"obs must have shape (B, n_obs_steps={self.n_obs_steps}, obs_dim={self.obs_dim}),"
                f" got {tuple(obs.shape)}"
            )
        norm = self.get_normalizer()
        naction = self.conditional_sample(
            norm.normalize("obs", obs), num_inference_steps=num_inference_steps,
            scheduler=scheduler, generator=generator,
        )
        action_pred = norm.unnormalize("action", naction)  # (B, H, A)
        start = self.n_obs_steps - 1
        action = action_pred[:, start:start + self.n_action_steps]  # (B, Ta, A)
        return {"action": action, "action_pred": action_pred}

    def _encode_windows(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{backbone: (B, To, Hf, Wf, C)} -> (B, To, D) in data units."""
        ref = self.normalizer["obs"].scale
        flat, batch = {}, None
        for name, x in features.items():
            x = torch.as_tensor(x).to(ref.device)
            if x.ndim != 5 or x.shape[1] != self.n_obs_steps or (batch is not None and x.shape[0] != batch):
                raise DprgbError(f"features[{name!r}] must have shape (B, n_obs_steps="
                                 f"{self.n_obs_steps}, Hf, Wf, C) like the others, got {tuple(x.shape)}")
            batch = x.shape[0]
            flat[name] = x.reshape(-1, *x.shape[2:])  # (B*To, Hf, Wf, C)
        obs = self.encode(flat)  # (B*To, D)
        return obs.reshape(batch, self.n_obs_steps, -1).to(ref.dtype)  # (B, To, D)

    # ---- checkpoints --------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", *,
                        encoder: nn.Module | None = None) -> DiffusionRGBPolicy:
        """Rebuild from a `final_policy.pt` (loaded with weights_only=True), in eval mode.

        encoder: for a finetuned checkpoint, the module its encoder weights load into (default:
        rebuilt from `config["encoder"]`); for a cache-trained one, the frozen encoder the cache
        was built with, attached as is, so that `predict_action` accepts raw features.
        """
        ckpt = load_policy(Path(path))
        finetuned = ckpt["config"].get("encoder") is not None
        policy = cls(ckpt["config"], encoder=encoder if finetuned else None)
        policy.load_state_dict(ckpt["policy_state"])
        policy.set_normalizer(ckpt["normalizer"])
        if encoder is not None and not finetuned:
            policy.set_encoder(encoder)
        return policy.to(device).eval()
