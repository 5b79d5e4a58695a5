"""The `spatial` encoder: it keeps where things are (an object moving within one half of the image
changes its output, where `reference`'s statistics and `pooled`'s mean do not), it is one kind of
the registry (built from options, recorded in and rebuilt from a policy file), its weights are the
same on every machine, and stage 2 can train its projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dprgb.errors import DprgbError
from dprgb.pipeline.encoders import (
    PooledEncoder,
    ReferenceEncoder,
    SpatialEncoder,
    encoder_kind,
    encoder_record,
    load_encoder,
    rebuild_encoder,
)
from dprgb.pipeline.frozen_encoder import encoder_fingerprint
from tests.conftest import assert_float32_close

DIMS = {"croco": 8, "vggt": 6}


def maps_with_object_at(column: int, batch: int = 1) -> dict[str, torch.Tensor]:
    """A uniform background with one bright cell at (2, column) of a 12 x 12 map (and the same, at
    half resolution, in a 6 x 6 map): the object moves within the left half for columns 0 .. 5."""
    rng = np.random.default_rng(0)
    background = {name: rng.standard_normal(c).astype(np.float32) for name, c in DIMS.items()}
    thing = {name: 3 * rng.standard_normal(c).astype(np.float32) for name, c in DIMS.items()}
    out = {}
    for name, size in (("croco", 12), ("vggt", 6)):
        fmap = np.broadcast_to(background[name], (batch, size, size, DIMS[name])).copy()
        fmap[:, 2 * size // 12, column * size // 12] = thing[name]
        out[name] = torch.from_numpy(fmap)
    return out


def test_an_object_moving_within_a_half_changes_only_the_spatial_encoding():
    encoders = (SpatialEncoder(DIMS), ReferenceEncoder(DIMS), PooledEncoder(DIMS))
    spatial, reference, pooled = (encoder.requires_grad_(False) for encoder in encoders)
    # columns 0 and 4: same half of the map (left), same row
    a, b = maps_with_object_at(0), maps_with_object_at(4)
    for encoder in (reference, pooled):  # statistics of halves and means cannot tell them apart
        assert_float32_close(encoder(a), encoder(b), "cache")
    moved = (spatial(a) - spatial(b)).norm() / spatial(a).norm()
    assert moved > 0.05, float(moved)
    assert spatial(a).shape == (1, spatial.out_dim) == (1, 2 * 8 * 8 * 16)


def test_pooling_then_projecting_is_projecting_then_pooling():
    encoder = SpatialEncoder(DIMS, grid=3, channels=4).requires_grad_(False)
    x = {name: torch.randn(2, 12, 12, c) for name, c in DIMS.items()}
    out = encoder(x).reshape(2, 2, 3, 3, 4)  # (B, backbones sorted, G, G, K)
    for i, name in enumerate(sorted(DIMS)):
        projected = encoder.proj[name](x[name]).permute(0, 3, 1, 2)  # (B, K, 12, 12)
        pooled = torch.nn.functional.adaptive_avg_pool2d(projected, 3).permute(0, 2, 3, 1)
        assert_float32_close(out[:, i], pooled, "cache")


def test_same_weights_everywhere_and_a_policy_file_rebuilds_it():
    encoder, options = load_encoder("spatial", backbone_dims=DIMS, options={"grid": 4, "channels": 3})
    assert encoder_kind("spatial").name == "spatial" and isinstance(encoder, SpatialEncoder)
    assert options == {"encoder": "spatial", "backbone_dims": DIMS, "grid": 4, "channels": 3, "seed": 0,
                       "cells": {"croco": [4, 4], "vggt": [4, 4]}}
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen for precompute
    again, _ = load_encoder("spatial", backbone_dims=dict(reversed(DIMS.items())),
                            options={"grid": 4, "channels": 3})
    assert encoder_fingerprint(encoder, options) == encoder_fingerprint(again, options)  # numpy draws
    other, other_options = load_encoder("spatial", backbone_dims=DIMS, options={"grid": 4, "channels": 3,
                                                                                  "seed": 1})
    assert encoder_fingerprint(other, other_options) != encoder_fingerprint(encoder, options)
    record = encoder_record(encoder, "spatial")
    assert record["kind"] == "spatial" and record["out_dim"] == 2 * 4 * 4 * 3
    rebuilt = rebuild_encoder(record, encoder.state_dict())
    x = maps_with_object_at(3, batch=2)
    assert_float32_close(rebuilt(x), encoder(x), "cache")
    # given the stores' frame shapes, no cell is finer than a map's own (vggt 6 x 6 under grid 8)
    fitted, fitted_options = load_encoder("spatial", backbone_dims=DIMS, options={
        "frame_shapes": {"croco": (12, 12, 8), "vggt": (6, 6, 6)}})
    assert fitted.cells == {"croco": (8, 8), "vggt": (6, 6)} and fitted.out_dim == (64 + 36) * 16
    assert fitted_options["cells"] == {"croco": [8, 8], "vggt": [6, 6]}
    assert rebuild_encoder(encoder_record(fitted, "spatial"), fitted.state_dict()).out_dim == fitted.out_dim
    # square cells: a map twice as wide (two views side by side) keeps each view's 8 x 8
    assert SpatialEncoder.cells_for({"croco": (16, 32, 8), "vggt": (3, 4, 6), "state": (1, 1, 39),
                                     "dino": (37, 49, 8)}) == {"croco": (8, 16), "vggt": (3, 4),
                                                                "state": (1, 1), "dino": (8, 11)}
    with pytest.raises(DprgbError, match="unknown spatial encoder options \\['grids'\\]"):
        load_encoder("spatial", backbone_dims=DIMS, options={"grids": 4})
    with pytest.raises(DprgbError, match="spatial encoder needs vggt features"):
        encoder({"croco": x["croco"]})


def test_stage_two_can_train_the_projection():
    encoder = SpatialEncoder(DIMS).requires_grad_(True)
    loss = encoder(maps_with_object_at(1)).square().mean()
    loss.backward()
    for layer in encoder.proj.values():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
