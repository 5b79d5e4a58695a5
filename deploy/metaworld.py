"""Meta-World (the `sim` extra) as dprgb's closed-loop simulator: an environment that takes the
runner's commands (`dprgb rollout --env dprgb.deploy.metaworld:make_env`) and its scripted
expert. The demonstrations it records, in dprgb's real input formats: dprgb.deploy.metaworld_demos.

The action convention. dprgb's actions are drive TARGETS, `action[t] = target[t + 1]`
(`action_offset: 1`, as RoboTwin). Meta-World's arm is a mocap body: a raw action `a` moves
it to `m' = clip(m + clip(a[:3], -1, 1) * action_scale, mocap_low, mocap_high)` and `a[3]`
is the gripper effort (-1 open, +1 closed). So a demonstration stores per frame t:

    joints  = m_t, the mocap position before step t (the commanded end-effector target)
    gripper = g_t in [0, 1], 1 = open (RoboTwin's convention): g_t = (1 - e) / 2 for the
              effort e in effect at t, the one step t - 1 commanded; at t = 0 it is open
              (1), because Meta-World's reset drives the gripper with effort -1 (open).

Then target[t + 1] = (m_{t+1}, g_{t+1}) is exactly what raw action a_t produced, and the
env inverts a predicted target: a[:3] = clip((x - m) / action_scale, -1, 1) for the current
mocap m, a[3] = 1 - 2 g. The proprioception at t is (m_t, g_t), the robot's commanded state,
as RoboTwin's `joint_action/vector` is.

Initial states. Each reset with seed s draws the object/goal positions from Meta-World's
random reset space with `np_random` seeded by s (continuous, not MT1's 50 fixed goals), with
the goal observable (MT1's setting); demonstrations and evaluation use disjoint seeds.

Pixels (`PixelSpec`: camera, frame size, shadows). The env's pixel observation mode
(`obs="rgb"`) renders the camera at every step and observes `{"rgb": (H, W, 3) uint8 RGB,
"proprio": (4,)}` (`proprio=False` leaves the state out), which the runner turns into features
through the user's extractor. Several views: `camera="corner3+corner"` renders each camera at
W x H and observes them side by side, one (H, n * W, 3) frame (what one camera cannot tell, e.g.
how high a goal floats along its line of sight, two views can). Rendering: MuJoCo
offscreen through EGL (`MUJOCO_GL=egl`; Mesa's software rasteriser here). Shadows are off by
default: they cost 70 % of a frame in software (96 x 96: about 75 ms with, 21 ms without, on this
2-core machine) and are not needed to see where things are.

Live frames as recorded (`PixelSpec.jpeg`, on by default). The recordings keep each frame as a
JPEG (RoboTwin's format), so the stored features are the features of JPEG-decoded frames, while
a rendered frame is exact. That gap is not small: on drawer-open (corner3, 96 x 96, quality 95)
the reference extractor's features of a raw frame differ from those of its JPEG by 6.5 % (croco,
16 x 16 cells) and 2.9 % (vggt, 8 x 8) relative error, the size of the mismatches check-features
fails (a one-frame lag, another resize). So by default the env passes every live frame through
the same JPEG encoding and decoding as the recorded ones (`encode_rgb_jpeg`, then Pillow and the
channel reversal of `read_rgb_frames`: bit-identical frames), and the live features equal the
stored ones; `jpeg=False` observes the raw rendering, as a real camera would give it. On a
robot, do the same: pass the live frame through the compression the recordings went through, or
record losslessly.
"""


from __future__ import annotations

import io
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dprgb.errors import DprgbError
from dprgb.pipeline.frames import encode_rgb_jpeg

BACKBONE = "state"
FEATURE_ROOT = f"features_{BACKBONE}_encoder_dict_unified_zarr"
CONFIG_NAME = "metaworld"  # the <config> part of the task names
CAMERA = "head_camera"
DEFAULT_MAX_STEPS = 200  # experts succeed in ~45-110 steps on the tasks we use
EVAL_SEED = 100_000  # evaluation seeds start here; demonstrations use seeds below it
OBS_DIM = 39
OBSERVATIONS = ("state", "rgb")
DEFAULT_PIXEL_CAMERA = "corner3"  # sees the whole table from above its side: objects and gripper in view
VIEW_SEPARATOR = "+"  # PixelSpec.camera "corner3+corner": two views side by side in one frame


