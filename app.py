"""What each command does, with every gate: the layer `cli.py` and `dprgb demo` call.

A command's settings are one resolved mapping (YAML defaults, the group's keys, flags),
checked against `KEY_OWNERS`, the one table of which concern owns which key; each function
here builds the configs it needs from it, applies the gates (a stale or incomplete cache is
refused, an init must fit), chooses the run folders, and returns plain results for the CLI
to render.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dprgb.config import (
    STRUCTURE_KEYS,
    Config,
    DeviceConfig,
    resolve_config,
    unknown_keys_error,
)
from dprgb.errors import DprgbError
from dprgb.pipeline.config import DataConfig, EncoderConfig, PrecomputeConfig

# ---- the key table ---------------------------------------------------------------------------


def _config_types() -> tuple[type[Config], ...]:
    from dprgb.trainer.config import FinetuneConfig, ModelConfig, TrainConfig

    return (DataConfig, EncoderConfig, PrecomputeConfig, DeviceConfig, ModelConfig, TrainConfig,
            FinetuneConfig)


def key_owners() -> dict[str, type[Config]]:
    """Every config key -> the one dataclass that owns it."""
    owners: dict[str, type[Config]] = {}
    for config_type in _config_types():
        for key in config_type.keys():
            assert key not in owners, f"{key} is owned by {owners[key].__name__} and {config_type.__name__}"
            owners[key] = config_type
    return owners


@dataclass
class Settings:
    """One command's resolved settings; each concern's config is built from them on demand."""

    mapping: dict[str, Any]
    source: str | None  # the config file, for messages

    def get(self, config_type: type[Config]) -> Any:
        return config_type.from_mapping(self.mapping)

    @property
    def group(self) -> str | None:
        return self.mapping.get("group")

    @property
    def groups(self) -> dict[str, Any]:
        return self.mapping.get("groups") or {}


DEFAULT_CONFIG = Path("dprgb.yaml")  # what every command reads when given no --config


def load_settings(config_path: str | Path | None, group: str | None = None,
                  overrides: Mapping[str, Any] | None = None, *,
                  default: Path | None = DEFAULT_CONFIG) -> Settings:
    """Resolve the file (`default` when none is given and it exists), the group and the
    flags; refuse any key no concern owns, in the file's defaults and in every group, with the
    closest known key as a hint."""
    if config_path is None and default is not None and default.is_file():
        config_path = default
    mapping = resolve_config(config_path, group, overrides)
    known = set(key_owners()) | set(STRUCTURE_KEYS)
    unknown = set(mapping) - known
    for name, group_keys in mapping["groups"].items():
        if not isinstance(group_keys, dict):
            raise DprgbError(f"group {name!r} must be a mapping of keys to values", path=config_path)
        unknown |= set(group_keys) - known
    if unknown:
        raise unknown_keys_error(unknown, known, str(config_path) if config_path else None)
    return Settings(mapping, str(config_path) if config_path else None)


# ---- inspect ---------------------------------------------------------------------------------


def action_dims(settings: Settings) -> dict[str, Any]:
    from dprgb.pipeline.report import action_dims_report

    return action_dims_report(settings.get(DataConfig), settings.groups)


def feature_stores(settings: Settings) -> list[dict[str, Any]]:
    from dprgb.pipeline.report import features_report

    return features_report(settings.get(DataConfig))


def cache_report(settings: Settings, tasks_named: bool) -> dict[str, Any]:
    """`inspect cache`: the named tasks, else every task the cache's manifest lists."""
    from dprgb.cache.manifest import read_manifest

    data, pc = settings.get(DataConfig), settings.get(PrecomputeConfig)
    manifest = read_manifest(pc.cache_dir) or {}
    selected = list(data.tasks or []) if tasks_named else list(manifest.get("tasks", {}))
    return _cache_status(settings, _scans(data, selected))[0]


