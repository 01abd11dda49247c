"""Extraction: one video into the store (`extract_video`), and a whole folder on Ray or joblib (`run_extract`).

A video streams through decode -> resize -> RGB JPEG -> flow against the previous frame -> quantize
-> flow JPEGs, holding two frames at a time (a batch of pairs with a GPU), into a temporary name
that is renamed into place only when the video is whole. Bad input never raises out of a task: it
comes back as a record with status "failed" and the reason, and every other video is still extracted.

The job is resumable: a video whose stored copy passes `Store.check` is skipped, anything else
(missing, half-written, killed mid-way) is redone. Stores hold no timestamps, so the same input
gives byte-identical stores whatever the backend, worker count or order of completion.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click
import cv2

from flowprep.flow import ALGOS, FARNEBACK, PRESETS, check_device, flow_params, make_flow_batch, set_single_thread
from flowprep.quant import DEFAULT_BOUND, quantize
from flowprep.store import (FORMATS, Store, StoreError, append_manifest, clean_temps, open_writer, read_manifest,
                            read_store_info, video_class, video_path, write_list_file, write_store_info)
from flowprep.video import VideoError, find_videos, probe, read_frames
from twostream.schema import ConfigError, Key, Options, Section, boolean, integer, number, optional, size, string

BACKENDS = ("ray", "joblib")
DEFAULT_SIZE = (340, 256)
STORE_VERSION = 1
# Test-only fault injection: "VIDEO_ID:MARKER_FILE" makes the task for VIDEO_ID exit its worker
# process abruptly after writing a few flows, once (the marker file records that it happened).
# Used by tests/test_flowprep_extract.py to prove a killed Ray worker's video is retried.
TEST_EXIT_ENV = "FLOWPREP_TEST_EXIT_ONCE"


def _preset_help() -> str:
    def fmt(p):
        return ", ".join(f"{k} {v}" for k, v in p.items())
    acc = PRESETS["accurate"]
    return (f"TV-L1 settings. accurate = OpenCV defaults, as denseflow ({fmt(acc)}); "
            f"fast = {fmt({k: v for k, v in PRESETS['fast'].items() if acc[k] != v})}, "
            "rest as accurate: about 8x faster, a fraction of a pixel from accurate.")


class ExtractError(Exception):
    """A problem with the job as a whole (no videos, a store made with other parameters, ...)."""


def _check_extract(v: dict) -> dict:
    if v["size"] is not None and v["short_side"] is not None:
        raise ConfigError("give either extract.size (--size) or extract.short_side (--short-side), not both")
    if v["size"] is None and v["short_side"] is None:
        v["size"] = DEFAULT_SIZE
    try:
        flow_params(v["algo"], v["preset"])
    except ValueError as e:
        raise ConfigError(f"extract.preset (--preset) = \"{v['preset']}\": {e}") from None
    return v


# What defines a store: recorded in store.json and every video's metadata, so a resumed job
# must ask for the same (see ExtractOptions.store_info). `device` picks the implementation.
STORE_KEYS = {
    "format": Key("jpeg", "jpeg: one JPEG per frame (denseflow/MMAction2 layout); hdf5: one .h5 file per video.",
                  choices=FORMATS),
    "size": Key(None, f"Resize every frame to exactly WxH before flow [default: {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}, "
                "unless --short-side].", optional(size), metavar="WxH"),
    "short_side": Key(None, "Instead of --size: scale so the short side is N, keeping the aspect ratio.",
                      optional(integer), min=8, flags=("--short-side", "--new-short"), metavar="N"),
    "bound": Key(DEFAULT_BOUND, "Clip flow to +-bound pixels before quantizing to uint8.", number, above=0),
    "jpeg_quality": Key(95, "JPEG quality of frames and flows.", integer, min=1, max=100),
    "step": Key(1, "Keep every step-th frame; flow is between consecutive kept frames.", integer, min=1),
    "algo": Key("tvl1", "tvl1: OpenCV Dual TV-L1 (see --preset); farneback: OpenCV Farneback "
                f"({', '.join(f'{k} {v}' for k, v in FARNEBACK.items())}), much faster, less accurate.",
                choices=ALGOS),
    "preset": Key("accurate", _preset_help(), choices=tuple(sorted(PRESETS))),
    "rgb": Key(True, "Also store RGB frames. --no-rgb stores flow only (temporal stream); 'frames' still counts "
               "decoded frames, so flows = frames - 1.", boolean),
    "max_frames": Key(None, "Only the first N kept frames of each video (quick trials of a pipeline).",
                      optional(integer), min=2, metavar="N"),
    "device": Key("cpu", "cpu: OpenCV TV-L1, one core per worker; cuda (or cuda:N): batched torch TV-L1, one "
                  "worker per GPU; torch-cpu: the torch TV-L1 on the CPU (to compare it with OpenCV).",
                  metavar="cpu|cuda|torch-cpu"),
}
# How to run the job: not part of the store.
JOB_KEYS = {
    "backend": Key("ray", "ray: a local Ray cluster, or the one at --address; joblib: processes on this machine.",
                   choices=BACKENDS),
    "workers": Key(0, "Parallel videos, one core each. 0 = all cores (of this machine, or of the Ray cluster at "
                   "--address).", integer, min=0, flags=("--workers", "-j")),
    "address": Key(None, "Existing Ray cluster: 'auto' or 'ray://HOST:PORT'. Every node must see --videos and "
                   "--out at the same paths.", optional(string)),
}
EXTRACT = Section("extract", {**STORE_KEYS, **JOB_KEYS}, _check_extract,
                  "flowprep extract: what a store holds and how the job runs.")


class ExtractOptions(Options):
    """What to extract (the STORE_KEYS); everything but `device` defines the store (`store_info`)."""

    SECTION = Section("extract", STORE_KEYS, _check_extract)

    def store_info(self) -> dict:
        """Parameters recorded in OUT/store.json; a resumed job must match them."""
        return {
            "version": STORE_VERSION, "format": self.format,
            "size": list(self.size) if self.size else None, "short_side": self.short_side,
            "bound": float(self.bound), "jpeg_quality": self.jpeg_quality, "step": self.step,
            "algo": self.algo, "preset": self.preset if self.algo == "tvl1" else None,
            "params": flow_params(self.algo, self.preset), "rgb": self.rgb, "max_frames": self.max_frames,
            # OpenCV TV-L1 and the torch port agree closely but not bit for bit.
            "implementation": "opencv" if self.device == "cpu" else "torch",
            "opencv": cv2.__version__,
        }


def manifest_record(video_id: str, src: str | Path, *, frames: int = 0, flows: int = 0, size: list | None = None,
                    seconds: float = 0.0, error: str | None = None) -> dict:
    """One line of OUT/manifest.jsonl: status "ok" unless `error` says why the video failed."""
    return {"id": video_id, "label": video_class(video_id), "source": str(src),
            "status": "ok" if error is None else "failed", "frames": frames, "flows": flows, "size": size,
            "seconds": round(seconds, 3), "error": error}


def failed_record(video_id: str, src: str | Path, error: str, seconds: float = 0.0) -> dict:
    return manifest_record(video_id, src, seconds=seconds, error=error)


def extract_video(src: str | Path, store_root: str | Path, video_id: str, opts: ExtractOptions,
                  *, flow_batch: tuple | None = None, _test_exit_marker: str | None = None) -> dict:
    """Extract one video into the store; returns its manifest record (status "ok" or "failed").

    Never raises for a bad video: the reason goes into record["error"] and nothing is left in
    the store (the temporary copy is removed). `flow_batch`: a (function, batch size) pair to
    compute flow with instead of `make_flow_batch(opts...)` (e.g. a GPU service's).
    """
    t0 = time.perf_counter()
    src = Path(src)
    writer = None
    try:
        info = probe(src)
        flow_batch, batch = flow_batch or make_flow_batch(opts.algo, opts.preset, opts.device)
        writer = open_writer(opts.format, store_root, video_id, opts.jpeg_quality)
        prevs: list = []
        nexts: list = []

        def flush() -> None:
            for f in flow_batch(prevs, nexts):
                writer.write_flow(quantize(f, opts.bound))
            prevs.clear()
            nexts.clear()

        prev = None
        for frame in read_frames(src, opts.size, opts.short_side, opts.step, opts.max_frames):
            if opts.rgb:
                writer.write_rgb(frame)
            else:
                writer.skip_rgb()
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            if prev is not None:
                prevs.append(prev)
                nexts.append(gray)
                if len(prevs) >= batch:
                    flush()
            prev = gray
            if _test_exit_marker and writer.flows >= 2:
                try:
                    os.close(os.open(_test_exit_marker, os.O_CREAT | os.O_EXCL))
                    os._exit(3)  # simulate a worker killed mid-video, exactly once
                except FileExistsError:
                    pass
        flush()
        size = [frame.shape[1], frame.shape[0]]  # read_frames yields at least 2 frames or raises
        meta = dict(opts.store_info(), id=video_id, label=video_class(video_id), source=str(src.resolve()),
                    fps=info.fps, source_frames=info.frames, source_size=[info.width, info.height],
                    size=size)
        writer.commit(meta)
        return manifest_record(video_id, src, frames=writer.frames, flows=writer.flows, size=size,
                               seconds=time.perf_counter() - t0)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: stop, leaving nothing half-written
        reason = e.reason if isinstance(e, VideoError) else f"{type(e).__name__}: {e}"
        return failed_record(video_id, src, reason, time.perf_counter() - t0)


def _run_one(src: str, root: str, video_id: str, opts: ExtractOptions, marker: str | None, service=None) -> dict:
    """Task body for both backends (a module-level function, so workers import it by name).

    `service`: a FlowService actor (Ray, --device cuda) that computes this task's flow batches.
    """
    set_single_thread()
    flow_batch = None
    if service is not None:
        from flowprep.flow_service import service_flow_batch

        flow_batch = service_flow_batch(service)
    return extract_video(src, root, video_id, opts, flow_batch=flow_batch, _test_exit_marker=marker)


# ---------------------------------------------------------------- backends

def _ray_temp_dir(out: Path) -> str:
    """Ray's session dir: under the output when short enough (unix socket paths are limited to
    about 107 bytes and Ray appends about 62), else a fresh folder in /tmp."""
    d = out.resolve() / ".tmp.ray"  # a .tmp. name: skipped by store walks, removed by clean_temps
    if len(str(d)) <= 40:
        return str(d)
    return tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")


def _run_ray(todo, out: Path, opts: ExtractOptions, workers: int, address: str | None,
             markers: dict[str, str]) -> Iterator[dict]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    own = not ray.is_initialized()
    temp_dir = None
    if own:
        common = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        if address:
            ray.init(address=address, **common)
        else:
            temp_dir = _ray_temp_dir(out)
            ray.init(num_cpus=workers, _temp_dir=temp_dir, **common)
    try:
        if not workers:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # max_retries: a task whose worker process dies (OOM kill, node loss) runs again from scratch;
        # retry_exceptions=False: extract_video already turns bad input into a "failed" record.
        # Off the CPU, one FlowService actor per GPU computes the flow for every task (flow_service.py).
        services = []
        if opts.device != "cpu":
            from flowprep.flow_service import start_services

            try:
                services = start_services(ray, opts)
            except RuntimeError as e:
                raise ExtractError(str(e)) from None
        task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=False)(_run_one)
        queue = iter(todo)
        inflight: dict = {}
        submitted = 0

        def submit() -> None:
            nonlocal submitted
            for vid, src in queue:
                service = services[submitted % len(services)] if services else None
                inflight[task.remote(str(src), str(out), vid, opts, markers.get(vid), service)] = (vid, src)
                submitted += 1
                return

        # Bounded in-flight, so the driver never queues the whole dataset. On a cluster we started,
        # num_cpus=workers already caps concurrency and a second task per worker hides scheduling
        # latency; on a shared cluster the in-flight count is what keeps us to `workers` cores.
        for _ in range(2 * workers if own and not address else workers):
            submit()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                vid, src = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # the worker died on every retry
                    rec = failed_record(vid, src, f"worker failed after retries: {type(e).__name__}: {e}")
                submit()
                yield rec
    finally:
        if own:
            ray.shutdown()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)


def _run_joblib(todo, out: Path, opts: ExtractOptions, workers: int, markers: dict[str, str]) -> Iterator[dict]:
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=workers or os.cpu_count() or 1, backend="loky", return_as="generator_unordered")
    yield from parallel(delayed(_run_one)(str(src), str(out), vid, opts, markers.get(vid)) for vid, src in todo)


# ---------------------------------------------------------------- job

@dataclass
class Summary:
    out: Path
    total: int = 0
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    pairs: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def format(self) -> str:
        rate = self.pairs / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.total} videos: {len(self.done)} extracted, {len(self.skipped)} already done (skipped), "
                 f"{len(self.failed)} failed; {self.pairs} frame pairs in {self.seconds:.1f} s ({rate:.2f} pairs/s)",
                 f"store: {self.out}"]
        lines += [f"  FAILED {vid}: {reason}" for vid, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def _check_store_params(out: Path, info: dict, overwrite: bool) -> None:
    try:
        old = read_store_info(out)
    except StoreError:
        return
    if old != info and not overwrite:
        diff = ", ".join(f"{k}: store has {old.get(k)!r}, asked {info.get(k)!r}"
                         for k in sorted(set(old) | set(info)) if old.get(k) != info.get(k))
        raise ExtractError(f"{out} was extracted with different parameters ({diff}); use the same options to "
                           "resume, another --out, or --overwrite to redo every video")


def run_extract(videos: str | Path, out: str | Path, opts: ExtractOptions = ExtractOptions(), *,
                list_file: str | Path | None = None, workers: int = 0, backend: str = "ray",
                address: str | None = None, overwrite: bool = False, progress: bool = True) -> Summary:
    """Extract every video under `videos` (or those in `list_file`) into the store `out`.

    workers: parallel tasks (0 = all cores, or all CPUs of the cluster at `address`).
    backend: "ray" (local cluster, or the existing one at `address`: "auto" or "ray://host:port";
    every node must see `videos` and `out` at the same paths) or "joblib" (this machine).
    Resumes: videos already complete in the store are checked and skipped unless `overwrite`.
    Raises ExtractError for problems with the job itself; bad videos only fail their own record.
    """
    t0 = time.perf_counter()
    out = Path(out).absolute()  # workers (other processes, other nodes) may not share our working directory
    videos = Path(videos).absolute()
    if backend not in BACKENDS:
        raise ExtractError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if workers < 0:
        raise ExtractError(f"--workers must be >= 0 (0 = all cores), got {workers}")
    if address and backend != "ray":
        raise ExtractError("--address names a Ray cluster; it needs --backend ray")
    try:
        if not (address and opts.device.startswith("cuda")):  # a cluster's GPUs are checked on the cluster
            check_device(opts.algo, opts.device)
    except ValueError as e:
        raise ExtractError(str(e)) from None
    try:
        found = find_videos(videos, list_file)
    except (OSError, ValueError) as e:
        raise ExtractError(str(e)) from None
    if not found:
        raise ExtractError(f"no videos found under {videos}" + (f" from the list {list_file}" if list_file else
                           " (looked for .avi .mp4 .mkv .mov .webm .mpg .mpeg .flv .wmv .m4v)"))
    if not workers and not address:
        workers = os.cpu_count() or 1
        if opts.device.startswith("cuda") and backend == "joblib":  # one process per GPU
            import torch

            workers = max(1, torch.cuda.device_count())

    info = opts.store_info()
    _check_store_params(out, info, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    clean_temps(out)  # leftovers of a killed run; no job may be writing to this store now
    write_store_info(out, info)

    summary = Summary(out=out, total=len(found))
    store = Store(out)
    manifest = read_manifest(out)
    todo = []
    for vid, src in found:
        if not overwrite and store.check(vid) is None:
            summary.skipped.append(vid)
            if manifest.get(vid, {}).get("status") != "ok":  # manifest lost or stale: rebuild the record
                with store.open(vid) as v:
                    append_manifest(out, manifest_record(vid, src, frames=v.num_frames, flows=v.num_flows,
                                                         size=v.meta.get("size")))
        else:
            todo.append((vid, src))

    markers = {}
    if os.environ.get(TEST_EXIT_ENV):
        vid, _, marker = os.environ[TEST_EXIT_ENV].partition(":")
        markers[vid] = marker

    if not todo:
        results = iter(())  # nothing to do: do not start a cluster
    elif backend == "ray":
        results = _run_ray(todo, out, opts, workers, address, markers)
    else:
        results = _run_joblib(todo, out, opts, workers, markers)
    if progress:
        click.echo(f"flowprep: {len(found)} videos, {len(summary.skipped)} already done, {len(todo)} to extract "
                   f"with {backend} ({workers or 'all'} workers) into {out}", err=True)
    t_run = time.perf_counter()

    def status(_) -> str:
        dt = time.perf_counter() - t_run
        return f"{summary.pairs} pairs, {summary.pairs / dt if dt > 0 else 0:.2f} pairs/s"

    with _progress(progress, len(todo), status) as bar:
        for rec in results:
            append_manifest(out, rec)
            if rec["status"] == "ok":
                summary.done.append(rec["id"])
                summary.pairs += rec["flows"]
            else:
                summary.failed[rec["id"]] = rec["error"]
                if overwrite:  # do not leave an older copy made with other parameters
                    stale = video_path(out, rec["id"], opts.format)
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            bar.update(1, rec["id"])

    clean_temps(out)  # partial copies of videos whose worker was killed and retried
    write_list_file(out, read_manifest(out).values())
    summary.seconds = time.perf_counter() - t0
    if progress:
        click.echo(summary.format(), err=True)
    return summary


class _NoBar:
    def update(self, n, item=None):
        pass


@contextmanager
def _progress(show: bool, length: int, status):
    """click's bar on stderr: videos done/total, ETA, and (via `status`) frame pairs and pairs/s."""
    if not show:
        yield _NoBar()
        return
    with click.progressbar(length=length, label="extracting", show_pos=True, show_eta=True,
                           item_show_func=status, file=sys.stderr) as bar:
        yield bar