@dataclass(frozen=True)
class PixelSpec:
    """The camera frames of the pixel observation mode and of pixel demonstrations."""

    # a camera of the Meta-World model (corner, corner2, topview, ...), or several joined by "+"
    camera: str = DEFAULT_PIXEL_CAMERA
    width: int = 96  # of each view
    height: int = 96
    shadows: bool = False  # see the module docstring: 3.5x the render time in software
    # live frames through the JPEG of the recordings (RoboTwin's, quality 95) before they are
    # observed: see the module docstring (False: the raw rendering, as a camera gives it)
    jpeg: bool = True

    @property
    def cameras(self) -> tuple[str, ...]:
        """The views, left to right, of one observed frame."""
        return tuple(self.camera.split(VIEW_SEPARATOR))

    def check(self) -> None:
        if self.width < 8 or self.height < 8:
            raise DprgbError(f"camera frames must be at least 8 x 8 pixels, got {self.width=} {self.height=}")
        if not all(self.cameras) or len(set(self.cameras)) < len(self.cameras):
            raise DprgbError(f"name each camera once, joined by {VIEW_SEPARATOR!r}: got {self.camera!r}")


# ---- names -----------------------------------------------------------------------------------


def task_name(env_name: str, episodes: int, camera: str = CAMERA) -> str:
    """`pick-place-v3`, 30 -> `pick_place-metaworld-30_head_camera` (bases use underscores; pixel
    demonstrations are named by their camera, `..._corner2`)."""
    return f"{env_base(env_name).replace('-', '_')}-{CONFIG_NAME}-{episodes}_{camera}"


def env_base(env_name: str) -> str:
    return re.sub(r"-v\d+$", "", env_name)


def env_name_of(task: str) -> str:
    """The Meta-World env of a dprgb task name (`pick_place-metaworld-30_head_camera` ->
    `pick-place-v3`); a Meta-World name is returned as is."""
    match = re.match(rf"^([a-z_]+)-{CONFIG_NAME}-\d+_", task)
    return f"{match[1].replace('_', '-')}-v3" if match else task


def _import_metaworld() -> Any:
    try:
        import metaworld
    except ImportError:
        raise DprgbError("Meta-World is not installed: pip install 'dprgb[sim]'") from None
    return metaworld


# ---- the environment -------------------------------------------------------------------------


def action_to_target(mocap: np.ndarray, action: np.ndarray, scale: float, low: np.ndarray,
                     high: np.ndarray) -> tuple[np.ndarray, float]:
    """Where raw action `action` moves the mocap (Meta-World's `set_xyz_action`) and the
    gripper value it sets (1 = open)."""
    xyz = np.clip(mocap + np.clip(action[:3], -1.0, 1.0) * scale, low, high)
    return xyz, gripper_value(float(action[3]))


def gripper_value(effort: float) -> float:
    """Meta-World effort (-1 open, +1 closed) -> dprgb gripper in [0, 1], 1 = open."""
    return float((1.0 - np.clip(effort, -1.0, 1.0)) / 2.0)


def target_to_action(target: np.ndarray, mocap: np.ndarray, scale: float) -> np.ndarray:
    """A 4-d target [x, y, z, gripper] -> the raw action that reaches it (exactly, when it is
    within one step of the mocap): (4,) float32 in [-1, 1]."""
    action = np.empty(4, dtype=np.float64)
    action[:3] = np.clip((target[:3] - mocap) / scale, -1.0, 1.0)
    action[3] = np.clip(1.0 - 2.0 * target[3], -1.0, 1.0)
    return action.astype(np.float32)


