"""DiffusionRGBPolicy: the seed's inference snippet, shapes, schedulers, normalizer buffers."""

from __future__ import annotations

import pytest
import torch

from dprgb.errors import DprgbError
from dprgb.trainer.checkpoint import save_policy
from dprgb.trainer.normalizer import LinearNormalizer, fit_minmax
from dprgb.trainer.policy import DiffusionRGBPolicy

D, A = 12, 5
CONFIG = {"obs_dim": D, "action_dim": A, "horizon": 8, "n_obs_steps": 3, "n_action_steps": 4,
          "down_dims": [16, 32], "diffusion_step_embed_dim": 16, "num_inference_steps": 4}



def make_normalizer(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return LinearNormalizer({
        "obs": fit_minmax(torch.randn(100, D, generator=g) * 3 + 1),
        "action": fit_minmax(torch.rand(100, A, generator=g) * 10 - 2),
    }).state_dict()


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    policy = DiffusionRGBPolicy({**CONFIG, "tasks": ["t"], "cache_fingerprint": "abc"})
    path = tmp_path / "final_policy.pt"
    save_policy(path, config=policy.config, policy_state=policy.state_dict(),
                normalizer=make_normalizer())
    return path


def test_seed_usage_and_from_checkpoint(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    policy = DiffusionRGBPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["policy_state"])
    policy.set_normalizer(ckpt["normalizer"])
    policy.eval()
    obs = torch.randn(2, 3, D)
    action = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1))["action"]

    loaded = DiffusionRGBPolicy.from_checkpoint(checkpoint)
    assert not loaded.training
    again = loaded.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["action"], action)
    for key, value in make_normalizer().items():
        field, name = key.split(".")
        torch.testing.assert_close(getattr(loaded.normalizer[field], name), value)


def test_policy_state_alone_restores_the_normalizer(checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    policy = DiffusionRGBPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["policy_state"])  # normalizer buffers are in policy_state
    assert policy.normalizer_state().keys() == ckpt["normalizer"].keys()


def test_shapes_and_executed_slice():
    policy = DiffusionRGBPolicy(CONFIG).eval()
    policy.set_normalizer(make_normalizer())
    out = policy.predict_action({"obs": torch.randn(4, 3, D)})
    assert out["action_pred"].shape == (4, 8, A)
    assert out["action"].shape == (4, 4, A)
    # executed actions start at the latest observation, index To - 1 = 2
    torch.testing.assert_close(out["action"], out["action_pred"][:, 2:6])
    with pytest.raises(DprgbError, match="n_obs_steps=3"):
        policy.predict_action({"obs": torch.randn(4, 2, D)})


def test_samples_stay_in_the_action_range():
    policy = DiffusionRGBPolicy(CONFIG).eval()
    state = make_normalizer()
    policy.set_normalizer(state)
    out = policy.predict_action({"obs": torch.randn(16, 3, D)})["action_pred"]
    # clip_sample keeps x0 in [-1, 1], the normalized image of [min, max] = [-2, 8]
    lo = (-1 - state["action.offset"]) / state["action.scale"]
    hi = (1 - state["action.offset"]) / state["action.scale"]
    assert (out >= lo - 1e-4).all() and (out <= hi + 1e-4).all()


def test_ddim_and_ddpm_options():
    policy = DiffusionRGBPolicy(CONFIG).eval()
    obs = torch.randn(2, 3, D)
    calls = []
    policy.model.register_forward_hook(lambda *_: calls.append(1))

    def run(**kw):
        calls.clear()
        out = policy.predict_action({"obs": obs}, generator=torch.Generator().manual_seed(0), **kw)
        return out["action"], len(calls)

    ddim, n_ddim = run()
    assert n_ddim == 4  # config num_inference_steps
    ddim2, _ = run()
    torch.testing.assert_close(ddim, ddim2)  # seeded: reproducible
    assert run(num_inference_steps=2)[1] == 2
    ddpm, n_ddpm = run(scheduler="ddpm")
    assert n_ddpm == 100  # ancestral sampling uses every training step by default
    assert not torch.allclose(ddim, ddpm)
    assert run(scheduler="ddpm", num_inference_steps=10)[1] == 10
    with pytest.raises(DprgbError, match="scheduler"):
        run(scheduler="euler")
    cfg_ddpm = DiffusionRGBPolicy({**CONFIG, "inference_scheduler": "ddpm"}).eval()
    assert cfg_ddpm.inference_scheduler == "ddpm"


