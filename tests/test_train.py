"""The training loop on a tiny synthetic group: it learns, it resumes exactly, DDP runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dprgb.cache.reader import CachedGroup
from dprgb.errors import DprgbError
from dprgb.trainer.config import TrainConfig
from dprgb.trainer.evaluate import evaluate
from dprgb.trainer.policy import DiffusionRGBPolicy
from dprgb.trainer.train import ema_decay, split_episodes, train

REPO = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("DPRGB_TEST_DEVICE", "cpu")  # "cuda" to run these on a GPU



def make_group(n_tasks=2, n_episodes=4, steps=40, obs_dim=16, action_dim=7, seed=0) -> CachedGroup:
    """Actions are a smooth function of a hidden per-episode state (amplitude, phase) that the
    features encode linearly (plus a task one-hot), so the next actions are predictable."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(2 + n_tasks, obs_dim)) / np.sqrt(2 + n_tasks)  # latent -> features
    joint_phase = rng.uniform(0, np.pi, size=action_dim)
    task_offset = rng.normal(scale=0.5, size=(n_tasks, action_dim))
    omega = 0.15
    feats, acts, task_of, index_of = [], [], [], []
    for task in range(n_tasks):
        for ep in range(n_episodes):
            amp, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
            angle = omega * np.arange(steps) + phase  # (T,)
            latent = np.concatenate([amp * np.sin(angle)[:, None], amp * np.cos(angle)[:, None],
                                     np.tile(np.eye(n_tasks)[task], (steps, 1))], axis=1)
            feats.append(latent @ mix + rng.normal(scale=0.01, size=(steps, obs_dim)))
            acts.append(amp * np.sin(angle[:, None] + omega + joint_phase) + task_offset[task])
            task_of.append(task)
            index_of.append(ep)
    return CachedGroup(
        tasks=[f"task_{i}" for i in range(n_tasks)],
        features=np.concatenate(feats).astype(np.float32),
        actions=np.concatenate(acts).astype(np.float32),
        episode_ends=np.cumsum([steps] * n_tasks * n_episodes).astype(np.int64),
        episode_task=np.asarray(task_of, dtype=np.int64),
        episode_index=np.asarray(index_of, dtype=np.int64),
        fingerprint="synthetic-0",
        action_layout={"arms": 1, "dofs": [action_dim - 1], "gripper": True},
    )


def tiny_config(**overrides) -> TrainConfig:
    base = dict(down_dims=(16, 32), diffusion_step_embed_dim=16, batch_size=64, lr=3e-3,
                lr_warmup_steps=10, epochs=4, log_every_steps=5, val_every_epochs=1000,
                device=DEVICE)
    return TrainConfig(**{**base, **overrides})


