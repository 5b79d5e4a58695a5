"""`dprgb precompute`: raw features -> frozen encoder -> fused [T, D] cache, with dask.

The graph has one task per (task, episode). Each task opens its episode through the same
readers and alignment as everything else (`build_episode`), encodes the aligned steps in
batches under `torch.inference_mode`, and commits the episode atomically. Tasks return
only counts, so memory stays bounded by one batch of frames per worker whatever the number
or length of episodes. The encoder is loaded once per worker process (a per-process table
keyed by its spec), never shipped inside a task.

Schedulers: dask's threaded scheduler by default (torch threads = cores // workers so the
two do not oversubscribe), `scheduler: local` for a `dask.distributed` LocalCluster of
processes, or `scheduler: tcp://host:8786` for an existing cluster.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from dask.callbacks import Callback

from dprgb.cache.manifest import (
    new_manifest,
    options_fingerprint,
    read_manifest,
    source_identity,
    write_manifest,
)
from dprgb.cache.store import (
    cached_episodes,
    read_episode_attrs,
    remove_episode,
    remove_leftovers,
    write_episode,
)
from dprgb.pipeline.config import DataConfig, fields_of
from dprgb.pipeline.encoders import encoder_fingerprint, load_encoder
from dprgb.pipeline.episodes import ActionLayout, Episode, TaskScan, build_episode, check_usable, scan_task
from dprgb.pipeline.errors import DprgbError
from dprgb.pipeline.features import open_feature_episode
from dprgb.pipeline.trajectories import load_trajectory

CACHE_DTYPES = ("float32", "float16")


@dataclass
class PrecomputeConfig:
    encoder: str = "reference"  # "reference", an RGB2PC checkpoint, TorchScript, module:factory
    encoder_weights: str | None = None  # state dict for a plugin / the reference encoder
    encoder_options: dict = field(default_factory=dict)  # e.g. {nhead: 20, num_tokens: 256}
    cache_dir: Path = Path("cache")
    cache_dtype: str = "float32"
    batch_frames: int = 32  # frames per encoder call
    workers: int = 0  # 0: one per core
    scheduler: str | None = None  # None: threads; "local": LocalCluster; else an address
    device: str = "cpu"
    autocast: bool = False  # bf16 autocast for the encoder on CUDA

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if self.cache_dtype not in CACHE_DTYPES:
            raise DprgbError(f"{self.cache_dtype=} must be one of {CACHE_DTYPES}")
        if self.batch_frames < 1 or self.workers < 0:
            raise DprgbError(f"need batch_frames >= 1 and workers >= 0: {self.batch_frames=} {self.workers=}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PrecomputeConfig:
        return cls(**fields_of(cls, mapping))

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to build the encoder itself (small, picklable)."""

    spec: str
    weights: str | None
    options_json: str  # encoder_options as sorted JSON: hashable, whatever the values
    backbone_dims: tuple  # ((backbone, C), ...) in root order
    device: str
    autocast: bool  # bf16 autocast on CUDA: changes the features, so part of the fingerprint
    file_stamps: tuple  # (path, size, mtime_ns) of the encoder's files: a replaced file is a new key

    def load(self) -> tuple[torch.nn.Module, dict]:
        encoder, fingerprint_options = load_encoder(
            self.spec,
            backbone_dims=dict(self.backbone_dims),
            weights=self.weights,
            options=json.loads(self.options_json),
        )
        return encoder.to(self.device), {**fingerprint_options, "autocast_bf16": self.autocast}


@dataclass(frozen=True)
class EpisodeJob:
    task: str
    episode: int
    stores: tuple  # ((backbone, store path, slot policy), ...)
    trajectory: str
    layout: ActionLayout
    source_id: str
    frames: int  # aligned steps, for progress


# One encoder per process, shared by its threads (inference only).
_ENCODERS: dict[EncoderSpec, tuple[torch.nn.Module, str]] = {}
_ENCODERS_LOCK = threading.Lock()


def worker_encoder(spec: EncoderSpec) -> tuple[torch.nn.Module, str]:
    with _ENCODERS_LOCK:
        if spec not in _ENCODERS:
            encoder, options = spec.load()
            _ENCODERS[spec] = (encoder, encoder_fingerprint(encoder, options))
        return _ENCODERS[spec]