def test_normalizer_buffers_move_with_to():
    policy = DiffusionRGBPolicy(CONFIG)
    policy.set_normalizer(make_normalizer())
    names = {name for name, _ in policy.named_buffers()}
    assert {"normalizer.obs.scale", "normalizer.action.offset"} <= names
    policy = policy.to(torch.float64)
    assert policy.normalizer["obs"].scale.dtype == torch.float64
    if torch.cuda.is_available():
        policy = policy.float().to("cuda")
        assert policy.normalizer["action"].offset.device.type == "cuda"
        out = policy.predict_action({"obs": torch.randn(2, 3, D)})  # CPU obs are moved
        assert out["action"].device.type == "cuda"


def test_loss_and_obs_encoder():
    policy = DiffusionRGBPolicy({**CONFIG, "obs_encoder_dim": 8})
    assert policy.model.diffusion_step_encoder is not None
    g = torch.Generator().manual_seed(0)
    nobs, naction = torch.randn(4, 3, D), torch.randn(4, 8, A)
    loss = policy.compute_loss(nobs, naction, generator=g)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert policy.obs_encoder[0].weight.grad is not None
    # global cond = To x encoder dim
    assert policy.global_cond(nobs).shape == (4, 3 * 8)


def test_bad_configs_and_normalizers():
    with pytest.raises(DprgbError, match="obs_dim"):
        DiffusionRGBPolicy({"action_dim": 3})
    with pytest.raises(DprgbError, match="horizon"):
        DiffusionRGBPolicy({**CONFIG, "horizon": 7})
    policy = DiffusionRGBPolicy(CONFIG)
    bad = make_normalizer()
    bad["obs.scale"] = torch.ones(D + 1)
    with pytest.raises(DprgbError, match="shape"):
        policy.set_normalizer(bad)
    with pytest.raises(DprgbError, match="fields"):
        policy.set_normalizer({"obs.scale": torch.ones(D), "obs.offset": torch.zeros(D)})
    with pytest.raises(DprgbError, match="no policy checkpoint"):
        DiffusionRGBPolicy.from_checkpoint("/nonexistent/final_policy.pt")


class OracleDenoiser(torch.nn.Module):
    """Predicts the exact noise (or sample) that leads to a known clean chunk."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.target, self.abar, self.prediction_type = target, alphas_cumprod, prediction_type

    def forward(self, x, timesteps, global_cond):
        if self.prediction_type == "sample":
            return self.target.expand_as(x)
        abar = self.abar[timesteps.long()].reshape(-1, 1, 1)
        return (x - abar.sqrt() * self.target) / (1 - abar).sqrt()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("scheduler,steps", [("ddim", 4), ("ddim", 10), ("ddpm", None)])
def test_sampling_loop_recovers_what_an_oracle_predicts(prediction_type, scheduler, steps):
    policy = DiffusionRGBPolicy({**CONFIG, "prediction_type": prediction_type}).eval()
    policy.set_normalizer(make_normalizer())
    target = torch.rand(1, 8, A) * 1.6 - 0.8  # a normalized chunk inside the clip range
    policy.model = OracleDenoiser(target, policy.noise_scheduler.alphas_cumprod, prediction_type)
    out = policy.predict_action({"obs": torch.randn(3, 3, D)}, scheduler=scheduler,
                                num_inference_steps=steps,
                                generator=torch.Generator().manual_seed(0))
    expected = policy.get_normalizer().unnormalize("action", target).expand(3, -1, -1)
    torch.testing.assert_close(out["action_pred"], expected, atol=1e-4, rtol=1e-4)
