"""The YAML config: defaults < group < flags, `extends:` across files with per-file relative
paths, unknown keys, the three spellings of a feature root, and errors that echo the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from dprgb.errors import DprgbError
from dprgb.pipeline.config import DataConfig, FeatureRoot, check_known_keys, parse_roots, resolve_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Run from an unrelated folder, so a path resolved against the cwd shows."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# ----------------------------------------------------------------------- precedence

MAIN = """\
traj_root: traj
epochs: 100
lr: 0.0001
batch_size: 64
groups:
  arm7: {tasks: [shake_bottle-demo_clean-20_head_camera], epochs: 200, batch_size: 32}
  arm14:
"""


def test_group_overrides_defaults_and_flags_override_both(tmp_path, elsewhere):
    path = write(tmp_path / "cfg" / "dprgb.yaml", MAIN)
    plain = resolve_config(path)
    assert (plain["epochs"], plain["batch_size"], plain["group"]) == (100, 64, None)
    assert "tasks" not in plain and set(plain["groups"]) == {"arm7", "arm14"}

    group = resolve_config(path, "arm7")
    assert (group["epochs"], group["batch_size"], group["lr"]) == (200, 32, 0.0001)
    assert group["tasks"] == ["shake_bottle-demo_clean-20_head_camera"] and group["group"] == "arm7"

    flags = resolve_config(path, "arm7", {"epochs": 5, "batch_size": None, "lr": 0.5})
    assert (flags["epochs"], flags["batch_size"], flags["lr"]) == (5, 32, 0.5)  # None = flag unset

    empty_group = resolve_config(path, "arm14", {"epochs": 3})
    assert (empty_group["epochs"], empty_group["batch_size"]) == (3, 64)
    assert resolve_config(None, None, {"epochs": 9})["epochs"] == 9
    assert plain["traj_root"] == str((tmp_path / "cfg" / "traj").resolve())


# -------------------------------------------------------------------------- extends


def test_extends_across_files_resolves_paths_per_file(tmp_path, elsewhere):
    write(
        tmp_path / "base" / "base.yaml",
        """\
rgb_zarr_roots: [feats/features_croco_encoder_dict_unified_zarr]
traj_root: data/trajectories
cache_dir: cache
epochs: 100
lr: 0.001
groups:
  arm7: {epochs: 200}
  shared: {epochs: 1}
""",
    )
    child = write(
        tmp_path / "exp" / "child.yaml",
        """\
extends: ../base/base.yaml
epochs: 50
save_dir: runs
groups:
  arm7: {epochs: 300}
  arm14: {epochs: 7}