def encode_steps(
    encoder: torch.nn.Module,
    episode: Episode,
    steps: np.ndarray | None = None,
    *,
    batch_frames: int = 32,
    device: str = "cpu",
    autocast: bool = False,
) -> np.ndarray:
    """(len(steps), D) float32: the encoder applied to each step's frames from the readers."""
    steps = episode.steps if steps is None else np.asarray(steps)
    out = []
    use_autocast = autocast and torch.device(device).type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_autocast):
        for start in range(0, len(steps), batch_frames):
            frames = episode.read_frames(steps[start : start + batch_frames])
            batch = {name: torch.from_numpy(x).to(device).float() for name, x in frames.items()}
            out.append(encoder(batch).float().cpu().numpy())  # (B, D)
            del frames, batch  # hold one batch of frames at a time, not two
    return np.concatenate(out) if out else np.zeros((0, encoder.out_dim), np.float32)


def open_job_episode(job: EpisodeJob) -> Episode:
    stores = {
        backbone: open_feature_episode(backbone, Path(path), job.episode, policy)
        for backbone, path, policy in job.stores
    }
    return build_episode(job.task, stores, load_trajectory(Path(job.trajectory), job.episode), job.layout)


def run_episode_job(
    job: EpisodeJob, spec: EncoderSpec, pc_fields: dict, fingerprint: str, torch_threads: int
) -> tuple[str, int, int]:
    """One dask task: encode one episode and commit it to the cache."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    encoder, worker_fingerprint = worker_encoder(spec)
    if worker_fingerprint != fingerprint:
        raise DprgbError(
            "the encoder a worker loaded differs from the one the cache is keyed by "
            "(did its file change during the run?)",
            path=spec.spec,
        )
    episode = open_job_episode(job)
    features = encode_steps(
        encoder,
        episode,
        batch_frames=pc_fields["batch_frames"],
        device=spec.device,
        autocast=spec.autocast,
    )
    attrs = {
        "task": job.task,
        "episode": job.episode,
        "frames": len(episode.steps),
        "source_id": job.source_id,
        "encoder_fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_episode(
        Path(pc_fields["cache_dir"]),
        job.task,
        job.episode,
        episode.steps,
        features.astype(pc_fields["cache_dtype"]),
        episode.actions,
        attrs,
    )
    return job.task, job.episode, len(episode.steps)


# ------------------------------------------------------------------------- planning


def data_options(cfg: DataConfig) -> dict:
    """The data settings that change cached features or actions."""
    return {
        "backbones": [root.backbone for root in cfg.rgb_zarr_roots],
        "slot_policy": {root.backbone: cfg.slot_policy_for(root.backbone) for root in cfg.rgb_zarr_roots},
        "resample_segments": cfg.resample_segments,
        **cfg.arm_settings(),
    }


def encoder_spec(cfg: DataConfig, pc: PrecomputeConfig, scans: list[TaskScan]) -> EncoderSpec:
    first_episode = next((scan.stores[ep] for scan in scans for ep in scan.usable_episodes), None)
    if first_episode is None:
        raise DprgbError("no episode with features to precompute")
    dims = tuple((name, int(store.frame_shape[-1])) for name, store in first_episode.items())
    files = [Path(f) for f in (pc.encoder, pc.encoder_weights) if f is not None and Path(f).is_file()]
    return EncoderSpec(
        spec=str(pc.encoder),
        weights=pc.encoder_weights,
        options_json=json.dumps(pc.encoder_options, sort_keys=True),
        backbone_dims=dims,
        device=pc.device,
        autocast=pc.autocast and torch.device(pc.device).type == "cuda",
        file_stamps=tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files),
    )


def episode_sources(scan: TaskScan, episode: int) -> list[Path]:
    return [store.path for store in scan.stores[episode].values()] + [scan.trajectories[episode].path]


def plan_jobs(cfg: DataConfig, scan: TaskScan) -> list[EpisodeJob]:
    jobs = []
    for ep in scan.usable_episodes:
        stores = scan.stores[ep]
        frames = len(next(iter(stores.values())).steps) - scan.layout.offset
        jobs.append(
            EpisodeJob(
                task=scan.task,
                episode=ep,
                stores=tuple((name, str(store.path), store.slot_policy) for name, store in stores.items()),
                trajectory=str(scan.trajectories[ep].path),
                layout=scan.layout,
                source_id=source_identity(episode_sources(scan, ep)),
                frames=max(frames, 0),
            )
        )
    return jobs


@dataclass
class PrecomputeResult:
    cache_dir: Path
    computed: list[tuple[str, int, int]]  # (task, episode, frames) written this run
    skipped: int  # episodes already cached and fresh
    seconds: float
    fingerprint: str

    @property
    def frames(self) -> int:
        return sum(f for _, _, f in self.computed)


def precompute(
    cfg: DataConfig,
    pc: PrecomputeConfig,
    tasks: list[str],
    *,
    overwrite: bool = False,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> PrecomputeResult:
    """Encode every missing episode of `tasks` into `pc.cache_dir`.

    on_progress(episodes_done, episodes_total, frames_done, frames_total) after each episode.
    """
    start = time.perf_counter()
    scans = [scan_task(cfg, task) for task in tasks]
    for scan in scans:
        check_usable(cfg, scan)
    spec = encoder_spec(cfg, pc, scans)
    encoder, fingerprint = worker_encoder(spec)
    manifest = _prepare_manifest(cfg, pc, spec, encoder, fingerprint, scans, overwrite)

    jobs, skipped = [], 0
    for scan in scans:
        cached = cached_episodes(pc.cache_dir, scan.task)
        for job in plan_jobs(cfg, scan):
            if job.episode in cached and not overwrite:
                attrs = read_episode_attrs(cached[job.episode])
                if (
                    attrs.get("source_id") == job.source_id
                    and attrs.get("encoder_fingerprint") == fingerprint
                ):
                    skipped += 1
                    continue
                raise DprgbError(
                    "cached episode is stale (its source files changed since it was computed); "
                    "rerun with --overwrite to recompute",
                    path=cached[job.episode],
                    episode=job.episode,
                )
            jobs.append(job)
    write_manifest(pc.cache_dir, manifest)

    computed = _run_jobs(jobs, spec, pc, fingerprint, on_progress)
    return PrecomputeResult(pc.cache_dir, computed, skipped, time.perf_counter() - start, fingerprint)


def _prepare_manifest(
    cfg: DataConfig,
    pc: PrecomputeConfig,
    spec: EncoderSpec,
    encoder: torch.nn.Module,
    fingerprint: str,
    scans: list[TaskScan],
    overwrite: bool,
) -> dict:
    """The manifest this run writes; refuses (or, with overwrite, clears) a cache made by
    another encoder or other data options, so two never mix."""
    remove_leftovers(pc.cache_dir)
    options = data_options(cfg)
    old = read_manifest(pc.cache_dir)
    tasks = {scan.task: {"action_layout": scan.layout.to_dict()} for scan in scans}
    if old is not None:
        same_encoder = old["encoder"]["fingerprint"] == fingerprint
        same_data = old["data_fingerprint"] == options_fingerprint(options)
        same_dtype = old.get("feature_dtype") == pc.cache_dtype
        if not (same_encoder and same_data and same_dtype):
            if not overwrite:
                what = "encoder" if not same_encoder else "data options" if not same_data else "cache dtype"
                raise DprgbError(
                    f"cache was built with a different {what}; rerun with --overwrite to rebuild it",
                    path=pc.cache_dir,
                )
            for task in old.get("tasks", {}):
                for ep in cached_episodes(pc.cache_dir, task):
                    remove_episode(pc.cache_dir, task, ep)
        else:
            tasks = {**old.get("tasks", {}), **tasks}
    encoder_record = {
        "spec": spec.spec,
        "weights": spec.weights,
        "options": json.loads(spec.options_json),
        "fingerprint": fingerprint,
        "backbones": list(getattr(encoder, "backbones", [])),
    }
    return new_manifest(
        encoder=encoder_record,
        data_options=options,
        dim=int(encoder.out_dim),
        feature_dtype=pc.cache_dtype,
        tasks=tasks,
    )


def _run_jobs(
    jobs: list[EpisodeJob],
    spec: EncoderSpec,
    pc: PrecomputeConfig,
    fingerprint: str,
    on_progress: Callable[[int, int, int, int], None] | None,
) -> list[tuple[str, int, int]]:
    if not jobs:
        return []
    pc_fields = {**asdict(pc), "cache_dir": str(pc.cache_dir)}
    cores = os.cpu_count() or 1
    workers = min(pc.num_workers, len(jobs))
    torch_threads = max(1, cores // workers)
    total_frames = sum(job.frames for job in jobs)
    done: list[tuple[str, int, int]] = []

    def report(result: tuple[str, int, int]) -> None:
        done.append(result)
        if on_progress is not None:
            on_progress(len(done), len(jobs), sum(r[2] for r in done), total_frames)

    if pc.scheduler is None:
        tasks = [
            dask.delayed(run_episode_job, pure=False)(job, spec, pc_fields, fingerprint, 0) for job in jobs
        ]
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            with _EpisodeDone(report):
                dask.compute(*tasks, scheduler="threads", num_workers=workers)
        finally:
            torch.set_num_threads(previous_threads)
        return done
    return _run_distributed(jobs, spec, pc, pc_fields, fingerprint, torch_threads, workers, report)


class _EpisodeDone(Callback):
    """Reports each finished episode task of the threaded scheduler."""

    def __init__(self, report: Callable[[tuple[str, int, int]], None]):
        super().__init__()
        self._report = report

    def _posttask(self, key, result, dsk, state, worker_id) -> None:  # noqa: ANN001 - dask's hook
        if isinstance(result, tuple) and len(result) == 3:
            self._report(result)


def _run_distributed(
    jobs: list[EpisodeJob],
    spec: EncoderSpec,
    pc: PrecomputeConfig,
    pc_fields: dict,
    fingerprint: str,
    torch_threads: int,
    workers: int,
    report: Callable[[tuple[str, int, int]], None],
) -> list[tuple[str, int, int]]:
    from distributed import Client, LocalCluster, as_completed

    if pc.scheduler == "local":
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
        threads = torch_threads
    else:
        cluster, client, threads = None, Client(pc.scheduler), 0
    done = []
    try:
        futures = [
            client.submit(run_episode_job, job, spec, pc_fields, fingerprint, threads, pure=False)
            for job in jobs
        ]
        for future in as_completed(futures):
            result = future.result()
            done.append(result)
            report(result)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return done


# --------------------------------------------------------------------------- status


def cache_status(cfg: DataConfig, pc: PrecomputeConfig, tasks: list[str]) -> dict:
    """Is the cache complete and fresh for `tasks` under the current encoder and data?"""
    manifest = read_manifest(pc.cache_dir)
    if manifest is None:
        raise DprgbError("no dprgb cache here (no manifest.json): run `dprgb precompute`", path=pc.cache_dir)
    scans = [scan_task(cfg, task) for task in tasks]
    for scan in scans:
        check_usable(cfg, scan)
    spec = encoder_spec(cfg, pc, scans)
    _, fingerprint = worker_encoder(spec)
    rows = []
    for scan in scans:
        cached = cached_episodes(pc.cache_dir, scan.task)
        stale, missing, frames = [], [], 0
        for ep in scan.usable_episodes:
            if ep not in cached:
                missing.append(ep)
                continue
            attrs = read_episode_attrs(cached[ep])
            frames += int(attrs.get("frames", 0))
            fresh_source = attrs.get("source_id") == source_identity(episode_sources(scan, ep))
            if not fresh_source or attrs.get("encoder_fingerprint") != fingerprint:
                stale.append(ep)
        orphans = sorted(set(cached) - set(scan.usable_episodes))
        rows.append(
            {
                "task": scan.task,
                "cached": len(cached),
                "expected": len(scan.usable_episodes),
                "frames": frames,
                "missing": missing,
                "stale": stale,
                "orphans": orphans,
            }
        )
    encoder_stale = manifest["encoder"]["fingerprint"] != fingerprint
    data_stale = manifest["data_fingerprint"] != options_fingerprint(data_options(cfg))
    # An episode whose sources are gone is stale too: its data no longer exists.
    stale = encoder_stale or data_stale or any(r["stale"] or r["orphans"] for r in rows)
    return {
        "cache_dir": str(pc.cache_dir),
        "dim": manifest["dim"],
        "feature_dtype": manifest.get("feature_dtype"),
        "created": manifest.get("created"),
        "encoder": manifest["encoder"]["spec"],
        "cache_fingerprint": manifest["encoder"]["fingerprint"],
        "current_fingerprint": fingerprint,
        "encoder_stale": encoder_stale,
        "data_stale": data_stale,
        "stale": stale,
        "complete": not any(r["missing"] for r in rows),
        "tasks": rows,
    }
