"""Golden regression outputs: fixed-seed numbers from the model, schedulers, policy and cache.

Each case below is a function that returns {name: numpy array}, computed from fixed seeds and
nothing else. `main()` saves them as tests/golden/<case>.npz; tests/test_golden.py imports the
same functions, recomputes the arrays and compares them with the saved ones, so a refactor
that changes any number (or a name, or a shape) fails that test. dprgb is imported inside
each case, so an API that moves breaks only the cases that use it.

Regenerate (only when a change of numbers is intended):  python tests/golden/make_golden.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).resolve().parent
CACHE_TASKS = (
    "shake_bottle-demo_randomized-10_head_camera",
    "beat_block_hammer-demo_randomized-10_head_camera",
)


def unet() -> dict[str, np.ndarray]:
    """ConditionalUnet1D forward pass with seeded weights and inputs."""
    from dprgb.trainer.unet import ConditionalUnet1D

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ConditionalUnet1D(input_dim=4, global_cond_dim=12, diffusion_step_embed_dim=16,
                              down_dims=(16, 32), kernel_size=3, n_groups=4, cond_predict_scale=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 4, generator=g)
    cond = torch.randn(2, 12, generator=g)
    with torch.no_grad():
        out = model(x, torch.tensor([3, 57]), global_cond=cond)
    return {"output": out.numpy()}


def _sample_loop(scheduler, num_inference_steps: int) -> np.ndarray:
    """A full sampling loop with a fixed stand-in model: eps(x, t) = 0.5 x + 0.1 t / 100."""
    x = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(2))
    step_generator = torch.Generator().manual_seed(3)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_output = 0.5 * x + 0.1 * (float(t) / 100)
        x = scheduler.step(model_output, t, x, generator=step_generator).prev_sample
    return x.numpy()


SCHEDULER_OPTIONS = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def ddpm() -> dict[str, np.ndarray]:
    """DDPM, all 100 steps, for both prediction types."""
    from dprgb.trainer.schedulers import DDPMScheduler

    torch.set_num_threads(1)
    return {kind: _sample_loop(DDPMScheduler(**SCHEDULER_OPTIONS, prediction_type=kind), 100)
            for kind in ("epsilon", "sample")}


def ddim() -> dict[str, np.ndarray]:
    """DDIM (eta = 0), 10 inference steps, for both prediction types."""
    from dprgb.trainer.schedulers import DDIMScheduler

    torch.set_num_threads(1)
    return {kind: _sample_loop(DDIMScheduler(**SCHEDULER_OPTIONS, prediction_type=kind), 10)
            for kind in ("epsilon", "sample")}


def tiny_policy():
    """A small DiffusionRGBPolicy with seeded weights and a fixed normalizer, in eval mode.

    The one place that knows how a policy is built: adapt this if construction changes."""
    from dprgb.trainer.config import ModelConfig
    from dprgb.trainer.policy import DiffusionRGBPolicy, policy_config

    torch.manual_seed(0)
    model = ModelConfig(horizon=8, n_obs_steps=2, n_action_steps=4, down_dims=(16, 32), kernel_size=3,
                        n_groups=4, diffusion_step_embed_dim=16, obs_encoder_dim=0,
                        prediction_type="epsilon", inference_scheduler="ddim", num_inference_steps=5)
    policy = DiffusionRGBPolicy(policy_config(model, obs_dim=6, action_dim=3))
    policy.set_normalizer({
        "obs.scale": torch.linspace(0.5, 2.0, 6),
        "obs.offset": torch.linspace(-0.3, 0.3, 6),
        "action.scale": torch.linspace(0.8, 1.5, 3),
        "action.offset": torch.linspace(-0.2, 0.1, 3),
    })
    return policy.eval()


def policy() -> dict[str, np.ndarray]:
    """predict_action with the configured DDIM (5 steps) and with DDPM (all 100 steps)."""
    torch.set_num_threads(1)
    model = tiny_policy()
    obs = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(5))
    out = {}
    for kind in ("ddim", "ddpm"):
        pred = model.predict_action({"obs": obs}, scheduler=kind, generator=torch.Generator().manual_seed(4))
        out[f"{kind}/action"] = pred["action"].numpy()
        out[f"{kind}/action_pred"] = pred["action_pred"].numpy()
    return out


def precompute_demo(tmp_dir: Path) -> Path:
    """Write a small demo data set under tmp_dir and precompute CACHE_TASKS (reference encoder,
    default options, one worker); returns the cache folder.

    The one place that knows how a precompute is run: adapt this if that API changes."""
    from dprgb import app
    from dprgb.pipeline.config import PrecomputeConfig
    from dprgb.pipeline.demo_data import DemoSpec, write_demo_data

    config_path = write_demo_data(Path(tmp_dir) / "data", DemoSpec(episodes=2, min_frames=10, max_frames=12))
    settings = app.load_settings(config_path, overrides={"precompute_workers": 1, "device": "cpu"})
    app.precompute(settings, list(CACHE_TASKS))
    return settings.get(PrecomputeConfig).cache_dir


def cache(tmp_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Every cached episode's features, actions and steps, keyed "<task>/<episode>/<name>"."""
    from dprgb.cache import open_cache

    if tmp_dir is None:
        with tempfile.TemporaryDirectory() as scratch:
            return cache(Path(scratch))
    torch.set_num_threads(1)
    out = {}
    for record in open_cache(precompute_demo(tmp_dir)).episodes():
        for name in ("features", "actions", "steps"):
            out[f"{record.task}/{record.episode}/{name}"] = np.asarray(getattr(record, name))
    return out


CASES: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "unet": unet, "ddpm": ddpm, "ddim": ddim, "policy": policy, "cache": cache,
}


def main() -> None:
    for name, make in CASES.items():
        arrays = make()
        path = GOLDEN_DIR / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {len(arrays)} arrays, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