""",
    )
    merged = resolve_config(child)
    base_dir, exp_dir = (tmp_path / "base").resolve(), (tmp_path / "exp").resolve()
    assert merged["traj_root"] == str(base_dir / "data" / "trajectories")
    assert merged["cache_dir"] == str(base_dir / "cache")
    assert merged["save_dir"] == str(exp_dir / "runs")
    assert merged["rgb_zarr_roots"] == [str(base_dir / "feats" / "features_croco_encoder_dict_unified_zarr")]
    assert (merged["epochs"], merged["lr"]) == (50, 0.001)  # the extending file wins
    assert "extends" not in merged
    assert set(merged["groups"]) == {"arm7", "shared", "arm14"}
    assert resolve_config(child, "arm7")["epochs"] == 300
    assert resolve_config(child, "shared")["epochs"] == 1
    data = DataConfig.from_mapping(merged)
    assert data.rgb_zarr_roots == [
        FeatureRoot("croco", base_dir / "feats" / "features_croco_encoder_dict_unified_zarr")
    ]


def test_extends_chain_of_three_and_loops(tmp_path):
    write(tmp_path / "a.yaml", "epochs: 1\nlr: 0.1\nbatch_size: 8\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nlr: 0.2\n")
    c = write(tmp_path / "sub" / "c.yaml", "extends: ../b.yaml\nbatch_size: 16\n")
    merged = resolve_config(c)
    assert (merged["epochs"], merged["lr"], merged["batch_size"]) == (1, 0.2, 16)

    write(tmp_path / "x.yaml", "extends: y.yaml\n")
    y = write(tmp_path / "y.yaml", "extends: x.yaml\n")
    with pytest.raises(DprgbError, match="loops"):
        resolve_config(y)


def test_extends_a_missing_file_names_it(tmp_path):
    path = write(tmp_path / "c.yaml", "extends: nowhere/base.yaml\n")
    with pytest.raises(DprgbError) as err:
        resolve_config(path)
    assert str(tmp_path / "nowhere" / "base.yaml") in str(err.value)


def test_yaml_anchor_across_files_is_a_clear_error(tmp_path):
    path = write(tmp_path / "c.yaml", "arm7:\n  <<: *default\n  epochs: 3\n")
    with pytest.raises(DprgbError, match="not valid YAML") as err:
        resolve_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_config_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "- a\n- b\n")
    with pytest.raises(DprgbError, match="mapping"):
        resolve_config(path)


# ----------------------------------------------------------------------- known keys


def test_unknown_keys_are_refused_by_name(tmp_path):
    mapping = {
        "rgb_zarr_roots": [],
        "traj_root": "t",
        "tasks": [],
        "epoch": 3,
        "slot_polcy": {},
        "groups": {},
    }
    with pytest.raises(DprgbError) as err:
        check_known_keys(mapping, DataConfig, source=str(tmp_path / "c.yaml"))
    message = str(err.value)
    assert "epoch" in message and "slot_polcy" in message and str(tmp_path / "c.yaml") in message
    assert "traj_root" not in message
    check_known_keys({"traj_root": "t", "group": None, "extends": "x", "use_left_arm": True}, DataConfig)


# ---------------------------------------------------------------------- feature roots


def test_backbone_from_the_root_directory_name():
    roots = parse_roots(
        [
            "/d/features_croco_encoder_dict_unified_zarr",
            "/d/features_vggt_encoder_dict_unified_safe_zarr",
            "/d/features_dinov3_encoder_dict_unified_zarr",
        ]
    )
    assert [r.backbone for r in roots] == ["croco", "vggt", "dinov3"]
    assert roots[1].path == Path("/d/features_vggt_encoder_dict_unified_safe_zarr")
    assert parse_roots("/d/features_croco_v2_encoder_dict_unified_zarr")[0].backbone == "croco"


def test_backbone_from_backbone_path_dicts_and_name_path_pairs():
    roots = parse_roots(
        [{"backbone": "vggt", "path": "/d/my_vggt"}, {"da3": "/d/depth"}, {"path": "/d/features_dinov3_x"}]
    )
    assert roots == [
        FeatureRoot("vggt", Path("/d/my_vggt")),
        FeatureRoot("da3", Path("/d/depth")),
        FeatureRoot("dinov3", Path("/d/features_dinov3_x")),
    ]
    assert parse_roots({"croco": "/d/a", "vggt": "/d/b"}) == [
        FeatureRoot("croco", Path("/d/a")),
        FeatureRoot("vggt", Path("/d/b")),
    ]


def test_unnamed_root_directory_needs_a_backbone_name():
    with pytest.raises(DprgbError, match="backbone") as err:
        parse_roots(["/d/my_features"])
    assert "/d/my_features" in str(err.value)
    with pytest.raises(DprgbError, match="42"):
        parse_roots([42])


@pytest.mark.parametrize(
    "roots_yaml",
    [
        "[feats/features_croco_x, feats/features_vggt_x]",
        "[{backbone: croco, path: feats/features_croco_x}, {backbone: vggt, path: feats/features_vggt_x}]",
        "[{croco: feats/features_croco_x}, {vggt: feats/features_vggt_x}]",
        "{croco: feats/features_croco_x, vggt: feats/features_vggt_x}",
    ],
    ids=["paths", "backbone-path", "name-path-list", "name-path-mapping"],
)
def test_relative_root_paths_resolve_against_the_config_file(tmp_path, elsewhere, roots_yaml):
    path = write(tmp_path / "cfg" / "dprgb.yaml", f"rgb_zarr_roots: {roots_yaml}\ntraj_root: trajectories\n")
    cfg = DataConfig.from_mapping(resolve_config(path))
    feats = (tmp_path / "cfg" / "feats").resolve()
    assert cfg.rgb_zarr_roots == [
        FeatureRoot("croco", feats / "features_croco_x"),
        FeatureRoot("vggt", feats / "features_vggt_x"),
    ]
    assert cfg.traj_root == (tmp_path / "cfg" / "trajectories").resolve()


# --------------------------------------------------------------------- invalid values


def roots() -> list[FeatureRoot]:
    return [FeatureRoot("croco", Path("/d/a")), FeatureRoot("vggt", Path("/d/b"))]


@pytest.mark.parametrize(
    ("kwargs", "echo"),
    [
        ({"action_source": "h5"}, "'h5'"),
        ({"action_offset": -2}, "-2"),
        ({"slot_policy": {"vggt": "sometimes"}}, "'sometimes'"),
        ({"use_left_arm": False, "use_right_arm": False}, "use_left_arm"),
        (
            {"rgb_zarr_roots": [FeatureRoot("vggt", Path("/a")), FeatureRoot("vggt", Path("/b"))]},
            "'vggt', 'vggt'",
        ),
        ({"rgb_zarr_roots": []}, "rgb_zarr_roots"),
    ],
)
def test_invalid_values_echo_the_value(kwargs, echo):
    values = {"rgb_zarr_roots": roots(), "traj_root": Path("/d/t"), **kwargs}
    with pytest.raises(DprgbError) as err:
        DataConfig(**values)
    assert echo in str(err.value) and "\n" not in str(err.value)


def test_from_mapping_needs_roots_and_trajectories():
    with pytest.raises(DprgbError, match="rgb_zarr_roots and traj_root"):
        DataConfig.from_mapping({"traj_root": "/t"})


def test_tasks_accept_a_comma_separated_string_and_slot_policy_defaults():
    cfg = DataConfig.from_mapping(
        {"rgb_zarr_roots": ["/d/features_croco_x"], "traj_root": "/t", "tasks": "a-b-1_c, d-e-2_f g-h-3_i"}
    )
    assert cfg.tasks == ["a-b-1_c", "d-e-2_f", "g-h-3_i"]
    assert [cfg.slot_policy_for(b) for b in ("croco", "dinov3", "vggt", "da3")] == [
        "any",
        "any",
        "causal",
        "causal",
    ]
    cfg = DataConfig(
        rgb_zarr_roots=roots(), traj_root=Path("/t"), slot_policy={"croco": "causal", "vggt": "any"}
    )
    assert (cfg.slot_policy_for("croco"), cfg.slot_policy_for("vggt")) == ("causal", "any")


def test_example_config_in_the_repository_is_valid():
    from dprgb.pipeline.precompute import PrecomputeConfig
    from dprgb.trainer.config import TrainConfig

    example = Path(__file__).resolve().parents[1] / "configs" / "example.yaml"
    settings = resolve_config(example, "arm14")
    check_known_keys(settings, DataConfig, PrecomputeConfig, TrainConfig, source=str(example))
    assert [root.backbone for root in DataConfig.from_mapping(settings).rgb_zarr_roots] == ["croco", "vggt"]
    assert TrainConfig.from_mapping(settings).epochs == 300  # the group overrides the default
