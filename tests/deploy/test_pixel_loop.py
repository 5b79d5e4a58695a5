"""A tiny pixel loop end to end, as CI runs it: Meta-World renders the camera, scripted-expert
episodes are recorded as RoboTwin HDF5 (JPEG frames), `dprgb extract` makes their feature stores,
precompute and train a tiny policy, `dprgb rollout --extractor` acts on live frames. And the
invariant the loop rests on: replaying a recorded episode in the simulator, the features the
runtime computes live from the rendered frames are the stored ones, step for step (within the
store's float16 rounding); the raw rendering (no JPEG, as the recording has) is caught."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dprgb.deploy.metaworld import EVAL_SEED, MetaWorldEnv, PixelSpec, make_env
from dprgb.deploy.metaworld_demos import write_expert_demos, write_rgb_config
from dprgb.deploy.parity import store_tolerance
from dprgb.deploy.rollout import TIME_SPLIT
from dprgb.deploy.runtime import PolicyRunner
from dprgb.pipeline.episodes import scan_task
from dprgb.pipeline.frames import read_rgb_frames
from dprgb.pipeline.reference_extractor import factory
from tests.conftest import TINY_TRAINING

EXTRACTOR = "dprgb.pipeline.reference_extractor:factory"  # croco 4x4x64 (per frame), vggt 3x4x96 (window)
PIXELS = PixelSpec(camera="corner3", width=32, height=32)
BACKBONES = {"croco": "any", "vggt": "causal"}


class Recording:
    """The extractor, keeping what it returned at each call (the runner's live features)."""

    def __init__(self):
        self.inner, self.seen = factory(), []

    def __call__(self, backbone, frames):
        out = self.inner(backbone, frames)
        self.seen.append((backbone, out))
        return out


@pytest.fixture(scope="module")
def pixel_demos(tmp_path_factory):
    """Rendered, recorded, extracted (`dprgb extract`), precomputed and trained once."""
    from dprgb.app import extract as app_extract
    from dprgb.app import precompute as app_precompute
    from dprgb.app import train as app_train
    from dprgb.app.settings import load_settings

    root = tmp_path_factory.mktemp("pixels")
    _, report = write_expert_demos(root, ["reach-v3"], episodes=2, max_steps=80, pixels=PIXELS)
    (task,) = report
    extra = {**TINY_TRAINING, "encoder": "spatial", "encoder_options": {"grid": 2, "channels": 4},
             "obs_encoder_dim": 16, "proprio": "layout", "val_episodes_per_task": 0, "device": "cpu",
             "max_steps": 10, "epochs": 50}
    config = write_rgb_config(root, [task], BACKBONES, extra_config=extra)
    extracted = app_extract.run(load_settings(config), EXTRACTOR)
    app_precompute.run(load_settings(config), [task])
    app_train.run(load_settings(config), "reach", [task], progress=False)
    return root, config, task, report[task], extracted


def test_render_record_extract_precompute_train_roll_out(pixel_demos, run_main, tmp_path):
    root, config, task, report, extracted = pixel_demos
    assert task == "reach-metaworld-2_corner3" and report["pixels"]["camera"] == "corner3"
    hdf5 = root / "trajectories/reach/metaworld/data/episode0.hdf5"
    frames = read_rgb_frames(hdf5, "corner3", None, 0)  # RoboTwin's JPEGs, decoded as RoboTwin does
    assert frames.shape == (report["lengths"][0], 32, 32, 3)
    assert extracted.frames == sum(report["lengths"]) and len(extracted.computed) == 2
    code, out, err = run_main("extract", "--config", config, "--extractor", EXTRACTOR)
    assert code == 0 and "0 episodes extracted" in out and "2 already extracted" in out, err
    code, out, err = run_main("check-features", "--config", config, "--extractor", EXTRACTOR, "--json")
    assert code == 0 and json.loads(out)["verdict"] == "pass", out
    final = root / "runs/reach/final_policy.pt"
    code, out, err = run_main("rollout", "--checkpoint", final, "--env", "dprgb.deploy.metaworld:make_env",
                              "--extractor", EXTRACTOR, "--env-option", "max_steps=5", "--env-option",
                              "size=32", "--episodes", "1", "--seed", EVAL_SEED, "--out",
                              tmp_path / "rollouts", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["env_kwargs"]["obs"] == "rgb" and result["extractor"] == EXTRACTOR  # acted on camera frames
    assert result["episodes"][0]["length"] == 5
    per_act = result["summary"]["per_act_ms"]
    assert set(per_act) == set(TIME_SPLIT) and all(per_act[key] > 0 for key in ("render", "extract", "encode",
                                                                                 "sample"))


def live_and_stored(root, config, task: str, episode: int, seed: int, jpeg: bool) -> tuple[list, list]:
    """Replay the recorded episode in the env (its recorded targets as the commands) with the runner
    acting on every rendered frame: (the runner's live features per step, the stored ones)."""
    from dprgb.app.settings import load_settings
    from dprgb.pipeline.config import DataConfig

    scan = scan_task(load_settings(config).get(DataConfig), task)
    trajectory = scan.trajectories[episode]
    targets = np.column_stack([trajectory.arms["left"].joints, trajectory.arms["left"].gripper])  # (N, 4)
    extractor = Recording()
    runner = PolicyRunner.from_checkpoint(root / "runs/reach/final_policy.pt", extractor=extractor)
    env = MetaWorldEnv("reach-v3", obs="rgb", pixels=PixelSpec(PIXELS.camera, 32, 32, jpeg=jpeg))
    observation, _ = env.reset(seed=seed)
    runner.reset()
    for t in range(len(targets)):
        runner.act(observation)  # the live path: FrameHistory -> live_features -> encoder
        if t + 1 < len(targets):
            observation, *_ = env.step(targets[t + 1])  # what the expert commanded at step t
    env.close()
    live = [out for name, out in extractor.seen]
    stores = scan.stores[episode]
    stored = [stores[name].read(np.array([t]))[0].astype(np.float32) for t in range(len(targets))
              for name in runner.spec["backbones"]]
    return live, stored


def test_live_features_in_the_simulator_are_the_stored_ones(pixel_demos):
    root, config, task, report, _ = pixel_demos
    live, stored = live_and_stored(root, config, task, 0, report["seeds"][0], jpeg=True)
    assert len(live) == len(stored) == 2 * report["lengths"][0]
    errors = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(live, stored, strict=True)]
    assert max(errors) <= store_tolerance(np.float16), max(errors)
    # the raw rendering, without the JPEG the recording went through: the comparison catches it
    raw, stored = live_and_stored(root, config, task, 0, report["seeds"][0], jpeg=False)
    errors = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(raw, stored, strict=True)]
    assert np.median(errors) > 10 * store_tolerance(np.float16), np.median(errors)


