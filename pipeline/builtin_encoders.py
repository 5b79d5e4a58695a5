"""The encoders dprgb builds without a checkpoint: `reference` (a fixed random read-out of
spatial statistics, for the demo), `spatial` (a coarse grid of each feature map, channels
projected: keeps where things are; for users without a trained RGB2PC, trained in stage 2) and
`pooled` (each backbone's mean patch token, the baseline without fusion weights). Their kinds are
registered in `dprgb.pipeline.encoders`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dprgb.errors import DprgbError


def _quadrant_sums(frame: Tensor) -> Tensor:
    """(Hf, Wf, C) -> (4, C) fp32 sums: top-left, top-right, bottom-left, bottom-right.

    Summing over whole rows first (contiguous memory) and then splitting the (Wf, C) result is
    several times faster on CPU than summing strided quadrants; fp32 accumulation via the
    `dtype` argument avoids a full-size copy of fp16 maps (float64 maps sum in float64).
    """
    H, W = frame.shape[:2]
    h2, w2 = H // 2, W // 2
    dtype = torch.promote_types(frame.dtype, torch.float32)  # float64 stays float64
    top = frame[:h2].sum(dim=0, dtype=dtype)  # (Wf, C); zeros when h2 == 0
    bottom = frame[h2:].sum(dim=0, dtype=dtype)
    return torch.stack([top[:w2].sum(0), top[w2:].sum(0), bottom[:w2].sum(0), bottom[w2:].sum(0)])


def spatial_stats(fmap: Tensor) -> Tensor:
    """(B, Hf, Wf, C) -> (B, 3C): [mean over patches, top - bottom, left - right half means].

    Frame by frame: each frame stays cache-sized (large fp16 batches reduce several times
    slower per frame), and a frame's statistics never depend on its batch. A side shorter
    than 2 has no halves; its contrast is zero.
    """
    B, H, W, C = fmap.shape
    h2, w2 = H // 2, W // 2
    q = torch.stack([_quadrant_sums(frame) for frame in fmap])  # (B, 4, C)
    top, bottom = q[:, 0] + q[:, 1], q[:, 2] + q[:, 3]  # (B, C)
    left, right = q[:, 0] + q[:, 2], q[:, 1] + q[:, 3]
    mean = (top + bottom) / (H * W)
    zeros = torch.zeros_like(mean)
    top_bottom = top / (h2 * W) - bottom / ((H - h2) * W) if h2 else zeros
    left_right = left / (w2 * H) - right / ((W - w2) * H) if w2 else zeros
    return torch.cat([mean, top_bottom, left_right], dim=1)


class ReferenceEncoder(nn.Module):
    """A fixed random linear read-out of simple spatial statistics, for the demo and for users
    without a trained RGB2PC encoder.

    Per backbone (sorted by name): `spatial_stats` -> (B, 3C); concatenated -> (B, sum 3C);
    one Linear to out_dim with N(0, 1/in_dim) weights from `numpy.random.default_rng(seed)`
    and zero bias, so the same arguments give the same weights in every process, on every CPU.

    Deliberately linear, with no LayerNorm and no GELU: information that the feature maps hold
    linearly (e.g. a hidden state h written into every patch as W h + noise) stays linearly
    readable, and nothing saturates. A LayerNorm would divide out the scale of the mean
    feature (h and 2h would look alike); GELU would flatten negative outputs. The DP head
    normalizes its observations and is the nonlinear part. The 1/sqrt(in_dim) weight scale
    keeps the output on the scale of the input statistics.
    """

    def __init__(self, backbone_dims: dict[str, int], out_dim: int = 256, seed: int = 0):
        super().__init__()
        if not backbone_dims:
            raise DprgbError("the reference encoder needs at least one backbone")
        out_dim = int(out_dim)
        if out_dim < 1:
            raise DprgbError(f"reference encoder {out_dim=} must be positive")
        self.backbones = sorted(backbone_dims)
        self.backbone_dims = {name: int(backbone_dims[name]) for name in self.backbones}
        self.out_dim = int(out_dim)
        self.seed = int(seed)
        in_dim = sum(3 * c for c in self.backbone_dims.values())
        self.proj = nn.Linear(in_dim, self.out_dim)
        # numpy draws the same numbers on every CPU (torch.randn's last bits depend on its kernels,
        # which would make a cache made on one machine stale on another: the fingerprint hashes them)
        weight = np.random.default_rng(self.seed).standard_normal((self.out_dim, in_dim)) / math.sqrt(in_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
            self.proj.bias.zero_()

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{name: (B, Hf, Wf, C)} -> (B, out_dim)."""
        stats = []
        for name in self.backbones:
            if name not in features:
                raise DprgbError(f"reference encoder needs {name} features; got {sorted(features)}")
            fmap = features[name]
            if fmap.ndim != 4 or fmap.shape[-1] != self.backbone_dims[name]:
                raise DprgbError(
                    f"{name} features have shape {tuple(fmap.shape)}; "
                    f"expected (B, Hf, Wf, {self.backbone_dims[name]})"
                )
            stats.append(spatial_stats(fmap))
        x = torch.cat(stats, dim=1).to(self.proj.weight.dtype)  # (B, sum 3C)
        return self.proj(x)  # (B, D)

    def architecture(self) -> dict[str, Any]:
        """The constructor's arguments (the weights are in the state dict)."""
        return {"backbone_dims": dict(self.backbone_dims), "out_dim": self.out_dim, "seed": self.seed}