def checkpoint_summary(path: Path, nhead: int | None) -> dict[str, Any]:
    """A dprgb policy file's config, or an RGB2PC checkpoint's structure."""
    from dprgb.pipeline.encoders import describe_rgb2pc
    from dprgb.trainer.checkpoint import POLICY_FORMAT, load, load_policy

    try:
        fmt = load(path, (), "checkpoint").get("format")
    except DprgbError:  # an RGB2PC checkpoint pickles its args: described by the restricted loader
        fmt = None
    if fmt != POLICY_FORMAT:
        return {"kind": "rgb2pc", **describe_rgb2pc(path, **({"nhead": nhead} if nhead else {}))}
    ckpt = load_policy(path)
    return {"kind": "policy", "path": str(path), "format": ckpt["format"],
            "parameters": int(sum(t.numel() for t in ckpt["policy_state"].values())),
            "encoder_parameters": int(sum(t.numel() for t in ckpt["encoder_state"].values())),
            "normalizer": sorted(ckpt["normalizer"]), "config": ckpt["config"]}


# ---- precompute ------------------------------------------------------------------------------


def _scans(data: DataConfig, tasks: list[str]) -> list:
    from dprgb.pipeline.episodes import scan_task

    return [scan_task(data, task) for task in tasks]


def precompute_tasks(settings: Settings, tasks_named: bool) -> tuple[list[str], list[str]]:
    """(tasks to precompute, notes). Named tasks are taken strictly; a group's tasks are its
    own; otherwise every selected task, skipping (with a note) those that cannot be cached."""
    from dprgb.pipeline.episodes import scan_task, select_tasks, usability_problem
    from dprgb.pipeline.report import resolve_group_tasks

    data = settings.get(DataConfig)
    if tasks_named:
        return list(data.tasks or []), []
    if settings.group:
        return resolve_group_tasks(data, settings.group, settings.groups), []
    tasks, notes = [], []
    for task in select_tasks(data):
        problem = usability_problem(data, scan_task(data, task))
        if problem is None:
            tasks.append(task)
        else:
            notes.append(f"skipping {task}: {problem.split(';')[0]}")
    return tasks, notes


def precompute(settings: Settings, tasks: list[str], *, overwrite: bool = False,
               on_progress: Callable[[int, int, int, int], None] | None = None) -> Any:
    from dprgb.pipeline.precompute import precompute as run_precompute

    return run_precompute(settings.get(DataConfig), settings.get(EncoderConfig),
                          settings.get(PrecomputeConfig), settings.get(DeviceConfig), tasks,
                          overwrite=overwrite, on_progress=on_progress)


# ---- the cache gate --------------------------------------------------------------------------


def _cache_status(settings: Settings, scans: list) -> tuple[dict[str, Any], Any]:
    """(status, the encoder spec the status was computed with)."""
    from dprgb.pipeline.encoding import encoder_spec
    from dprgb.pipeline.precompute import cache_status

    data, encoder, device = settings.get(DataConfig), settings.get(EncoderConfig), settings.get(DeviceConfig)
    status = cache_status(data, encoder, settings.get(PrecomputeConfig), device, scans)
    return status, encoder_spec(encoder, device, scans)


def fresh_cached_group(settings: Settings, scans: list, allow_stale: bool = False) -> tuple[Any, Any]:
    """(the tasks' CachedGroup, the encoder spec), refusing a stale or incomplete cache
    unless `allow_stale_cache`."""
    from dprgb.cache import open_cache

    pc = settings.get(PrecomputeConfig)
    status, spec = _cache_status(settings, scans)
    missing = {row["task"]: row["missing"] for row in status["tasks"] if row["missing"]}
    if missing:
        raise DprgbError(f"cache lacks episodes {missing}: run `dprgb precompute`", path=pc.cache_dir)
    if status["stale"] and not (allow_stale or pc.allow_stale_cache):
        what = [name for name in ("encoder_stale", "data_stale") if status[name]]
        what += [f"{row['task']} episodes {row['stale']}" for row in status["tasks"] if row["stale"]]
        what += [f"{row['task']} episodes {row['orphans']} have no source data"
                 for row in status["tasks"] if row["orphans"]]
        raise DprgbError(
            f"cache is stale ({'; '.join(what)}): rerun `dprgb precompute --overwrite`, "
            "or pass --allow-stale-cache",
            path=pc.cache_dir,
        )
    return open_cache(pc.cache_dir).load_group([scan.task for scan in scans]), spec


