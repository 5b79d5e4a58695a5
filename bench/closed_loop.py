"""Closed-loop success in Meta-World: scripted-expert demonstrations -> precompute -> train ->
rollout, per task, recipe and proprioception setting, beside the scripted expert on the SAME
evaluation seeds.

Per task (`--env`, a Meta-World name): `--demos` successful expert demonstrations (seeds 0, 1,
..., failures discarded) written in dprgb's input formats by `dprgb.deploy.metaworld_demos` (the
39-d simulator state as a 1x1 `state` feature map, the mocap target + gripper as per-step
pickles), `dprgb precompute` with the pooled encoder (the head observes the state itself),
`dprgb train` of the small head (down_dims [64, 128, 256], batch 64, `--steps` optimizer
steps, every demonstration trained on), then `--episodes` rollouts from evaluation seeds
100000, 100001, ... (disjoint from the demonstrations'). Each stage goes through the
application functions the commands call (`dprgb.app`) and the rollout function `dprgb
rollout` calls.

    python bench/closed_loop.py --env reach-v3 --env pick-place-v3 --recipe old --recipe new \
        --proprio both --steps 1500 --episodes 50
    python bench/closed_loop.py --env pick-place-v3 --recipe new --steps 5000 --set lr=3e-4

Recipes are config overrides only (`RECIPES`; `--set key=value` adds to each); "old" is the
reference recipe, "new" the trainer's defaults. Demonstrations and caches are kept under
`--work` and reused by later runs; with `--reuse-runs` (pixel rows) so are the trained runs
whose settings, data and cache pass the trainer's resume check.
Results: a table on stdout, and with `--results-md FILE` one markdown row per measurement
(with its exact configuration) appended as it is measured.

From pixels (`--obs rgb`): the demonstrations are recorded with the camera (`--camera`,
`--size`; `--camera corner3+corner`: both views side by side in each frame, `--size` each, for
an extractor such as `dprgb.pipeline.reference_extractor:camera_pair`; RoboTwin HDF5 episodes
with JPEG frames, `dprgb.deploy.metaworld_demos`), `dprgb extract`
runs the extractor (`--extractor module:factory`, default the built-in reference extractor
`dprgb.pipeline.reference_extractor:camera`; its backbones from the extractor, or `--backbone
NAME[:causal|any]`) over them into per-frame stores, and per task these rows are measured on
the same demonstrations and evaluation seeds, each with `--steps` optimizer steps:

    state     the 39-d state (pooled), as above: the state-based success at the same budget
    stage1    pixel features -> `--pixel-encoder` (default spatial) -> head, on the cache
    stage2    stage1's policy finetuned end to end on the stores (`--finetune --init`), `--steps`
              more: twice the state row's steps in all
    pooled    pixel features -> mean token (`encoder: pooled`), stage 1: the baseline

Pixel rollouts render the camera every step and compute the features live through the same
extractor (`PolicyRunner(extractor=...)`); each row gives the time per act call split into
render, extract, encode, sample. `--inference-steps K` (repeat) adds, per task of
`--latency-env` (default: the first two), the stage-1 policy rolled out again with K denoising
steps: success and act latency against num_inference_steps.

    python bench/closed_loop.py --obs rgb --env drawer-open-v3 --env pick-place-v3 \
        --steps 1500 --episodes 50 --inference-steps 1 --inference-steps 2 --inference-steps 4 \
        --inference-steps 10 --results-md results.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprgb.app import extract as app_extract
from dprgb.app import precompute as app_precompute
from dprgb.app import train as app_train
from dprgb.app.settings import load_settings
from dprgb.deploy.metaworld import DEFAULT_MAX_STEPS, DEFAULT_PIXEL_CAMERA, EVAL_SEED, PixelSpec, make_env
from dprgb.deploy.metaworld_demos import expert_rollouts, write_expert_demos, write_rgb_config
from dprgb.deploy.rollout import TIME_SPLIT, parse_env_options, rollout
from dprgb.deploy.runtime import PolicyRunner
from dprgb.errors import DprgbError
from dprgb.naming import KNOWN_BACKBONES, default_slot_policy
from dprgb.pipeline.extractor import extractor_backbones, load_extractor
from dprgb.trainer.config import ModelConfig, TrainConfig
from dprgb.trainer.run_folder import RunFolder
from dprgb.trainer.windows import windows_per_episode

# What every run shares: the budget (small head, batch 64, all demonstrations). `epochs`
# is set per run (`epochs_for`) so that the LR schedule (warmup, then cosine to 0 over
# epochs x steps per epoch) ends at the step budget, as a run of that length would.
COMMON = {"down_dims": [64, 128, 256], "batch_size": 64, "val_episodes_per_task": 0, "device": "cpu",
          "log_every_steps": 500}
# Config overrides per recipe. "old" is the reference diffusion_policy recipe (epsilon, lr 1e-4,
# warmup 500; EMA power 0.75, To 2, Ta 8, H 16), the trainer's defaults before these numbers;
# "new" is the trainer's defaults now (sample, lr 1e-3, warmup 100, an observation MLP of 128),
# the screening's base ("sample-lr1e-3", ...) the same without the MLP. Every other recipe names
# the four keys it is about, so a change of the trainer's defaults never relabels it.
OLD = {"prediction_type": "epsilon", "lr": 1e-4, "lr_warmup_steps": 500, "obs_encoder_dim": 0}
SCREENED = {"prediction_type": "sample", "lr": 1e-3, "lr_warmup_steps": 100, "obs_encoder_dim": 0}
FAST = {**SCREENED, "obs_encoder_dim": 128}  # the defaults now
RECIPES: dict[str, dict[str, Any]] = {
    "old": OLD,
    "new": FAST,
    "sample": {**OLD, "prediction_type": "sample"},
    "eps-lr1e-3": {**SCREENED, "prediction_type": "epsilon"},
    "sample-lr1e-3": SCREENED,
    "sample-lr1e-3-ta4": {**SCREENED, "n_action_steps": 4},
    "sample-lr1e-3-noema": {**SCREENED, "ema_max_decay": 0.0},
    "sample-lr1e-3-to1": {**SCREENED, "n_obs_steps": 1},
    "sample-lr1e-3-wd": {**SCREENED, "weight_decay": 0.1},
    "sample-lr1e-3-obsmlp": FAST,
}
PROPRIO = {"off": "none", "on": "layout"}


def data_for(work: Path, env: str, demos: int, max_steps: int) -> tuple[Path, str, dict]:
    """(config, task, demo report): the task's demonstrations, written once per setting."""
    root = work / "data" / f"{env}-{demos}-m{max_steps}"
    if (root / "demos.json").is_file() and (root / "dprgb.yaml").is_file():
        report = json.loads((root / "demos.json").read_text())
    else:
        _, report = write_expert_demos(root, [env], demos, max_steps=max_steps)
    (task,) = report
    config = root / "dprgb.yaml"
    app_precompute.run(load_settings(config, overrides={"device": "cpu"}), [task])  # only what is missing
    return config, task, report[task]