def test_learns_better_than_the_mean_action(tmp_path):
    group = make_group()
    # 2 x 3 training episodes x 33 windows = 198 windows, batch 64: 3 steps an epoch
    cfg = tiny_config(epochs=100, prediction_type="sample", val_every_epochs=50)
    path = train(cfg, group, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_action_mse" in r]
    assert [r["step"] for r in val] == [150, 300]
    per_task = [val[-1][f"val_action_mse_raw/task_{i}"] for i in range(2)]  # validation per task
    assert min(per_task) <= val[-1]["val_action_mse_raw"] <= max(per_task)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert train_losses[-1] < 0.2 * train_losses[0]

    result = evaluate(path, group, plot_dir=tmp_path / "plots")
    assert set(result["tasks"]) == {"task_0", "task_1"}
    for task, r in result["tasks"].items():
        # measured ~0.27 and ~0.03; the mean-action baseline is 1 by definition
        assert r["ratio"] < 0.5, (task, r)
        assert r["episodes"] == [3] and r["windows"] == 40 - 7
        assert len(r["mse_per_joint"]) == len(r["baseline_mse_per_joint"]) == 7
        assert np.isclose(np.mean(r["mse_per_joint"]), r["mse"])
        assert (tmp_path / "plots" / f"{task}.png").stat().st_size > 1000


@pytest.mark.parametrize("split_step,accum", [(12, 1), (13, 2)])
def test_resume_continues_exactly(tmp_path, split_step, accum, monkeypatch):
    """N steps straight == N/2 steps, a fresh train(resume=True), the rest (also mid-epoch)."""
    # (on CUDA, two identical runs agree only with deterministic convolution kernels)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    group = make_group()
    # 198 windows, batch 32: 6 micro-batches, 6 // accum optimizer steps an epoch
    cfg = tiny_config(epochs=24 // (6 // accum), batch_size=32, grad_accum_steps=accum,
                      checkpoint_every_epochs=1)
    train(cfg, group, tmp_path / "straight", progress=False)
    cut = TrainConfig(**{**cfg.to_dict(), "max_steps": split_step})
    train(cut, group, tmp_path / "split", progress=False)
    assert torch.load(tmp_path / "split/checkpoints/latest.pt", weights_only=True)["step"] == split_step
    with pytest.raises(DprgbError, match="batch_size=32"):
        train(TrainConfig(**{**cfg.to_dict(), "batch_size": 16}), group, tmp_path / "split",
              resume=True, progress=False)
    train(cfg, group, tmp_path / "split", resume=True, progress=False)

    a = torch.load(tmp_path / "straight/checkpoints/latest.pt", weights_only=True)
    b = torch.load(tmp_path / "split/checkpoints/latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 24
    for key in ("model", "ema_model"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, atol=1e-6, rtol=0, msg=name)
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                        strict=True):
        torch.testing.assert_close(s_b["exp_avg_sq"], s_a["exp_avg_sq"], atol=1e-6, rtol=0)
    assert torch.equal(a["rng"]["generators"]["noise"], b["rng"]["generators"]["noise"])
    losses = {d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").open()
                  if '"loss"' in x] for d in ("straight", "split")}
    assert losses["straight"][-1] == pytest.approx(losses["split"][-1], rel=1e-5)


def test_final_policy_is_plain_data(tmp_path):
    group = make_group()
    # wandb (offline) and TensorBoard log too where installed, and are skipped where not
    path = train(tiny_config(epochs=2, wandb=True, tensorboard=True), group, tmp_path,
                 progress=False)
    assert path == tmp_path / "final_policy.pt"
    ckpt = torch.load(path, weights_only=True)
    assert {"config", "policy_state", "normalizer"} <= set(ckpt)
    config = ckpt["config"]
    for key in ("obs_dim", "action_dim", "horizon", "n_obs_steps", "n_action_steps", "down_dims",
                "num_train_timesteps", "beta_schedule", "obs_encoder_dim", "tasks",
                "cache_fingerprint", "action_layout", "val_episodes", "train_action_mean"):
        assert key in config, key
    assert config["val_episodes"] == [["task_0", 3], ["task_1", 3]]
    assert config["cache_fingerprint"] == "synthetic-0"
    assert set(ckpt["normalizer"]) == {"obs.scale", "obs.offset", "action.scale", "action.offset"}
    # the seed guide's inference snippet
    policy = DiffusionRGBPolicy(ckpt["config"])
    policy.load_state_dict(ckpt["policy_state"])
    policy.set_normalizer(ckpt["normalizer"])
    policy.eval()
    action = policy.predict_action({"obs": torch.as_tensor(group.features[:2])[None]})["action"]
    assert action.shape == (1, 8, 7) and torch.isfinite(action).all()
    assert yaml_config(tmp_path)["epochs"] == 2
    assert (tmp_path / "checkpoints" / "latest.pt").is_file()


def yaml_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_normalizer_fit_on_training_episodes_only(tmp_path):
    group = make_group()
    group.actions[group.episode_ends[2]:group.episode_ends[3]] += 100.0  # a held-out episode
    path = train(tiny_config(epochs=1), group, tmp_path, progress=False)
    norm = torch.load(path, weights_only=True)["normalizer"]
    train_rows = np.repeat(split_episodes(group, 1)[0], np.diff(group.episode_ends, prepend=0))
    hi = group.actions[train_rows].max(0)
    lo = group.actions[train_rows].min(0)
    torch.testing.assert_close(norm["action.scale"], torch.as_tensor(2 / (hi - lo)))


