"""The `dprgb` commands from a policy file to a robot: rollout, deploy robotwin | xpolicylab,
check-features, lerobot import | export (the data commands are in `cli.py`). Each command imports
its application module when it runs (see `cli.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dprgb import cli_render as render
from dprgb.cli_options import (
    CheckpointOpt,
    ConfigOpt,
    JsonOpt,
    LiveExtractorOpt,
    PluginEncoderOpt,
    PolicyNameOpt,
    TasksOpt,
    app,
    deploy_app,
    lerobot_app,
    settings_of,
)
from dprgb.cli_render import err_console
from dprgb.errors import DprgbError


@app.command()
def rollout(
    checkpoint: CheckpointOpt,
    env: Annotated[str, typer.Option(help="module:factory making the env, e.g. "
                                          "dprgb.deploy.metaworld:make_env.")],
    env_option: Annotated[
        list[str] | None, typer.Option(help="key=value passed to the env factory (repeat).")
    ] = None,
    episodes: Annotated[int, typer.Option(help="Episodes to run.")] = 10,
    seed: Annotated[int, typer.Option(help="Episode i is reset with seed SEED + i.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Results folder (default: rollouts/ beside the checkpoint).")
    ] = None,
    video: Annotated[bool, typer.Option(help="A GIF per episode (the env must render).")] = False,
    task: Annotated[str | None, typer.Option(help="The policy's task to act for (multi-task).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, auto ...")] = "cpu",
    extractor: Annotated[str | None, typer.Option(
        help="module:factory of the feature extractor: act on the env's camera frames (live features)."
    )] = None,
    num_inference_steps: Annotated[int | None, typer.Option(help="Denoising steps per plan (default: the "
                                                                 "policy's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Drive an environment with the policy (closed loop): success rate, episode lengths, the time
    of each act call (render, extract, encode, sample), per-episode results in OUT/rollouts.json."""
    say = None if as_json else render.rollout_episode

    from dprgb.app import rollout as command

    result = command.run(checkpoint, env, env_options=env_option, episodes=episodes, seed=seed,
                         out_dir=out, video=video, task=task, device=device, extractor=extractor,
                         num_inference_steps=num_inference_steps, on_episode=say)
    if as_json:
        print(json.dumps(result))
        return
    render.rollout(result)


@deploy_app.command("robotwin")
def deploy_robotwin(
    checkpoint: CheckpointOpt,
    extractor: LiveExtractorOpt,
    out: Annotated[Path, typer.Option(help="The folder to write, RoboTwin's policy/<NAME> (with --name: "
                                           "the folder it goes into, RoboTwin's policy/).")],
    name: PolicyNameOpt = None,
    task: Annotated[str | None, typer.Option(help="The policy's task (default: its only one, or the "
                                                  "one named like RoboTwin's task_name).")] = None,
    camera: Annotated[str, typer.Option(help="The camera the extractor sees.")] = "head_camera",
    device: Annotated[str, typer.Option(help="Where the policy runs in RoboTwin: cuda, cuda:N, cpu, "
                                             "auto.")] = "cuda",
    encoder: PluginEncoderOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a folder this command wrote.")] = False,
) -> None:
    """Write the policy folder RoboTwin 2.0's evaluation imports (deploy_policy.py/.yml,
    the policy file, eval.sh), thin over dprgb's runtime."""
    from dprgb.app import deploy as command

    result = command.robotwin(checkpoint, extractor, out, name=name, task=task, camera=camera,
                                         device=device, encoder=encoder, overwrite=overwrite)
    render.deployed_robotwin(result)


@deploy_app.command("xpolicylab")
def deploy_xpolicylab(
    checkpoint: CheckpointOpt,
    extractor: LiveExtractorOpt,
    out: Annotated[Path, typer.Option(help="The folder to write, XPolicyLab's policy/<NAME> (with --name: "
                                           "the folder it goes into, XPolicyLab's policy/).")],
    name: PolicyNameOpt = None,
    task: Annotated[str | None, typer.Option(help="The policy's task (default: its only one, or the "
                                                  "one named like XPolicyLab's task_name).")] = None,
    camera: Annotated[str, typer.Option(help="The camera the extractor sees (vision.CAMERA.color).")
                      ] = "cam_head",
    device: Annotated[str, typer.Option(help="Where the policy server runs it: cuda, cuda:N, cpu, "
                                             "auto.")] = "cuda",
    encoder: PluginEncoderOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a folder this command wrote.")] = False,
) -> None:
    """Write the policy folder XPolicyLab serves to RoboTwin's simulator (model.py, deploy.py,
    deploy.yml, its scripts, the policy file), thin over dprgb's runtime."""
    from dprgb.app import deploy as command

    result = command.xpolicylab(checkpoint, extractor, out, name=name, task=task, camera=camera,
                                           device=device, encoder=encoder, overwrite=overwrite)
    render.deployed_xpolicylab(result)