def epochs_for(steps: int, lengths: list[int], overrides: dict[str, Any]) -> int:
    """The fewest epochs holding `steps` optimizer steps of the demonstrations' windows."""
    model, train = ModelConfig.from_mapping(overrides), TrainConfig.from_mapping(overrides)
    ends = np.cumsum([n - 1 for n in lengths])  # steps with an action: the last frame has none
    windows = int(windows_per_episode(ends, model.horizon, model.n_obs_steps - 1,
                                      model.n_action_steps - 1).sum())
    return math.ceil(steps / max(windows // train.batch_size, 1))


def train_and_roll(config: Path, task: str, env: str, overrides: dict, run_dir: Path,
                   args: argparse.Namespace, seeds: range) -> dict[str, Any]:
    settings = load_settings(config, overrides={**overrides, "save_dir": str(run_dir)})
    start = time.perf_counter()
    final = app_train.run(settings, "run", [task], progress=False, overwrite_run=True)["checkpoint"]
    train_s = time.perf_counter() - start
    runner = PolicyRunner.from_checkpoint(final, "cpu", seed=seeds.start)
    start = time.perf_counter()
    result = rollout(runner, make_env, len(seeds), seeds.start, run_dir / "rollouts",
                     env_kwargs={"task": env, "max_steps": args.max_steps})
    return {"train_s": train_s, "rollout_s": time.perf_counter() - start, "summary": result["summary"],
            "checkpoint": str(final), "overhead": runner.overhead()}


def markdown_row(row: dict[str, Any]) -> str:
    config = json.dumps(row["overrides"], separators=(",", ":"))
    return (f"| {row['task']} | {row['recipe']} | {row['proprio']} | {row['steps']} | {row['success']:.2f} | "
            f"{row['expert']:.2f} | {row['episodes']} | {row['mean_length']:.1f} | {row['train_s']:.0f} | "
            f"{row['rollout_s']:.0f} | `{config}` |")


MD_HEADER = ("| task | recipe | proprio | steps | dprgb success | expert success | episodes | mean length | "
             "train s | rollout s | configuration (overrides of the defaults) |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work)
    seeds = range(args.eval_seed, args.eval_seed + args.episodes)
    proprios = ["off", "on"] if args.proprio == "both" else [args.proprio]
    extra = parse_env_options(args.set)
    rows = []
    for env in args.env:
        config, task, demos = data_for(work, env, args.demos, args.max_steps)
        if max(demos["seeds"]) >= seeds.start:
            raise DprgbError(f"demonstration seeds reach the evaluation seeds ({seeds.start})")
        expert = expert_rollouts(env, list(seeds), args.max_steps)
        expert_rate = sum(r["success"] for r in expert) / len(expert)
        print(f"{env}: {len(demos['seeds'])} demos ({demos['discarded']} discarded), expert success "
              f"{expert_rate:.2f} on seeds {seeds.start}..{seeds.stop - 1}", flush=True)
        for recipe in args.recipe:
            for proprio in proprios:
                for steps in args.steps:
                    overrides = {**RECIPES[recipe], **extra, "max_steps": steps, "proprio": PROPRIO[proprio]}
                    overrides["epochs"] = epochs_for(steps, demos["lengths"], {**COMMON, **overrides})
                    label = "-".join([recipe, proprio, str(steps)] + [f"{k}{v}" for k, v in extra.items()])
                    measured = train_and_roll(config, task, env, {**COMMON, **overrides},
                                              work / "runs" / env / label, args, seeds)
                    s = measured["summary"]
                    added = ",".join(f"{k}={v}" for k, v in extra.items())
                    row = {"task": env, "recipe": recipe + (f"+{added}" if extra else ""),
                           "proprio": proprio, "steps": steps, "success": s["success_rate"],
                           "expert": expert_rate, "episodes": s["episodes"], "mean_length": s["mean_length"],
                           "train_s": measured["train_s"], "rollout_s": measured["rollout_s"],
                           "act_ms_per_step": s["act_ms_per_step"], "overrides": overrides,
                           "demos": len(demos["seeds"]), "checkpoint": measured["checkpoint"]}
                    rows.append(row)
                    print(markdown_row(row), flush=True)
                    if args.results_md:
                        with open(args.results_md, "a") as f:
                            f.write(markdown_row(row) + "\n")
    return rows


# ---- from pixels (--obs rgb) -------------------------------------------------------------------

REFERENCE_EXTRACTOR = "dprgb.pipeline.reference_extractor:camera"
PIXEL_SIZE = 96  # square camera frames (each view), pixels
PIXEL_ENCODER = "spatial"  # the measured default for pixel features (README, EncoderConfig.encoder)
PIXEL_PROPRIO = "on"  # the robot's own state beside the camera, as RoboTwin's DP takes agent_pos


def pixel_backbones(extractor: Any, named: list[str] | None, size: int) -> dict[str, str]:
    """{backbone: slot policy}: `--backbone NAME[:causal|any]`, else the extractor's own list
    (cross-frame ones causal: its `cross_frame(name)` where it has one, else dprgb's default), else
    the first of dprgb's backbone names it answers on a grey frame (with a note)."""
    if named:
        pairs = [entry.partition(":")[::2] for entry in named]
        return {name: policy or default_slot_policy(name) for name, policy in pairs}
    names = extractor_backbones(extractor)
    if not names:
        grey = np.full((1, size, size, 3), 128, np.uint8)
        for name in (*KNOWN_BACKBONES, "rgb"):
            try:
                extractor(name, grey)
            except Exception:  # whatever it raises: it does not know this name
                continue
            print(f"note: the extractor names no backbones; using {name!r}, which it answers (name them with "
                  "--backbone NAME[:causal|any])", flush=True)
            names = [name]
            break
    if not names:
        raise DprgbError("the extractor does not say which backbones it provides (no `backbones` or "
                         "`frame_shapes`) and answers none of dprgb's names: name them with --backbone "
                         "NAME[:causal|any]")
    cross = getattr(extractor, "cross_frame", None)
    return {name: ("causal" if cross(name) else "any") if callable(cross) else default_slot_policy(name)
            for name in names}


def rgb_data_for(work: Path, env: str, args: argparse.Namespace, extractor: Any) -> dict[str, Any]:
    """The task's pixel demonstrations (written once), its state config, and the rgb config whose
    stores `dprgb extract` fills from the frames (only what is missing)."""
    pixels = PixelSpec(args.camera, args.size, args.size)
    root = work / "data" / f"{env}-{args.demos}-m{args.max_steps}-{pixels.camera}{args.size}"
    if (root / "demos.json").is_file() and (root / "dprgb.yaml").is_file():
        report = json.loads((root / "demos.json").read_text())
    else:
        _, report = write_expert_demos(root, [env], args.demos, max_steps=args.max_steps, pixels=pixels)
    (task,) = report
    tag = "features-" + args.extractor.replace(":", "-").replace(".", "_")
    backbones = pixel_backbones(extractor, args.backbone, args.size)
    rgb = write_rgb_config(root, [task], backbones, name=f"{tag}.yaml", features=tag)
    start = time.perf_counter()
    extracted = app_extract.run(load_settings(rgb), args.extractor)
    extract_s = time.perf_counter() - start
    app_precompute.run(load_settings(root / "dprgb.yaml", overrides={"device": "cpu"}), [task])
    return {"state_config": root / "dprgb.yaml", "rgb_config": rgb, "task": task, "demos": report[task],
            "backbones": backbones, "extract_s": extract_s, "extracted_frames": extracted.frames,
            "pixels": pixels}


def pixel_env_kwargs(env: str, args: argparse.Namespace, pixels: PixelSpec) -> dict[str, Any]:
    return {"task": env, "max_steps": args.max_steps, "obs": "rgb", "camera": pixels.camera,
            "width": pixels.width, "height": pixels.height, "proprio": True}


def roll(final: Path, env_kwargs: dict, seeds: range, out: Path, extractor: Any = None,
         num_inference_steps: int | None = None) -> tuple[dict, float]:
    runner = PolicyRunner.from_checkpoint(final, "cpu", seed=seeds.start, extractor=extractor,
                                          num_inference_steps=num_inference_steps)
    start = time.perf_counter()
    result = rollout(runner, make_env, len(seeds), seeds.start, out, env_kwargs=env_kwargs)
    return result["summary"], time.perf_counter() - start


def rgb_row(kind: str, env: str, steps: int, total: int, summary: dict, expert: float, train_s: float,
            rollout_s: float, overrides: dict, **extra: Any) -> dict[str, Any]:
    return {"task": env, "row": kind, "steps": steps, "total_steps": total,
            "success": summary["success_rate"], "expert": expert, "episodes": summary["episodes"],
            "mean_length": summary["mean_length"], "train_s": train_s, "rollout_s": rollout_s,
            "per_act_ms": summary["per_act_ms"], "act_ms_per_step": summary["act_ms_per_step"],
            "sample_ms_per_plan": summary["sample_ms_per_plan"], "overrides": overrides, **extra}


def train_run(config: Path, task: str, overrides: dict, run_dir: Path,
              reuse: bool) -> tuple[Path, float, bool]:
    """Train one run (stage 1 precomputes its encoder's cache first, only what is missing). With
    `reuse`, a run already in `run_dir` is resumed instead when the trainer's resume check passes
    (the same settings, data and cache fingerprint; only a shorter run trains on): a finished
    one trains no step. A stage-2 run older than the policy it starts from is trained anew (the
    check sees the init's path, not its weights). Returns the policy file, the seconds, and
    whether it was resumed."""
    settings = load_settings(config, overrides={**overrides, "save_dir": str(run_dir)})
    start = time.perf_counter()
    finetune = bool(overrides.get("finetune"))
    if not finetune:
        app_precompute.run(settings, [task])
    latest = RunFolder.of_group(run_dir, "run", finetune).latest
    init = Path(overrides.get("init_checkpoint") or latest)
    if reuse and latest.is_file() and latest.stat().st_mtime < init.stat().st_mtime:
        print(f"note: {latest.parent.parent} is older than the policy it starts from: trained anew",
              flush=True)
    elif reuse and latest.is_file():
        try:
            final = app_train.run(settings, "run", [task], progress=False, resume=True)["checkpoint"]
            return Path(final), time.perf_counter() - start, True
        except DprgbError as err:
            print(f"note: {run_dir} not reused, trained anew: {err.one_line()}", flush=True)
    final = app_train.run(settings, "run", [task], progress=False, overwrite_run=True)["checkpoint"]
    return Path(final), time.perf_counter() - start, False


def rgb_rows_for(env: str, data: dict, args: argparse.Namespace, extractor: Any, seeds: range,
                 expert: float, emit: Any) -> None:
    """The state, stage1, stage2 and pooled rows of one task (see the module docstring), then the
    latency rows."""
    extra, steps = parse_env_options(args.set), args.steps[0]
    base = {**RECIPES[args.recipe[0]], **extra, "max_steps": steps}
    base["epochs"] = epochs_for(steps, data["demos"]["lengths"], {**COMMON, **base})
    # named by what differs from the defaults: the pixel setup (another camera, size or
    # extractor's runs never land in, nor resume, the default setup's), then the overrides
    pixel_setup = ((args.camera, DEFAULT_PIXEL_CAMERA, args.camera),
                   (args.size, PIXEL_SIZE, f"{args.size}px"),
                   (args.extractor, REFERENCE_EXTRACTOR, args.extractor.replace(":", "-")))
    setup = [name for value, default, name in pixel_setup if value != default]
    label = "-".join([args.recipe[0], str(steps), *setup] + [f"{k}{v}" for k, v in extra.items()])
    runs = Path(args.work) / "runs-rgb" / env / label
    pixel_kwargs = pixel_env_kwargs(env, args, data["pixels"])

    def measure(kind: str, config: Path, overrides: dict, run_dir: Path, encoder: str, live: Any = None,
                total: int = steps) -> Path:
        final, train_s, resumed = train_run(config, data["task"], overrides, run_dir, args.reuse_runs)
        kwargs = pixel_kwargs if live is not None else {"task": env, "max_steps": args.max_steps}
        summary, rollout_s = roll(final, kwargs, seeds, final.parent / "rollouts", live)
        emit(rgb_row(kind, env, steps, total, summary, expert, train_s, rollout_s, overrides,
                     encoder=encoder, resumed=resumed))
        return final

    if "state" in args.rows:
        state = {**COMMON, **base, "proprio": PROPRIO[args.proprio]}
        measure("state", data["state_config"], state, runs / "state", "pooled")
    pixel = {**COMMON, **base, "proprio": PROPRIO[args.pixel_proprio]}
    first = None
    # stage2 and the latency rows start from stage1's policy, so they measure it too
    needs_stage1 = bool(args.rows & {"stage1", "stage2"} or args.inference_steps)
    for encoder in args.pixel_encoder if needs_stage1 else []:
        overrides = {**pixel, "encoder": encoder}
        folder = runs / f"pixels-{encoder}"
        final = measure("stage1", data["rgb_config"], overrides, folder, encoder, extractor)
        first = first or (final, overrides)
        if "stage2" in args.rows:
            tuned = {**overrides, **parse_env_options(args.stage2_set), "finetune": True,
                     "init_checkpoint": str(final)}
            measure("stage2", data["rgb_config"], tuned, folder, encoder, extractor, 2 * steps)
    if "pooled" in args.rows:
        pooled = {**pixel, "encoder": "pooled"}
        measure("pooled", data["rgb_config"], pooled, runs / "pixels-pooled", "pooled", extractor)
    if first is not None and env in (args.latency_env or args.env[:2]):
        for k in args.inference_steps or []:
            summary, rollout_s = roll(first[0], pixel_kwargs, seeds, first[0].parent / f"rollouts-k{k}",
                                      extractor, num_inference_steps=k)
            emit(rgb_row(f"stage1-k{k}", env, steps, steps, summary, expert, 0.0, rollout_s,
                         {**first[1], "num_inference_steps": k}, encoder=first[1]["encoder"]))


RGB_HEADER = ("| task | row | encoder | optimizer steps (total) | success | expert | episodes | "
              "mean length | train s | rollout s | act ms: render / extract / encode / sample / runtime | "
              "sample ms per plan | configuration (overrides of the defaults) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def rgb_markdown(row: dict[str, Any]) -> str:
    split = " / ".join(f"{row['per_act_ms'][key]:.1f}" for key in TIME_SPLIT)
    train = f"{row['train_s']:.0f}" + (" (resumed)" if row.get("resumed") else "")
    config = json.dumps(row["overrides"], separators=(",", ":"))
    return (f"| {row['task']} | {row['row']} | {row['encoder']} | {row['steps']} ({row['total_steps']}) | "
            f"{row['success']:.2f} | {row['expert']:.2f} | {row['episodes']} | {row['mean_length']:.1f} | "
            f"{train} | {row['rollout_s']:.0f} | {split} | {row['sample_ms_per_plan']:.1f} | "
            f"`{config}` |")


def run_rgb(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work)
    seeds = range(args.eval_seed, args.eval_seed + args.episodes)
    extractor = load_extractor(args.extractor)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(rgb_markdown(row), flush=True)
        if args.results_md:
            with open(args.results_md, "a") as f:
                f.write(rgb_markdown(row) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))

    for env in args.env:
        data = rgb_data_for(work, env, args, extractor)
        if max(data["demos"]["seeds"]) >= seeds.start:
            raise DprgbError(f"demonstration seeds reach the evaluation seeds ({seeds.start})")
        expert = expert_rollouts(env, list(seeds), args.max_steps)
        expert_rate = sum(r["success"] for r in expert) / len(expert)
        demos = data["demos"]
        print(f"{env}: {len(demos['seeds'])} demos (seeds {demos['seeds'][0]}..{demos['seeds'][-1]}, "
              f"{demos['discarded']} discarded, {sum(demos['lengths'])} frames, camera "
              f"{data['pixels'].camera} {args.size}x{args.size}, render {demos.get('render_s', 0):.0f} s), "
              f"extract {data['extract_s']:.0f} s ({data['extracted_frames']} frames), backbones "
              f"{data['backbones']}, expert success {expert_rate:.2f} on seeds {seeds.start}.."
              f"{seeds.stop - 1}", flush=True)
        rgb_rows_for(env, data, args, extractor, seeds, expert_rate, emit)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n" + MD_HEADER)
    for row in rows:
        print(markdown_row(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", action="append", required=True, help="Meta-World task (repeat)")
    parser.add_argument("--demos", type=int, default=30)
    parser.add_argument("--steps", type=int, action="append", help="optimizer steps (repeat); default 1500")
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per measurement")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES), help="(repeat); default new")
    parser.add_argument("--proprio", choices=["on", "off", "both"], default="off")
    parser.add_argument("--set", action="append", help="key=value config override for every recipe")
    parser.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="episode step limit")
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--work", default="closed_loop_work", help="demos, caches and runs (reused)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--results-md", help="append one markdown row per measurement to this file")
    parser.add_argument("--json", help="write all rows to this JSON file")
    rgb = parser.add_argument_group("from pixels (--obs rgb)")
    rgb.add_argument("--obs", choices=["state", "rgb"], default="state")
    rgb.add_argument("--extractor", default=REFERENCE_EXTRACTOR, help="module:factory")
    rgb.add_argument("--backbone", action="append", help="NAME[:causal|any] (repeat); default: its own")
    rgb.add_argument("--camera", default=DEFAULT_PIXEL_CAMERA)
    rgb.add_argument("--size", type=int, default=PIXEL_SIZE, help="square camera frames (each view), pixels")
    rgb.add_argument("--pixel-encoder", action="append", help=f"(repeat); default {PIXEL_ENCODER}")
    rgb.add_argument("--pixel-proprio", choices=["on", "off"], default=PIXEL_PROPRIO)
    rgb.add_argument("--rows", default="state,stage1,stage2,pooled", help="which rows (comma-separated)")
    rgb.add_argument("--stage2-set", action="append", help="key=value for the stage2 rows only (repeat)")
    rgb.add_argument("--reuse-runs", action="store_true",
                     help="resume the runs already under --work when the trainer's resume check passes")
    rgb.add_argument("--inference-steps", type=int, action="append", help="latency rows (repeat)")
    rgb.add_argument("--latency-env", action="append", help="tasks of the latency rows (default: first two)")
    args = parser.parse_args()
    args.steps = args.steps or [1500]
    args.recipe = args.recipe or ["new"]
    args.pixel_encoder = args.pixel_encoder or [PIXEL_ENCODER]
    args.rows = set(args.rows.split(","))
    torch.set_num_threads(args.threads)
    header = RGB_HEADER if args.obs == "rgb" else MD_HEADER
    if args.results_md and not Path(args.results_md).is_file():
        Path(args.results_md).write_text(header + "\n")
    try:
        rows = run_rgb(args) if args.obs == "rgb" else run(args)
    except DprgbError as err:
        sys.exit(f"error: {err.one_line()}")
    if args.obs == "rgb":
        print("\n" + RGB_HEADER + "\n" + "\n".join(map(rgb_markdown, rows)))
        return
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
