"""The `dprgb` command line: parse, resolve the config, call the library, print.

Every command is an annotated signature and one library call. User errors (`DprgbError`)
are printed as one line with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dprgb.pipeline.config import DataConfig, resolve_config
from dprgb.pipeline.errors import DprgbError

app = typer.Typer(
    help="dprgb: diffusion-policy heads on frozen vision features (RoboTwin).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
inspect_app = typer.Typer(
    help="Tell what the data, the cache or a checkpoint really holds.", no_args_is_help=True
)
app.add_typer(inspect_app, name="inspect")

console = Console()
err_console = Console(stderr=True)

# Shared option aliases: every command spells these the same way.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (defaults + groups). Default: ./dprgb.yaml")
]
TasksOpt = Annotated[
    list[str] | None, typer.Option("--tasks", "-t", help="Tasks to use (repeat, or comma-separated).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _config_path(config: Path | None) -> Path | None:
    if config is not None:
        return config
    default = Path("dprgb.yaml")
    return default if default.is_file() else None


def _split_tasks(tasks: list[str] | None) -> list[str] | None:
    if not tasks:
        return None
    return [t for entry in tasks for t in entry.replace(",", " ").split()]


def _settings(config: Path | None, group: str | None = None, **overrides: Any) -> dict:
    if "tasks" in overrides:
        overrides["tasks"] = _split_tasks(overrides["tasks"])
    return resolve_config(_config_path(config), group, overrides)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    _state["debug"] = debug


_state = {"debug": False}


# ------------------------------------------------------------------------------- demo data


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the data set into.")],
    episodes: Annotated[int, typer.Option(help="Episodes per task.")] = 10,
    min_frames: Annotated[int, typer.Option(help="Fewest frames in an episode.")] = 40,
    max_frames: Annotated[int, typer.Option(help="Most frames in an episode.")] = 56,
    realistic: Annotated[
        bool, typer.Option(help="Real feature shapes: croco 14x14x1024 fp16, vggt 28x37x2048 fp32.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the generative model.")] = 0,
) -> None:
    """Write a small data set in the real formats, and OUT/dprgb.yaml pointing at it."""
    from dprgb.pipeline.demo_data import REALISTIC_BACKBONES, DemoSpec, write_demo_data

    spec = DemoSpec(episodes=episodes, min_frames=min_frames, max_frames=max_frames, seed=seed)
    if realistic:
        spec.backbones = dict(REALISTIC_BACKBONES)
    if min_frames < 8 or max_frames < min_frames:
        raise DprgbError(f"need 8 <= min_frames <= max_frames, got {min_frames=} {max_frames=}")
    config_path = write_demo_data(out, spec)
    console.print(f"wrote demo data to {out}; config: {config_path}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, cache and runs.")] = Path(
        "dprgb_demo"
    ),
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """The whole pipeline on generated data: demo data, precompute, train every group, eval."""
    from dprgb.trainer.demo import run_demo

    start = time.perf_counter()
    report = run_demo(out, progress=progress, say=console.print)
    table = Table(title="dprgb demo: held-out episodes, sampled actions vs the mean action")
    for column in ("group", "task", "windows", "MSE", "mean-action MSE", "ratio"):
        table.add_column(column)
    for group, result in report["groups"].items():
        for task, row in result["eval"]["tasks"].items():
            table.add_row(
                group,
                task,
                str(row["windows"]),
                f"{row['mse']:.5f}",
                f"{row['baseline_mse']:.5f}",
                f"{row['ratio']:.3f}",
            )
    console.print(table)
    stages = ", ".join(f"{stage} {s:.0f}s" for stage, s in report["seconds"].items())
    console.print(f"total {time.perf_counter() - start:.0f}s ({stages})")


# --------------------------------------------------------------------------------- inspect


@inspect_app.command("action-dims")
def inspect_action_dims(config: ConfigOpt = None, tasks: TasksOpt = None, as_json: JsonOpt = False) -> None:
    """Per task: trajectory format, per-arm dofs, gripper, action dim, frames; then groups."""
    from dprgb.pipeline.report import action_dims_report

    settings = _settings(config, tasks=tasks)
    report = action_dims_report(DataConfig.from_mapping(settings), settings["groups"])
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title="action dims")
    for column in (
        "task",
        "format",
        "L dof",
        "R dof",
        "gripper",
        "action dim",
        "episodes",
        "frames min/med/max",
        "no action",
        "no features",
    ):
        table.add_column(column)
    for row in report["tasks"]:
        table.add_row(
            row["task"],
            row["format"] + ("" if row["usable"] else " (unused)"),
            str(row["left_dof"]),
            str(row["right_dof"]),
            "yes" if row["gripper"] else "no",
            str(row["action_dim"]),
            str(row["episodes"]),
            f"{row['frames_min']}/{row['frames_median']:g}/{row['frames_max']}",
            str(row["steps_lacking_action"]),
            str(row["steps_lacking_features"]),
        )
    console.print(table)
    for row in report["tasks"]:
        for note in row["notes"]:
            console.print(f"[yellow]note[/yellow] {row['task']}: {note}")
    for name, members in report["groups"].items():
        console.print(f"[bold]{name}[/bold]: {', '.join(members)}")


@inspect_app.command("features")
def inspect_features(config: ConfigOpt = None, tasks: TasksOpt = None, as_json: JsonOpt = False) -> None:
    """Per root and task: layout, shapes, dtype, chunking, compressor, frames, zero frames, bytes."""
    from dprgb.pipeline.report import features_report, human_bytes

    rows = features_report(DataConfig.from_mapping(_settings(config, tasks=tasks)))
    if as_json:
        print(json.dumps({"features": rows}))
        return
    table = Table(title="feature stores")
    for column in (
        "backbone",
        "task",
        "eps",
        "layout/policy",
        "frame",
        "dtype",
        "chunks",
        "frames",
        "zero",
        "disk",
    ):
        table.add_column(column)
    for row in rows:
        if not row["episodes"]:
            table.add_row(row["backbone"], row["task"], "0", *[""] * 7)
            continue
        table.add_row(
            row["backbone"],
            row["task"],
            str(row["episodes"]),
            f"{row['layout']}/{row['slot_policy']}",
            "x".join(map(str, row["frame_shape"])),
            row["dtype"],
            "x".join(map(str, row["chunks"])),
            str(row["frames"]),
            str(row["zero_frames"]),
            human_bytes(row["bytes"]),
        )
    console.print(table)
    if rows and rows[0].get("compressor"):
        console.print(f"compressor: {rows[0]['compressor']}")


# ------------------------------------------------------------------------------ precompute


def _precompute_tasks(settings: dict, data: DataConfig, explicit: bool) -> list[str]:
    """Named tasks are taken strictly; otherwise tasks that cannot be cached (planner
    segments without resample_segments) are skipped with a note."""
    from dprgb.pipeline.episodes import scan_task, select_tasks
    from dprgb.pipeline.report import resolve_group_tasks
    from dprgb.pipeline.trajectories import FORMAT_SEGMENTS

    if explicit:
        return list(data.tasks or [])
    if settings.get("group"):
        return resolve_group_tasks(data, settings["group"], settings["groups"])
    tasks = []
    for task in select_tasks(data):
        if scan_task(data, task).format == FORMAT_SEGMENTS and not data.resample_segments:
            err_console.print(f"note: skipping {task}: planner segments are not per-frame actions")
            continue
        tasks.append(task)
    return tasks


@app.command()
def precompute(
    config: ConfigOpt = None,
    tasks: TasksOpt = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Precompute a group's tasks.")] = None,
    encoder: Annotated[
        str | None,
        typer.Option(help="'reference', an RGB2PC checkpoint, TorchScript file or module:factory."),
    ] = None,
    encoder_weights: Annotated[str | None, typer.Option(help="State dict for a plugin encoder.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where the cache goes.")] = None,
    workers: Annotated[int | None, typer.Option(help="Parallel episodes (default: one per core).")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="'local' for a dask.distributed LocalCluster, or tcp://host:8786.")
    ] = None,
    batch_frames: Annotated[int | None, typer.Option(help="Frames per encoder call.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    cache_dtype: Annotated[str | None, typer.Option(help="float32 or float16.")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Recompute everything selected (and a stale cache).")
    ] = False,
) -> None:
    """Encode raw features through the frozen encoder into the fused [T, D] cache."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from dprgb.pipeline.precompute import PrecomputeConfig
    from dprgb.pipeline.precompute import precompute as run_precompute

    settings = _settings(
        config,
        group,
        tasks=tasks,
        encoder=encoder,
        encoder_weights=encoder_weights,
        cache_dir=str(cache_dir) if cache_dir else None,
        workers=workers,
        scheduler=scheduler,
        batch_frames=batch_frames,
        device=device,
        cache_dtype=cache_dtype,
    )
    _check_keys(settings, config)
    data = DataConfig.from_mapping(settings)
    pc = PrecomputeConfig.from_mapping(settings)
    selected = _precompute_tasks(settings, data, explicit=bool(tasks))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[episodes]} episodes"),
        TextColumn("{task.fields[rate]:.0f} frames/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        job = bar.add_task("precompute", total=None, episodes="0/?", rate=0.0)
        start = time.perf_counter()

        def on_progress(done: int, total: int, frames: int, frames_total: int) -> None:
            rate = frames / max(time.perf_counter() - start, 1e-9)
            bar.update(job, completed=frames, total=frames_total, episodes=f"{done}/{total}", rate=rate)

        result = run_precompute(data, pc, selected, overwrite=overwrite, on_progress=on_progress)
    rate = result.frames / max(result.seconds, 1e-9)
    console.print(
        f"cache {result.cache_dir}: {len(result.computed)} episodes computed ({result.frames} frames, "
        f"{rate:.0f} frames/s), {result.skipped} already cached; encoder {result.fingerprint[:12]}"
    )


@inspect_app.command("cache")
def inspect_cache(
    config: ConfigOpt = None,
    tasks: TasksOpt = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder to compare the cache against.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="The cache to inspect.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Is the cache complete and fresh for the current encoder, data and options?"""
    from dprgb.cache.manifest import read_manifest
    from dprgb.pipeline.precompute import PrecomputeConfig, cache_status

    settings = _settings(
        config, tasks=tasks, encoder=encoder, cache_dir=str(cache_dir) if cache_dir else None
    )
    data = DataConfig.from_mapping(settings)
    pc = PrecomputeConfig.from_mapping(settings)
    manifest = read_manifest(pc.cache_dir) or {}
    selected = list(data.tasks) if tasks else list(manifest.get("tasks", {}))
    status = cache_status(data, pc, selected)
    if as_json:
        print(json.dumps(status))
        return
    table = Table(title=f"cache {status['cache_dir']}  D={status['dim']} {status['feature_dtype']}")
    for column in ("task", "cached/expected", "frames", "missing", "stale", "sources gone"):
        table.add_column(column)
    for row in status["tasks"]:
        table.add_row(
            row["task"],
            f"{row['cached']}/{row['expected']}",
            str(row["frames"]),
            str(row["missing"]),
            str(row["stale"]),
            str(row["orphans"]),
        )
    console.print(table)
    state = "[red]STALE[/red]" if status["stale"] else "[green]fresh[/green]"
    reasons = [name for name in ("encoder_stale", "data_stale") if status[name]]
    console.print(
        f"{state} (cache encoder {status['cache_fingerprint'][:12]}, "
        f"current {status['current_fingerprint'][:12]}" + (f"; {', '.join(reasons)}" if reasons else "") + ")"
    )


@inspect_app.command("checkpoint")
def inspect_checkpoint(
    path: Annotated[Path, typer.Argument(help="A final_policy.pt or a features_model RGB2PC checkpoint.")],
    nhead: Annotated[
        int, typer.Option(help="Attention heads of an RGB2PC context encoder (not stored).")
    ] = 8,
    as_json: JsonOpt = False,
) -> None:
    """What a checkpoint holds: a dprgb policy's config, or an RGB2PC encoder's structure."""
    import torch

    from dprgb.pipeline.encoders import describe_rgb2pc

    try:
        keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # an RGB2PC checkpoint pickles its args: described by the restricted loader
        keys = set()
    if {"config", "policy_state", "normalizer"} <= keys:
        from dprgb.trainer.checkpoint import load_policy

        ckpt = load_policy(path)
        summary = {
            "kind": "policy",
            "path": str(path),
            "parameters": int(sum(t.numel() for t in ckpt["policy_state"].values())),
            "normalizer": sorted(ckpt["normalizer"]),
            "config": ckpt["config"],
        }
    else:
        summary = {"kind": "rgb2pc", **describe_rgb2pc(path, nhead=nhead)}
    if as_json:
        print(json.dumps(summary, default=str))
        return
    table = Table(title=f"{summary['kind']} checkpoint {path}", show_header=False)
    for key, value in (summary["config"] if summary["kind"] == "policy" else summary).items():
        table.add_row(str(key), json.dumps(value, default=str) if not isinstance(value, str) else value)
    if summary["kind"] == "policy":
        table.add_row("parameters", f"{summary['parameters']:,}")
    console.print(table)


# ----------------------------------------------------------------------------- train, eval


def _load_fresh_group(
    data: DataConfig, settings: dict, tasks: list[str], allow_stale: bool
):  # -> CachedGroup
    """The group's cache, refusing a stale or incomplete one unless told otherwise."""
    from dprgb.cache import open_cache
    from dprgb.pipeline.precompute import PrecomputeConfig, cache_status

    pc = PrecomputeConfig.from_mapping(settings)
    status = cache_status(data, pc, tasks)
    missing = {row["task"]: row["missing"] for row in status["tasks"] if row["missing"]}
    if missing:
        raise DprgbError(f"cache lacks episodes {missing}: run `dprgb precompute`", path=pc.cache_dir)
    if status["stale"] and not allow_stale:
        what = [name for name in ("encoder_stale", "data_stale") if status[name]]
        what += [f"{row['task']} episodes {row['stale']}" for row in status["tasks"] if row["stale"]]
        what += [
            f"{row['task']} episodes {row['orphans']} have no source data"
            for row in status["tasks"]
            if row["orphans"]
        ]
        raise DprgbError(
            f"cache is stale ({'; '.join(what)}): rerun `dprgb precompute --overwrite`, "
            "or pass --allow-stale-cache",
            path=pc.cache_dir,
        )
    return open_cache(pc.cache_dir).load_group(tasks)


@app.command()
def train(
    group: Annotated[str, typer.Option("--group", "-g", help="armN, or a group the config names.")],
    config: ConfigOpt = None,
    tasks: TasksOpt = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    amp: Annotated[bool | None, typer.Option(help="bf16 autocast (CUDA).")] = None,
    grad_accum_steps: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    save_dir: Annotated[Path | None, typer.Option(help="Runs go to SAVE_DIR/<group>.")] = None,
    compile: Annotated[bool | None, typer.Option(help="torch.compile the UNet.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from SAVE_DIR/<group>/checkpoints/latest.pt.")
    ] = False,
    allow_stale_cache: Annotated[bool, typer.Option(help="Train on a cache that no longer matches.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    finetune: Annotated[
        bool | None,
        typer.Option(help="Stage 2: train the encoder with the head on raw features (no cache)."),
    ] = None,
    init: Annotated[
        Path | None, typer.Option(help="Finetune from this cache-trained final_policy.pt.")
    ] = None,
    freeze_encoder: Annotated[
        bool | None, typer.Option(help="Finetune mode with the encoder kept frozen.")
    ] = None,
    encoder_lr: Annotated[float | None, typer.Option(help="The encoder's learning rate.")] = None,
    num_workers: Annotated[
        int | None, typer.Option(help="Processes decoding raw features (finetune).")
    ] = None,
    allow_encoder_mismatch: Annotated[
        bool, typer.Option(help="Finetune from a checkpoint trained on another encoder.")
    ] = False,
) -> None:
    """Fit a diffusion-policy head on the group's cached features; with --finetune, train the
    encoder too, on raw features (runs go to SAVE_DIR/<group>/finetune)."""
    from dprgb.pipeline.precompute import PrecomputeConfig
    from dprgb.pipeline.report import resolve_group_tasks
    from dprgb.trainer.config import TrainConfig
    from dprgb.trainer.finetune import finetune as run_finetune
    from dprgb.trainer.train import train as run_train

    settings = _settings(
        config,
        group,
        tasks=tasks,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        amp=amp,
        grad_accum_steps=grad_accum_steps,
        device=device,
        save_dir=str(save_dir) if save_dir else None,
        compile=compile,
        finetune=finetune,
        init_checkpoint=str(init) if init else None,
        freeze_encoder=freeze_encoder,
        encoder_lr=encoder_lr,
        num_workers=num_workers,
        allow_encoder_mismatch=allow_encoder_mismatch or None,
    )
    _check_keys(settings, config)
    data = DataConfig.from_mapping(settings)
    cfg = TrainConfig.from_mapping(settings)
    if init is not None and not cfg.finetune:
        raise DprgbError("--init starts a finetune run: add --finetune")
    selected = list(data.tasks) if tasks else resolve_group_tasks(data, group, settings["groups"])
    if cfg.finetune:
        out_dir = Path(cfg.save_dir) / group / "finetune"
        pc = PrecomputeConfig.from_mapping(settings)  # the encoder, as precompute builds it
        final = run_finetune(cfg, data, pc, selected, out_dir, resume=resume, progress=progress)
        console.print(f"{group}: {len(selected)} tasks, finetuned on raw features -> {final}")
        return
    cached = _load_fresh_group(data, settings, selected, allow_stale_cache or cfg.allow_stale_cache)
    out_dir = Path(cfg.save_dir) / group
    final = run_train(cfg, cached, out_dir, resume=resume, progress=progress)
    console.print(f"{group}: {len(selected)} tasks, {len(cached.episode_ends)} episodes -> {final}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A final_policy.pt.")],
    config: ConfigOpt = None,
    tasks: TasksOpt = None,
    plot_dir: Annotated[
        Path | None, typer.Option(help="Where PNG plots go (default: beside the checkpoint).")
    ] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Held-out MSE of sampled actions per task, beside the mean-action baseline."""
    from dprgb.trainer.checkpoint import load_policy
    from dprgb.trainer.evaluate import evaluate as run_evaluate

    policy_config = load_policy(checkpoint)["config"]
    settings = _settings(config, tasks=tasks)
    data = DataConfig.from_mapping(settings)
    selected = list(data.tasks) if tasks else list(policy_config["tasks"])
    if policy_config.get("encoder", {}).get("trainable"):
        # A finetuned encoder is in no cache: encode the raw features with it, in memory.
        from dprgb.trainer.finetune import encode_group
        from dprgb.trainer.policy import DiffusionRGBPolicy

        cached = encode_group(DiffusionRGBPolicy.from_checkpoint(checkpoint, device=device), data, selected)
    else:
        cached = _load_fresh_group(data, settings, selected, allow_stale=False)
    plots = plot_dir or checkpoint.parent / "eval"
    report = run_evaluate(checkpoint, cached, plot_dir=plots, device=device)
    if as_json:
        print(json.dumps(report))
        return
    console.print(eval_table(report, title=f"eval {checkpoint}"))
    console.print(f"plots: {plots}")


def eval_table(report: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("task", "held-out episodes", "windows", "MSE", "mean-action MSE", "ratio"):
        table.add_column(column)
    for task, row in report["tasks"].items():
        table.add_row(
            task,
            str(len(row["episodes"])),
            str(row["windows"]),
            f"{row['mse']:.5f}",
            f"{row['baseline_mse']:.5f}",
            f"{row['ratio']:.3f}",
        )
    return table


def _check_keys(settings: dict, config: Path | None) -> None:
    from dprgb.pipeline.config import check_known_keys
    from dprgb.pipeline.precompute import PrecomputeConfig
    from dprgb.trainer.config import TrainConfig

    check_known_keys(settings, DataConfig, PrecomputeConfig, TrainConfig, source=str(config or ""))


# ------------------------------------------------------------------------------------ main


def main() -> None:
    try:
        app()
    except DprgbError as err:
        if _state["debug"]:
            raise
        err_console.print(f"error: {err.one_line()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