# ---- train -----------------------------------------------------------------------------------


def run_folder(settings: Settings, group: str, finetune: bool) -> Path:
    from dprgb.trainer.config import TrainConfig

    out = Path(settings.get(TrainConfig).save_dir) / group
    return out / "finetune" if finetune else out


def group_tasks(settings: Settings, group: str, tasks_named: bool) -> list[str]:
    from dprgb.pipeline.report import resolve_group_tasks

    data = settings.get(DataConfig)
    return list(data.tasks or []) if tasks_named else resolve_group_tasks(data, group, settings.groups)


def train(settings: Settings, group: str, tasks: list[str], *, resume: bool = False,
          progress: bool = True, allow_stale_cache: bool = False) -> dict[str, Any]:
    """Cache mode, or finetune mode when `finetune` is set; returns what was trained where."""
    from dprgb.pipeline.episodes import observation_spec
    from dprgb.trainer.config import FinetuneConfig, ModelConfig, TrainConfig

    ft = settings.get(FinetuneConfig)
    if ft.init_checkpoint and not ft.finetune:
        raise DprgbError("--init starts a finetune run: add --finetune")
    model, cfg, device = settings.get(ModelConfig), settings.get(TrainConfig), settings.get(DeviceConfig)
    data = settings.get(DataConfig)
    scans = _scans(data, tasks)
    out_dir = run_folder(settings, group, ft.finetune)
    if ft.finetune:
        from dprgb.pipeline.encoding import encoder_spec
        from dprgb.trainer.finetune import finetune
        from dprgb.trainer.streaming import raw_group

        spec = encoder_spec(settings.get(EncoderConfig), device, scans)
        final = finetune(model, cfg, ft, device, raw_group(data, scans), spec, observation_spec(scans),
                         out_dir, resume=resume, progress=progress)
        return {"group": group, "tasks": tasks, "mode": "finetune", "checkpoint": final}
    from dprgb.trainer.train import train as run_train

    cached, spec = fresh_cached_group(settings, scans, allow_stale_cache)
    final = run_train(model, cfg, device, cached, spec, observation_spec(scans), out_dir,
                      resume=resume, progress=progress)
    return {"group": group, "tasks": tasks, "mode": "cache", "episodes": len(cached.episode_ends),
            "checkpoint": final}


# ---- eval ------------------------------------------------------------------------------------


def evaluate(settings: Settings, checkpoint: Path, *, tasks_named: bool = False,
             plot_dir: Path | None = None) -> dict[str, Any]:
    """Held-out MSE per task of the policy at `checkpoint`, on the episodes it held out: from
    the cache (which must be fresh and made by the policy's encoder) or, for a policy whose
    encoder was trained, from raw features through its own encoder."""
    import numpy as np

    from dprgb.trainer.cache_source import heldout_of
    from dprgb.trainer.evaluate import evaluate as run_evaluate
    from dprgb.trainer.policy import DiffusionRGBPolicy
    from dprgb.trainer.streaming import encoded_heldout, raw_group
    from dprgb.trainer.windows import WindowIndex

    device = settings.get(DeviceConfig).torch_device()
    plugin = settings.get(EncoderConfig).encoder if ":" in settings.get(EncoderConfig).encoder else None
    policy = DiffusionRGBPolicy.from_checkpoint(checkpoint, device, encoder=plugin)
    config = policy.config
    tasks = list(settings.get(DataConfig).tasks or []) if tasks_named else list(config["tasks"])
    scans = _scans(settings.get(DataConfig), tasks)
    held_out = {(task, int(ep)) for task, ep in config["run"]["val_episodes"]}
    if config["encoder"].get("trained"):
        group = raw_group(settings.get(DataConfig), scans)
    else:
        group, _ = fresh_cached_group(settings, scans)
        if group.fingerprint != config["cache_fingerprint"]:
            raise DprgbError(f"the policy was trained on cache {config['cache_fingerprint'][:12]}, this "
                             f"cache is {group.fingerprint[:12]}", path=checkpoint)
    val = np.array([(group.tasks[t], int(i)) in held_out
                    for t, i in zip(group.episode_task, group.episode_index, strict=True)])
    model = policy.model_config
    index = WindowIndex.build(group.episode_ends, ~val, model.horizon, model.n_obs_steps,
                              model.n_action_steps, for_training=False)
    if len(index.val_ids) == 0:
        raise DprgbError(f"nothing to evaluate: the policy held out no episode (with a whole window) "
                         f"of tasks {tasks}", path=checkpoint)
    held = (encoded_heldout(policy, group, index, device) if config["encoder"].get("trained")
            else heldout_of(group, index, device))
    episodes = {task: sorted(int(i) for t, i in held_out if t == task) for task in tasks}
    report = run_evaluate(policy, held, episodes, plot_dir=plot_dir or checkpoint.parent / "eval")
    return {**report, "plots": str(plot_dir or checkpoint.parent / "eval")}