def test_pixel_mode_options_and_errors():
    from dprgb.errors import DprgbError

    env = make_env("reach-metaworld-30_corner", obs="rgb", size=24)  # the camera of a pixel task's name
    observation, _ = env.reset(seed=3)
    assert env.pixels.camera == "corner" and observation["rgb"].shape == (24, 24, 3)
    assert observation["proprio"].shape == (4,) and env.timings["renders"] >= 1
    env.close()
    env = make_env("reach-v3", obs="rgb", camera="topview", width=40, height=30, proprio=False)
    observation, _ = env.reset(seed=3)
    assert set(observation) == {"rgb"} and observation["rgb"].shape == (30, 40, 3)
    env.close()
    with pytest.raises(DprgbError, match="no camera 'nope'"):
        MetaWorldEnv("reach-v3", obs="rgb", pixels=PixelSpec(camera="nope"))
    with pytest.raises(DprgbError, match="observes one of"):
        MetaWorldEnv("reach-v3", obs="pixels")


def test_several_views_are_each_camera_side_by_side():
    from dprgb.deploy.metaworld import camera_of_task, task_name
    from dprgb.errors import DprgbError
    from dprgb.naming import parse_task_name

    def frame(camera):
        env = MetaWorldEnv("pick-place-v3", obs="rgb", pixels=PixelSpec(camera, 24, 20, jpeg=False))
        observation, _ = env.reset(seed=5)
        env.close()
        return observation["rgb"]

    pair = frame("corner3+corner")
    assert pair.shape == (20, 48, 3)
    assert np.array_equal(pair, np.concatenate([frame("corner3"), frame("corner")], axis=1))
    assert not np.array_equal(pair[:, :24], pair[:, 24:])  # two cameras, not one twice
    task = task_name("pick-place-v3", 30, "corner3+corner")  # the demonstrations' task: both views
    assert camera_of_task(task) == "corner3+corner" == parse_task_name(task).camera
    with pytest.raises(DprgbError, match="no camera 'nope'"):
        MetaWorldEnv("reach-v3", obs="rgb", pixels=PixelSpec(camera="corner3+nope"))
    with pytest.raises(DprgbError, match="name each camera once"):
        MetaWorldEnv("reach-v3", obs="rgb", pixels=PixelSpec(camera="corner3+corner3"))
