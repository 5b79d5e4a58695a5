"""dprgb's own deterministic feature extractor: the stand-in for the frozen backbones.

It behaves like the real ones where it matters for deployment, with nothing to download:

- per frame: a fixed seeded random patch convolution (a ViT patch embedding) over the frame
  box-downsampled to (Hf * P, Wf * P), P = 4: each P x P x 3 patch -> tanh(patch @ W_b), C
  channels. Every colour channel has its own weights, so a swapped R/B changes the features.
- per-frame backbones (croco, dinov3): the newest frame's map depends on that frame only.
- cross-frame backbones (vggt, da3) attend over the window: slot i of a window of n frames is
      out_i = m_i + MIX * mean_j m_j + e(i)
  with m_j the per-frame maps, and a fixed slot embedding e(i): one map for the window's first
  frame, another for the rest (VGGT treats the first frame of a window as the reference frame,
  with its own camera and register tokens). So a frame's features depend on the other frames
  of its window and on its place in it, and the same frame extracted alone (slot 0 of a
  1-frame window) differs, as real VGGT features do.

`window(backbone, frames)` gives every slot of a window (what an offline extraction stores in
a windowed pack); calling the extractor gives the newest frame's map (the live interface of
`dprgb.pipeline.extractor`); `version` and `fingerprint()` say which one made a store. Usable as
`--extractor dprgb.pipeline.reference_extractor:factory` on the demo data written with RGB frames
(`DemoSpec(rgb_frames=...)`), whose stored features it made, as `...:camera` (finer maps) on
simulator camera frames (the Meta-World pixel benchmark, `bench/closed_loop.py --obs rgb`), and
as `...:camera_pair` on frames of two such views side by side.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from dprgb.naming import PER_FRAME_BACKBONES

PATCH = 4  # pixels of the downsampled frame per feature cell, each way
MIX = 0.3  # weight of the window mean in a cross-frame backbone's features
SLOT_SCALE = 0.3  # size of the slot embeddings relative to a per-frame map's entries
# The frame shapes of the demo data (DemoSpec's default backbones), used by `factory()`.
DEMO_SHAPES = {"croco": (4, 4, 64), "vggt": (3, 4, 96)}
# Finer maps for simulator camera frames, used by `camera()`: croco reads a frame at 64 x 64
# (a cell per 6 x 6 pixels of a 96 x 96 frame), vggt at 32 x 32. The demo's 4 x 4 map would see a
# 96 x 96 frame at 16 x 16, where a Meta-World puck is under a pixel.
CAMERA_SHAPES = {"croco": (16, 16, 32), "vggt": (8, 8, 48)}
# Two views side by side in one frame (a Meta-World `camera="a+b"`): each view read as camera() reads one.
CAMERA_PAIR_SHAPES = {name: (hf, 2 * wf, c) for name, (hf, wf, c) in CAMERA_SHAPES.items()}


class ReferenceExtractor:
    """extractor(backbone, frames (n, H, W, 3) uint8 RGB) -> (Hf, Wf, C) float32 of the newest."""

    version = 1  # bump when what it computes changes (the stores `dprgb extract` wrote record it)

    def __init__(self, frame_shapes: dict[str, tuple[int, int, int]], seed: int = 0,
                 per_frame: tuple[str, ...] = PER_FRAME_BACKBONES):
        self.frame_shapes = {name: tuple(int(v) for v in shape) for name, shape in frame_shapes.items()}
        self.per_frame = tuple(per_frame)
        self.weights, self.slot_embeddings = {}, {}
        for name, (hf, wf, c) in self.frame_shapes.items():
            rng = np.random.default_rng([seed, sum(map(ord, name)), 31])
            fan_in = PATCH * PATCH * 3
            self.weights[name] = (rng.standard_normal((fan_in, c)) * (3.0 / np.sqrt(fan_in))).astype(
                np.float32)  # (P*P*3, C)
            self.slot_embeddings[name] = (SLOT_SCALE * rng.standard_normal((2, hf, wf, c))).astype(
                np.float32)  # (first frame | the others, Hf, Wf, C)

    @property
    def backbones(self) -> list[str]:
        return list(self.frame_shapes)

    def fingerprint(self) -> str:
        """sha256 of everything its features depend on: shapes, constants, weights (recorded by
        `dprgb extract`, so a store made with other shapes or seeds is told apart)."""
        digest = hashlib.sha256(json.dumps({"patch": PATCH, "mix": MIX, "slot_scale": SLOT_SCALE,
                                            "shapes": self.frame_shapes, "per_frame": self.per_frame},
                                           sort_keys=True).encode())
        for name in sorted(self.frame_shapes):
            digest.update(self.weights[name].tobytes() + self.slot_embeddings[name].tobytes())
        return digest.hexdigest()

    def cross_frame(self, backbone: str) -> bool:
        return backbone not in self.per_frame

    def frame_map(self, backbone: str, frame: np.ndarray) -> np.ndarray:
        """(Hf, Wf, C) float32 features of one (H, W, 3) uint8 RGB frame, alone."""
        if backbone not in self.frame_shapes:
            raise ValueError(f"reference extractor has no backbone {backbone!r} "
                             f"(it has {sorted(self.frame_shapes)})")
        hf, wf, c = self.frame_shapes[backbone]
        small = box_resize(frame, hf * PATCH, wf * PATCH) - 0.5  # (Hf*P, Wf*P, 3), centred
        patches = small.reshape(hf, PATCH, wf, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(hf, wf, -1)
        return np.tanh(patches @ self.weights[backbone])  # (Hf, Wf, C)

    def mix_window(self, backbone: str, maps: np.ndarray) -> np.ndarray:
        """(n, Hf, Wf, C) per-frame maps of one window -> every slot's features."""
        if not self.cross_frame(backbone):
            return maps.copy()
        embeddings = self.slot_embeddings[backbone]
        slots = np.where(np.arange(len(maps))[:, None, None, None] == 0, embeddings[0], embeddings[1])
        return maps + MIX * maps.mean(axis=0, keepdims=True) + slots  # (n, Hf, Wf, C)

    def frame_maps(self, backbone: str, frames: np.ndarray) -> np.ndarray:
        """(n, Hf, Wf, C): each frame alone, one at a time (so a frame's map is bit-identical
        whichever batch it comes in)."""
        return np.stack([self.frame_map(backbone, frame) for frame in frames])

    def window(self, backbone: str, frames: np.ndarray) -> np.ndarray:
        """(n, Hf, Wf, C): every slot of the window `frames`, as a windowed pack stores it."""
        return self.mix_window(backbone, self.frame_maps(backbone, frames))

    def __call__(self, backbone: str, frames: np.ndarray) -> np.ndarray:
        return self.window(backbone, frames)[-1]