# ---- demo ------------------------------------------------------------------------------------

# The demo's training settings, written into its dprgb.yaml so that `dprgb train -c
# OUT/dprgb.yaml --group arm7` repeats them. A small UNet fits the 5-minute CPU budget.
# prediction_type "sample" departs from the reference's "epsilon" for a measured reason: on
# this data with this budget (~900 steps of a (32, 64, 128) UNet) sample prediction reached
# a held-out MSE 0.01-0.05 x the mean-action baseline, epsilon prediction 2.1-3.4 x (it needs
# far more steps). `dprgb train` itself keeps the reference defaults.
DEMO_SETTINGS = {
    "down_dims": [32, 64, 128],
    "diffusion_step_embed_dim": 32,
    "prediction_type": "sample",
    "batch_size": 64,
    "lr": 1.0e-3,
    "lr_warmup_steps": 50,
    "epochs": 40,
    "val_episodes_per_task": 2,
    "val_every_epochs": 20,
}


def demo_data(out: Path, *, realistic: bool = False, **values: int | None) -> Path:
    """`dprgb demo-data`: the data set under `out`; returns its dprgb.yaml."""
    from dprgb.pipeline.demo_data import demo_spec, write_demo_data

    return write_demo_data(out, demo_spec(realistic=realistic, **values))


def demo(out: Path, *, spec: Any = None, progress: bool = True,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """demo data (real formats) -> inspect (groups from the data) -> precompute -> train every
    group -> eval, through the same functions as the commands. Returns {"groups": {group:
    {"tasks", "eval", "checkpoint"}}, "seconds": {stage: s}}."""
    from dprgb.pipeline.demo_data import write_demo_data

    out, seconds = Path(out), {}
    start = time.perf_counter()
    config_path = write_demo_data(out, spec, extra_config=DEMO_SETTINGS)
    seconds["demo data"] = time.perf_counter() - start
    say(f"demo data: {out} (config {config_path})")
    groups = action_dims(load_settings(config_path))["groups"]
    say("groups: " + "; ".join(f"{name}: {len(tasks)} tasks" for name, tasks in groups.items()))

    start = time.perf_counter()
    result = precompute(load_settings(config_path), [task for tasks in groups.values() for task in tasks])
    seconds["precompute"] = time.perf_counter() - start
    say(f"precompute: {len(result.computed)} episodes, {result.frames} frames -> {result.cache_dir}")

    report: dict[str, Any] = {}
    for group, tasks in groups.items():
        settings = load_settings(config_path, group)
        start = time.perf_counter()
        final = train(settings, group, tasks, progress=progress)["checkpoint"]
        seconds[f"train {group}"] = time.perf_counter() - start
        start = time.perf_counter()
        report[group] = {"tasks": tasks, "checkpoint": str(final), "eval": evaluate(settings, final)}
        seconds[f"eval {group}"] = time.perf_counter() - start
        say(f"{group}: trained {final}")
    return {"groups": report, "seconds": seconds}