def test_split_episodes_holds_out_the_last_by_index():
    group = make_group(n_tasks=2, n_episodes=3)
    group.episode_index = np.array([5, 2, 9, 0, 1, 2])
    group.episode_task = np.array([0, 0, 0, 1, 1, 0])  # task 0 has indices 5, 2, 9, 2
    train_mask, val = split_episodes(group, 1)
    assert val.tolist() == [2, 4] and train_mask.tolist() == [True, True, False, True, False, True]
    assert split_episodes(group, 2)[1].tolist() == [0, 2]  # task 1 has only 2 episodes
    assert split_episodes(group, 0)[1].tolist() == []


def test_config_validation_echoes_values():
    with pytest.raises(DprgbError, match=r"self.horizon=10"):
        TrainConfig(horizon=10)
    with pytest.raises(DprgbError, match=r"self.n_action_steps=16"):
        TrainConfig(n_action_steps=16)
    with pytest.raises(DprgbError, match=r"obs_normalization='zscore'"):
        TrainConfig(obs_normalization="zscore")
    with pytest.raises(DprgbError, match=r"batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(DprgbError, match=r"epochs='10'"):
        TrainConfig(epochs="10")
    TrainConfig(horizon=8, n_action_steps=4, down_dims=(16, 32, 64, 128))  # 8 % 2**3 == 0
    cfg = TrainConfig.from_mapping({"lr": "1e-4", "down_dims": [64, 128], "tasks": ["x"]})
    assert cfg.lr == 1e-4 and cfg.down_dims == (64, 128)
    assert TrainConfig.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_ema_decay_warmup():
    cfg = TrainConfig()
    assert ema_decay(0, cfg) == 0.0 and ema_decay(1, cfg) == 0.0
    assert ema_decay(2, cfg) == pytest.approx(1 - 2 ** -0.75)
    assert ema_decay(10**9, cfg) == cfg.ema_max_decay


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from dprgb.cache.reader import CachedGroup
    from dprgb.trainer.config import TrainConfig
    from dprgb.trainer.train import train

    torch.set_num_threads(1)
    z = np.load(sys.argv[1])
    group = CachedGroup(tasks=["task_0", "task_1"], features=z["features"],
                        actions=z["actions"], episode_ends=z["episode_ends"],
                        episode_task=z["episode_task"], episode_index=z["episode_index"],
                        fingerprint="synthetic-0", action_layout={})
    cfg = TrainConfig(down_dims=(16, 32), diffusion_step_embed_dim=16, batch_size=32, epochs=2,
                      lr_warmup_steps=2, log_every_steps=2, device="cpu")
    train(cfg, group, sys.argv[2], progress=False)
""")


def test_ddp_two_processes_on_cpu(tmp_path):
    group = make_group()
    np.savez(tmp_path / "group.npz", features=group.features, actions=group.actions,
             episode_ends=group.episode_ends, episode_task=group.episode_task,
             episode_index=group.episode_index)
    (tmp_path / "ddp_train.py").write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "ddp_train.py"), str(tmp_path / "group.npz"), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "final_policy.pt", weights_only=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2 * 6 and len(state["rng"]["noise_per_rank"]) == 2
    assert ckpt["config"]["obs_dim"] == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast, compile)")
def test_amp_and_compile_on_cuda(tmp_path):
    group = make_group()
    cfg = tiny_config(epochs=3, device="cuda", amp=True, compile=True, val_every_epochs=3)
    path = train(cfg, group, tmp_path, progress=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r.get("loss", 0.0)) for r in records)
    assert any("val_action_mse" in r for r in records)
    policy = DiffusionRGBPolicy.from_checkpoint(path, device="cuda")
    obs = torch.as_tensor(group.features[:2])[None].cuda()
    assert policy.predict_action({"obs": obs})["action"].device.type == "cuda"