class PooledEncoder(nn.Module):
    """The baseline without RGB2PC: per backbone, in root order, the mean over the Hf x Wf
    patch tokens (fp32); concatenated, D = sum of C. No weights, deterministic."""

    def __init__(self, backbone_dims: dict[str, int] | list):
        super().__init__()
        pairs = list(backbone_dims.items()) if isinstance(backbone_dims, dict) else list(backbone_dims)
        if not pairs:
            raise DprgbError("the pooled encoder needs at least one backbone")
        self.backbone_dims = {str(name): int(c) for name, c in pairs}  # root order: the output's
        self.backbones = list(self.backbone_dims)
        self.out_dim = sum(self.backbone_dims.values())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{name: (B, Hf, Wf, C)} -> (B, sum C)."""
        pooled = []
        for name in self.backbones:
            fmap = features.get(name)
            if fmap is None or fmap.ndim != 4 or fmap.shape[-1] != self.backbone_dims[name]:
                got = None if fmap is None else tuple(fmap.shape)
                raise DprgbError(f"pooled encoder needs {name} features (B, Hf, Wf, "
                                 f"{self.backbone_dims[name]}); got {got}")
            pooled.append(fmap.mean(dim=(1, 2), dtype=torch.float32))  # (B, C)
        return torch.cat(pooled, dim=1)

    def architecture(self) -> dict[str, Any]:
        # pairs, not a mapping: the order is the output's and must survive any serializer
        return {"backbone_dims": [[name, c] for name, c in self.backbone_dims.items()]}


class SpatialEncoder(nn.Module):
    """Where things are, for users without a trained RGB2PC: per backbone (sorted by name), the
    feature map averaged over a grid of cells (adaptive average pooling to `cells[name]` = (rows,
    columns): `grid` cells along the map's shorter side and as many as keep them square along the
    other, never finer than the map, so two views side by side keep each view's resolution),
    each cell's C-vector projected to `channels` values by one linear map shared by the
    cells, flattened cell by cell: (B, rows * columns * channels); concatenated over backbones.

    A visuomotor policy must know where the gripper and the object are: `reference` keeps only
    the mean and two half-contrasts of each channel (an object moving within a half of the image
    does not change them), `pooled` only the mean. Here a cell keeps its place in the output.
    Pooling first is the same as projecting first (both are linear) and costs C / channels
    times less. The projection starts as a fixed random map (N(0, 1/C) weights from
    `numpy.random.default_rng(seed)`, the same on every CPU, so a cache made on one machine is
    fresh on another) and is what stage 2 trains; stage 1's head reads the cells through its
    observation MLP (`obs_encoder_dim`). Linear, no normalization, as `reference` and for the
    same reasons.
    """

    def __init__(self, backbone_dims: dict[str, int], grid: int = 8, channels: int = 16, seed: int = 0,
                 cells: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        if not backbone_dims:
            raise DprgbError("the spatial encoder needs at least one backbone")
        if int(grid) < 1 or int(channels) < 1:
            raise DprgbError(f"spatial encoder needs grid >= 1 and channels >= 1, got {grid=} {channels=}")
        self.backbones = sorted(backbone_dims)
        self.backbone_dims = {name: int(backbone_dims[name]) for name in self.backbones}
        self.grid, self.channels, self.seed = int(grid), int(channels), int(seed)
        cells = cells or {}  # (rows, columns) per backbone; default grid x grid
        self.cells = {name: tuple(int(n) for n in cells.get(name, (self.grid, self.grid)))
                      for name in self.backbones}
        self.out_dim = sum(rows * cols for rows, cols in self.cells.values()) * self.channels
        rng = np.random.default_rng(self.seed)
        self.proj = nn.ModuleDict()
        for name in self.backbones:  # sorted: the draws do not depend on the order backbones came in
            c = self.backbone_dims[name]
            layer = nn.Linear(c, self.channels)
            weight = rng.standard_normal((self.channels, c)) / math.sqrt(c)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
                layer.bias.zero_()
            self.proj[name] = layer

    @staticmethod
    def cells_for(frame_shapes: dict[str, Any], grid: int = 8) -> dict[str, tuple[int, int]]:
        """{backbone: (rows, columns)}: square cells, `grid` along the shorter side of each map
        (Hf, Wf, C), none finer than the map (16 x 16 -> 8 x 8, 16 x 32 -> 8 x 16, 6 x 6 -> 6 x 6)."""
        cells = {}
        for name, (hf, wf, *_) in frame_shapes.items():
            scale = min(int(grid), hf, wf) / min(hf, wf)  # cells per map entry, <= 1
            cells[name] = (max(1, round(hf * scale)), max(1, round(wf * scale)))
        return cells

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """{name: (B, Hf, Wf, C)} -> (B, out_dim)."""
        out = []
        for name in self.backbones:
            fmap = features.get(name)
            if fmap is None or fmap.ndim != 4 or fmap.shape[-1] != self.backbone_dims[name]:
                got = None if fmap is None else tuple(fmap.shape)
                raise DprgbError(f"spatial encoder needs {name} features (B, Hf, Wf, "
                                 f"{self.backbone_dims[name]}); got {got}")
            weight = self.proj[name].weight
            x = fmap.to(weight.dtype).permute(0, 3, 1, 2)  # (B, C, Hf, Wf)
            cells = F.adaptive_avg_pool2d(x, self.cells[name]).permute(0, 2, 3, 1)  # (B, rows, cols, C)
            out.append(self.proj[name](cells).flatten(1))  # (B, rows * cols * K), cell by cell
        return torch.cat(out, dim=1)

    def architecture(self) -> dict[str, Any]:
        return {"backbone_dims": dict(self.backbone_dims), "grid": self.grid, "channels": self.channels,
                "seed": self.seed, "cells": {name: list(cells) for name, cells in self.cells.items()}}
