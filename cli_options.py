"""What every command of the `dprgb` command line shares: the typer apps, the option aliases (every
command spells --config, --tasks and --json the same way), how a command's settings are resolved
from its flags, and the --debug switch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dprgb.app.settings import Settings, load_settings

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
deploy_app = typer.Typer(help="Write what a simulator loads to run a policy.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
lerobot_app = typer.Typer(help="LeRobot datasets in, dprgb policies out.", no_args_is_help=True)
app.add_typer(lerobot_app, name="lerobot")

# Shared option aliases: every command spells these the same way.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (defaults + groups). Default: ./dprgb.yaml")
]
TasksOpt = Annotated[
    list[str] | None, typer.Option("--tasks", "-t", help="Tasks to use (repeat, or comma-separated).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", help="A final_policy.pt.")]
PluginEncoderOpt = Annotated[
    str | None, typer.Option("--encoder", help="module:factory of a plugin encoder.")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
# the two deploy commands
LiveExtractorOpt = Annotated[str, typer.Option(
    "--extractor", help="module:factory of the live feature extractor "
                        "(RGB frames -> the policy's feature maps).")]
PolicyNameOpt = Annotated[str | None, typer.Option("--name", help="The policy's name: writes OUT/NAME.")]


def settings_of(config: Path | None, group: str | None = None, **flags: Any) -> Settings:
    """The command's settings from --config (or the default file) and the flags."""
    if flags.get("tasks"):
        flags["tasks"] = [t for entry in flags["tasks"] for t in entry.replace(",", " ").split()]
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    return load_settings(config, group, flags)


state = {"debug": False}  # --debug: tracebacks instead of one-line errors


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    state["debug"] = debug