@lerobot_app.command("import")
def lerobot_import(
    dataset: Annotated[Path, typer.Option(help="A LeRobotDataset v3.0 or v2.1 folder (meta/info.json).")],
    out: Annotated[Path, typer.Option(help="The trajectory root to write: "
                                           "OUT/BASE/CONFIG/data/episode<i>.hdf5.")],
    base: Annotated[str | None, typer.Option(help="The task's base name (default: the folder's "
                                                  "name).")] = None,
    config: Annotated[str, typer.Option(help="The task's config name.")] = "lerobot",
    arms: Annotated[str | None, typer.Option(help="Each arm's joints, a gripper after each, e.g. "
                                                  "left:6,right:6 (default: from the action size).")] = None,
    camera: Annotated[list[str] | None, typer.Option(help="VIDEO_KEY=NAME: a camera's name in the HDF5 "
                                                          "(repeat; default: the key's last part).")] = None,
    episodes: Annotated[str | None, typer.Option(help="Episode indices, e.g. 0,1,2 (default: all).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace episodes already imported.")] = False,
) -> None:
    """Import LeRobot episodes (frames from the mp4s, state and actions from the parquet) as
    RoboTwin HDF5 episodes, which every dprgb reader takes."""
    cameras = dict(item.split("=", 1) for item in camera or [] if "=" in item)
    if len(cameras) != len(camera or []):
        raise DprgbError(f"--camera takes VIDEO_KEY=NAME, got {camera}")
    picked = None if episodes is None else [int(e) for e in episodes.replace(",", " ").split()]
    from dprgb.app import lerobot as command

    result = command.import_dataset(dataset, out, base=base, config=config, arms=arms, cameras=cameras,
                                        episodes=picked, overwrite=overwrite)
    render.lerobot_imported(result)


@lerobot_app.command("export")
def lerobot_export(
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option(help="The directory to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a directory this command wrote.")] = False,
) -> None:
    """Write a policy as a LeRobot policy directory (config.json, model.safetensors, the normalizer
    statistics), which dprgb also loads (--checkpoint DIR)."""
    from dprgb.app import lerobot as command

    result = command.export_policy(checkpoint, out, overwrite=overwrite)
    render.lerobot_exported(result)


@app.command("check-features")
def check_features(
    extractor: Annotated[str, typer.Option(help="module:factory of your live feature extractor "
                                                "(the interface: dprgb.pipeline.extractor).")],
    config: ConfigOpt = None,
    tasks: TasksOpt = None,
    episodes: Annotated[str | None, typer.Option(help="Episode numbers of each task, e.g. 0,1 "
                                                      "(default: the first 2).")] = None,
    camera: Annotated[str | None, typer.Option(help="The HDF5 camera: observation/CAMERA/rgb (default: the "
                                                    "task name's, e.g. head_camera).")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Relative error a step may have and pass (default: "
                                                         "the store dtype's rounding + 1e-3).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run your live extractor on recorded frames as the runtime would and compare with the stored
    features, per backbone (cosine, relative error, worst steps, verdict, likely cause).
    Exit code 0: every backbone passes; 3: one is close, not identical; 1: one fails; 2: bad input."""
    settings = settings_of(config, tasks=tasks)
    say = None if as_json else lambda task, ep: err_console.print(f"checking {task} episode {ep}",
                                                                   highlight=False)
    from dprgb.app import check_features as command

    report = command.run(settings, extractor, tasks_named=bool(tasks), episodes=episodes, camera=camera,
                         tolerance=tolerance, on_episode=say)
    if as_json:
        print(json.dumps(report))
    else:
        render.parity(report)
    if report["verdict"] != "pass":
        raise typer.Exit(PARITY_EXIT[report["verdict"]])


PARITY_EXIT = {"pass": 0, "fail": 1, "close": 3}  # 2 is bad input, as for every command