class MetaWorldEnv:
    """One Meta-World task with gymnasium's API whose observations are runner observation
    dicts, `{"features": {"state": (1, 1, 39)}, "proprio": (4,) [mocap xyz, gripper]}`, and
    whose `step` takes the runner's command (the 4-d target, see the module docstring).
    An episode ends at success (`terminated`) or after `max_steps` steps (`truncated`)."""

    def __init__(self, task: str = "pick-place-v3", *, max_steps: int = DEFAULT_MAX_STEPS,
                 render_mode: str | None = None, width: int = 240, height: int = 180,
                 camera_name: str | None = None, obs: str = "state", pixels: PixelSpec | None = None,
                 proprio: bool = True):
        """`obs="rgb"`: observe the camera frame of `pixels` (default PixelSpec()) instead of the
        state features; `proprio`: observations carry the proprio vector (4,)."""
        metaworld = _import_metaworld()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.env_name = env_name_of(task)
        if self.env_name not in ALL_V3_ENVIRONMENTS:
            raise DprgbError(f"unknown Meta-World task {task!r} (e.g. reach-v3, pick-place-v3)")
        if max_steps < 1:
            raise DprgbError(f"max_steps must be >= 1, got {max_steps=}")
        if obs not in OBSERVATIONS:
            raise DprgbError(f"the Meta-World env observes one of {OBSERVATIONS}, got {obs=}")
        self.obs, self.proprio = obs, bool(proprio)
        self.pixels = (pixels or PixelSpec()) if obs == "rgb" else pixels
        if self.pixels is not None:  # the camera of the frames is the one rendered (the first view)
            self.pixels.check()
            render_mode, camera_name = "rgb_array", self.pixels.cameras[0]
            width, height = self.pixels.width, self.pixels.height
        if render_mode is not None:  # headless offscreen rendering (no display here)
            os.environ.setdefault("MUJOCO_GL", "egl")
            os.environ.setdefault("EGL_PLATFORM", "surfaceless")
        self.max_steps = int(max_steps)
        self.render_mode = render_mode
        env = ALL_V3_ENVIRONMENTS[self.env_name](render_mode=render_mode, width=width, height=height,
                                                 camera_name=camera_name)
        wanted = self.pixels.cameras if self.pixels is not None else (camera_name,) if camera_name else ()
        names = _camera_names(env.model)  # a camera's id is its index here
        unknown = [name for name in wanted if name not in names]
        if unknown:
            raise DprgbError(f"Meta-World has no camera {unknown[0]!r} (it has {', '.join(names)})")
        self.view_ids = [names.index(name) for name in wanted]  # rendered left to right (pixel mode)
        # MT1's task settings (goal observable), then Meta-World's own way to draw fresh random
        # initial states from a seeded np_random (what MT1 does to make its goals)
        env.set_task(metaworld.MT1(self.env_name, seed=0).train_tasks[0])
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = 10**9  # our own step limit ends episodes (Meta-World's raises at 500)
        self.env = env
        self.raw_obs = np.zeros(OBS_DIM)
        self.gripper = 1.0
        self.steps = 0
        self.frame: np.ndarray | None = None  # the latest camera frame observed (pixel mode)
        self.raw_frame: np.ndarray | None = None  # the same, as rendered (before `PixelSpec.jpeg`)
        self.timings = {"renders": 0, "render": 0.0}  # seconds spent rendering
        self._shadows_set = False

    @property
    def action_scale(self) -> float:
        return float(self.env.action_scale)

    @property
    def mocap(self) -> np.ndarray:
        """(3,) the commanded end-effector position."""
        return np.array(self.env.data.mocap_pos[0], dtype=np.float64)

    def observation(self) -> dict[str, Any]:
        if self.obs == "rgb":
            self.frame = self.camera_frame()
            observation: dict[str, Any] = {"rgb": self.frame}
        else:
            observation = {"features": {BACKBONE: self.raw_obs.astype(np.float32).reshape(1, 1, OBS_DIM)}}
        if self.proprio:
            observation["proprio"] = np.append(self.mocap, self.gripper)
        return observation

    def camera_frame(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB of the pixel camera now, raw or as recorded (`PixelSpec.jpeg`); the
        time in `timings`."""
        start = time.perf_counter()
        frame = self.render_views()
        if not self._shadows_set and self.pixels is not None:  # the viewer exists after a first render
            self._set_shadows(self.pixels.shadows)
            frame = self.render_views()
        frame = self.raw_frame = np.ascontiguousarray(frame, dtype=np.uint8)  # what a recording encodes
        if self.pixels is not None and self.pixels.jpeg:
            frame = as_recorded(frame)
        self.timings["renders"] += 1
        self.timings["render"] += time.perf_counter() - start
        return frame

    def _set_shadows(self, on: bool) -> None:
        import mujoco

        viewer = self.env.mujoco_renderer._get_viewer(self.render_mode)  # gymnasium's offscreen viewer
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = int(on)
        self._shadows_set = True

    def reset(self, *, seed: int | None = None, options: Mapping | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self.env.seed(int(seed))
        self.raw_obs, _ = self.env.reset()
        self.gripper, self.steps = 1.0, 0  # reset drives the gripper open
        return self.observation(), {"seed": seed, "env": self.env_name}

    def step(self, command: Any) -> tuple[dict, float, bool, bool, dict]:
        """Drive to the 4-d target [x, y, z, gripper] (gripper 1 = open)."""
        target = np.asarray(command, dtype=np.float64).reshape(-1)
        if target.shape != (4,) or not np.isfinite(target).all():
            raise DprgbError(f"the Meta-World env takes a finite 4-d target [x, y, z, gripper], got "
                             f"{target.tolist() if target.size <= 8 else target.shape}")
        return self.step_action(target_to_action(target, self.mocap, self.action_scale))

    def step_action(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """One step with a raw Meta-World action (the scripted expert's)."""
        self.raw_obs, reward, _, _, info = self.env.step(np.asarray(action, dtype=np.float32))
        self.gripper = gripper_value(float(action[3]))
        self.steps += 1
        info = {**info, "success": bool(info.get("success", 0.0))}
        return self.observation(), float(reward), info["success"], self.steps >= self.max_steps, info

    def expert_action(self) -> np.ndarray:
        """The scripted expert's raw action for the current observation."""
        if not hasattr(self, "_expert"):
            from metaworld.policies import ENV_POLICY_MAP

            if self.env_name not in ENV_POLICY_MAP:
                raise DprgbError(f"Meta-World has no scripted expert for {self.env_name!r}")
            self._expert = ENV_POLICY_MAP[self.env_name]()
            # its gains exceed the action range on purpose (Meta-World clips): not our warning
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        return np.asarray(self._expert.get_action(self.raw_obs), dtype=np.float64)

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB; needs render_mode="rgb_array"."""
        if self.render_mode != "rgb_array":
            raise DprgbError("this env renders only when made with render_mode='rgb_array'")
        try:
            return np.asarray(self.env.render())
        except Exception as err:  # no GL platform: one line, not a MuJoCo/EGL traceback
            raise DprgbError(f"MuJoCo cannot render offscreen here (MUJOCO_GL="
                             f"{os.environ.get('MUJOCO_GL')}): {type(err).__name__}: {err}; run "
                             "without video") from None

    def render_views(self) -> np.ndarray:
        """(H, n * W, 3) uint8 RGB: each camera of `pixels` rendered, side by side."""
        if self.pixels is None or len(self.view_ids) == 1:
            return self.render()
        renderer = self.env.mujoco_renderer  # gymnasium's: renders the camera `camera_id` names
        first, views = renderer.camera_id, []
        try:
            for camera_id in self.view_ids:
                renderer.camera_id = camera_id
                views.append(self.render())
        finally:
            renderer.camera_id = first
        return np.concatenate(views, axis=1)

    def close(self) -> None:
        self.env.close()


def as_recorded(frame: np.ndarray) -> np.ndarray:
    """The frame as a RoboTwin recording gives it back: encoded as `write_rgb_frames` does, decoded
    as `read_rgb_frames` does (Pillow, channels reversed: see dprgb.pipeline.frames)."""
    with Image.open(io.BytesIO(encode_rgb_jpeg(frame))) as image:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])


def _camera_names(model: Any) -> list[str]:
    import mujoco

    return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]


def make_env(task: str, max_steps: int = DEFAULT_MAX_STEPS, render_mode: str | None = None,
             obs: str = "state", camera: str | None = None, size: int | None = None,
             width: int | None = None, height: int | None = None, shadows: bool = False,
             proprio: bool = True, **kwargs: Any) -> MetaWorldEnv:
    """The env factory for `dprgb rollout --env dprgb.deploy.metaworld:make_env
    --env-option task=pick-place-v3` (`task`: a Meta-World name or a dprgb task name; the
    rollout passes the policy's task when no option names one, and `obs=rgb` when the runner
    has an extractor). Pixel mode (`obs=rgb`): `camera` (default: the camera a dprgb task name
    ends with, e.g. `..._corner3`, else corner3; `corner3+gripperPOV`: both views side by side),
    `size` (square) or `width`/`height` (96, of each view),
    `shadows`; `proprio=false` observes no state."""
    pixels = None
    if obs == "rgb":
        side = int(size) if size is not None else 96
        pixels = PixelSpec(camera or camera_of_task(task) or DEFAULT_PIXEL_CAMERA,
                           int(width or side), int(height or side), bool(shadows))
    else:  # the video's frame size and camera (state observations)
        kwargs.update({key: value for key, value in (("width", width), ("height", height),
                                                     ("camera_name", camera)) if value is not None})
    return MetaWorldEnv(task, max_steps=int(max_steps), render_mode=render_mode, obs=obs, pixels=pixels,
                        proprio=proprio, **kwargs)


def camera_of_task(task: str) -> str | None:
    """`pick_place-metaworld-30_corner2` -> corner2 (the camera its frames came from); None for a
    Meta-World name or the state tasks' head_camera."""
    match = re.match(rf"^[a-z_]+-{CONFIG_NAME}-\d+_(.+)$", task)
    return match[1] if match and match[1] != CAMERA else None