def box_resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 in [0, 1]: the mean of each cell of an even grid over the
    frame (area downsampling), through an integral image."""
    image = frame.astype(np.float64) / 255.0
    integral = np.zeros((image.shape[0] + 1, image.shape[1] + 1, 3))
    integral[1:, 1:] = image.cumsum(0).cumsum(1)
    rows = np.linspace(0, image.shape[0], height + 1).round().astype(int)
    cols = np.linspace(0, image.shape[1], width + 1).round().astype(int)
    r0, r1, c0, c1 = rows[:-1, None], rows[1:, None], cols[None, :-1], cols[None, 1:]
    sums = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]  # (h, w, 3)
    area = ((r1 - r0) * (c1 - c0))[..., None]
    return (sums / np.maximum(area, 1)).astype(np.float32)


def factory() -> ReferenceExtractor:
    """The reference extractor for the demo data's backbones (croco 4x4x64, vggt 3x4x96)."""
    return ReferenceExtractor(DEMO_SHAPES)


def camera() -> ReferenceExtractor:
    """The reference extractor for simulator camera frames (`--extractor
    dprgb.pipeline.reference_extractor:camera`): croco 16x16x32 (per frame), vggt 8x8x48 (over
    the window)."""
    return ReferenceExtractor(CAMERA_SHAPES)


def camera_pair() -> ReferenceExtractor:
    """`camera()` for frames of two views side by side, twice as wide as tall (`--extractor
    dprgb.pipeline.reference_extractor:camera_pair`, Meta-World `camera="corner3+corner"`):
    croco 16x32x32, vggt 8x16x48."""
    return ReferenceExtractor(CAMERA_PAIR_SHAPES)
