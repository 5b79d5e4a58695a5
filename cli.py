"""The `dprgb` command line: parse, resolve the config, call the library, print.

Every command is an annotated signature and one library call. User errors (`DprgbError`)
are printed as one line with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
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
inspect_app = typer.Typer(help="Tell what the data, the cache or a checkpoint really holds.", no_args_is_help=True)
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
    for column in ("backbone", "task", "eps", "layout/policy", "frame", "dtype", "chunks", "frames", "zero", "disk"):
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
