"""Extraction: one video into the store (`extract_video`), and a whole folder on Ray or joblib (`run_extract`).

A video streams through decode -> resize -> RGB JPEG -> flow against the previous frame -> quantize
-> flow JPEGs, holding two frames at a time (a batch of pairs with a GPU), into a temporary name
that is renamed into place only when the video is whole. Bad input never raises out of a task: it
comes back as a record with status "failed" and the reason, and every other video is still extracted.
A source cut short is kept without its last decoded frame and marked "partial" (flowprep/video.py).
With `--direction both` each pair also gets its backward flow, flow(next, prev), computed through
the same batch hook (one call for both directions, so a GPU solves them together).

Before anything runs, the job as a whole is checked, so a problem is one sentence and not a
thousand failed videos: the video list (ids inside --videos only, no collisions, names the list
files can hold; flowprep/video.py), the OpenCV build, the store folder and its free space, and the
store's lock (one job per store; flowprep/lock.py). Nothing outside --out is written or removed.

The job is resumable: a video whose stored copy passes `Store.check` (counts, cheap) and that the
last `flowprep verify` did not flag (OUT/verify.json) is skipped; anything else (missing,
half-written, killed mid-way, damaged) is redone. A plain re-run does not read every byte;
`--repair` does: it runs verify's full checksum pass first and redoes what it finds.

Backward flows for a finished forward store: `--direction both` on a store made with direction
forward (and otherwise the same parameters) is accepted as an upgrade. store.json says "both" from
then on; every whole forward video gains its backward flows (`add_backward`: the source is decoded
again, its frames are checked against the stored ones, and only flow(next, prev) is computed and
written, through `store.open_backward_writer`); the forward frames keep their bytes. A video killed
mid-upgrade is still whole forward (the backward part is written aside) and is upgraded by the next
run. The reverse, direction forward on a "both" store, is refused like any other change: the store
would claim backward flows its new videos lack (--overwrite redoes it forward only).

Stores hold no
timestamps, so the same input gives byte-identical stores whatever the backend, worker count,
order of completion or number of re-runs.

Workers: a task whose worker process dies (OOM kill, segfault, node lost) runs again from scratch
in a new one, up to 3 times, on both backends (flowprep/pool.py for joblib); then its video fails
with the reason and the job finishes with its summary. A video failing because the store's disk
is full (or read-only, or over quota) stops the job: every further video would fail the same way.
"""
from __future__ import annotations

import errno as errnos
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click
import cv2

from flowprep.flow import (ALGORITHMS, ALGOS, PRESET_NAMES, PRESETS, check_device, flow_params, make_flow_batch,
                           resolve_preset, set_single_thread)
from flowprep.lists import MMACTION2, Labels, SplitsError, read_splits, sorted_labels, write_lists
from flowprep.lock import StoreLock, StoreLocked
from flowprep.quant import DEFAULT_BOUND, quantize
from flowprep.store import (DIRECTIONS, DONE, FLOW_CODECS, FORMATS, LISTING_KEYS, LOGS, STOP_ERRNOS, STORE_INFO,
                            Store, StoreError, add_expected, append_manifest, clean_temps, encode_jpeg,
                            open_backward_writer, open_writer, os_error_sentence, read_findings, read_manifest,
                            read_store_info, store_direction, video_class, video_path, write_findings,
                            write_list_file, write_store_info)
from flowprep.video import VideoError, probe, read_frames, scan_videos
from twostream.progress import Progress
from twostream.schema import ConfigError, Key, Options, Section, boolean, integer, number, optional, size, string

log = logging.getLogger("flowprep")

BACKENDS = ("ray", "joblib")
DEFAULT_SIZE = (340, 256)
STORE_VERSION = 1
# Test-only fault injection: "VIDEO_ID:MARKER_FILE[:TIMES]" makes the task for VIDEO_ID exit its
# worker process abruptly (exit code 3) after writing a few flows, while MARKER_FILE holds fewer
# than TIMES lines (default 1: once); each exit adds a line. Used by the tests to prove a killed
# worker's video is retried (Ray and joblib), and failed with the reason when it dies every time.
TEST_EXIT_ENV = "FLOWPREP_TEST_EXIT_ONCE"
# Test-only: seconds to sleep per decoded frame, so a test can act while a job runs (the lock tests).
TEST_DELAY_ENV = "FLOWPREP_TEST_FRAME_DELAY"
# Below this much free space on the store's disk the job does not start.
MIN_FREE_BYTES = 64 << 20
# The command that turns a main-modules OpenCV into the contrib build TV-L1 on the CPU needs.
CONTRIB_FIX = "pip uninstall opencv-python opencv-python-headless && pip install opencv-contrib-python-headless"


def _preset_help() -> str:
    def fmt(p):
        return ", ".join(f"{k} {v}" for k, v in p.items())
    acc = PRESETS["accurate"]
    return (f"Flow settings. TV-L1 (default accurate): accurate = OpenCV defaults, as denseflow ({fmt(acc)}); "
            f"fast = {fmt({k: v for k, v in PRESETS['fast'].items() if acc[k] != v})}, "
            "rest as accurate: about 8x faster, a fraction of a pixel from accurate. DIS (default medium): "
            "ultrafast, fast, medium (OpenCV's presets). The other algorithms have none.")


class ExtractError(Exception):
    """A problem with the job as a whole (no videos, a store made with other parameters, ...)."""


def _check_extract(v: dict) -> dict:
    if v["size"] is not None and v["short_side"] is not None:
        raise ConfigError("give either extract.size (--size) or extract.short_side (--short-side), not both")
    if v["size"] is None and v["short_side"] is None:
        v["size"] = DEFAULT_SIZE
    if v["flow_codec"] != "jpeg" and v["format"] != "hdf5":
        raise ConfigError(f"extract.flow_codec (--flow-codec) = \"{v['flow_codec']}\" needs extract.format "
                          "(--format) = \"hdf5\": a JPEG store holds one JPEG file per frame")
    try:
        v["preset"] = resolve_preset(v["algo"], v["preset"])
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
    "algo": Key("tvl1", "; ".join(f"{a.name}: {a.help}" for a in ALGORITHMS.values()) + ".", choices=ALGOS),
    "preset": Key(None, _preset_help(), optional(string), choices=PRESET_NAMES),
    "rgb": Key(True, "Also store RGB frames. --no-rgb stores flow only (temporal stream); 'frames' still counts "
               "decoded frames, so flows = frames - 1.", boolean),
    "direction": Key("forward", "forward: flow from each frame to the next. both: also the backward flow, frame "
                     "i+1 to frame i (bflow_x_00001.jpg ..., HDF5 bflow_x/bflow_y), for the flow_bidir stream input. "
                     "Asking both of a finished forward store adds the backward flows and leaves the forward "
                     "ones as they are.", choices=DIRECTIONS),
    "flow_codec": Key("jpeg", "How HDF5 stores flow: jpeg (one JPEG per component frame, about 6 KB at 340x256) "
                      "or raw (uncompressed uint8 planes: lossless and about 4x faster to read, 87 KB). RGB stays "
                      "JPEG; --format jpeg allows jpeg only.", choices=FLOW_CODECS),
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
                   "--address). Without --address, more than this machine's cores are capped at its cores; with it, "
                   "the number of tasks in flight.", integer, min=0, flags=("--workers", "-j")),
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
            "algo": self.algo, "preset": self.preset if ALGORITHMS[self.algo].has_presets else None,
            "params": flow_params(self.algo, self.preset), "rgb": self.rgb, "max_frames": self.max_frames,
            "direction": self.direction, "flow_codec": self.flow_codec,
            # OpenCV TV-L1 and the torch port agree closely but not bit for bit.
            "implementation": "opencv" if self.device == "cpu" else "torch",
            "opencv": cv2.__version__,
        }


def manifest_record(video_id: str, src: str | Path, *, frames: int = 0, flows: int = 0, size: list | None = None,
                    seconds: float = 0.0, error: str | None = None, status: str | None = None,
                    declared_frames: int | None = None, decoded_frames: int | None = None,
                    warning: str | None = None, errno: str | None = None, bflows: int = 0) -> dict:
    """One line of OUT/manifest.jsonl: status "ok", "partial" (with `warning`) or "failed" (with `error`).

    declared_frames / decoded_frames: what the source's container declares and what decoded
    (`frames` is what the store holds); errno: the error's name when a failure stops the job.
    """
    return {"id": video_id, "label": video_class(video_id), "source": str(src),
            "status": status or ("ok" if error is None else "failed"), "frames": frames, "flows": flows,
            "bflows": bflows, "size": size,
            "declared_frames": declared_frames, "decoded_frames": decoded_frames,
            "seconds": round(seconds, 3), "error": error, "warning": warning, "errno": errno}


def failed_record(video_id: str, src: str | Path, error: str, seconds: float = 0.0, errno: str | None = None) -> dict:
    return manifest_record(video_id, src, seconds=seconds, error=error, errno=errno)


def _test_exit(marker: str) -> None:
    """The fault injection of TEST_EXIT_ENV: exit this process while the marker is short of its count."""
    path, _, times = marker.rpartition(":")
    if not times.isdigit():
        path, times = marker, "1"
    done = len(Path(path).read_text().splitlines()) if os.path.exists(path) else 0
    if done < int(times):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(3)  # simulate a worker killed mid-video


def _failure(e: Exception, store_root: str | Path) -> tuple[str, str | None]:
    """(reason, errno name when the failure stops the job) for an exception out of one video."""
    if isinstance(e, VideoError):
        return e.reason, None
    if isinstance(e, OSError) and e.errno in STOP_ERRNOS:
        return os_error_sentence(e, store_root), errnos.errorcode[e.errno]
    return f"{type(e).__name__}: {e}", None


def extract_video(src: str | Path, store_root: str | Path, video_id: str, opts: ExtractOptions,
                  *, flow_batch: tuple | None = None, _test_exit_marker: str | None = None,
                  _test_delay: float = 0.0) -> dict:
    """Extract one video into the store; returns its manifest record (status "ok", "partial" or "failed").

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
        writer = open_writer(opts.format, store_root, video_id, opts.jpeg_quality, opts.flow_codec)
        both = opts.direction == "both"
        prevs: list = []
        nexts: list = []

        def flush() -> None:
            if not prevs:
                return
            # Both directions in one call: a GPU batch solves the backward pairs with the forward ones.
            flows = flow_batch(prevs + nexts, nexts + prevs) if both else flow_batch(prevs, nexts)
            k = len(prevs)
            for i in range(k):
                writer.write_flow(quantize(flows[i], opts.bound))
                if both:
                    writer.write_flow(quantize(flows[k + i], opts.bound), backward=True)
            prevs.clear()
            nexts.clear()

        prev = None
        frames = read_frames(src, opts.size, opts.short_side, opts.step, opts.max_frames)
        for frame in frames:
            if opts.rgb:
                writer.write_rgb(frame)
            else:
                writer.skip_rgb()
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            if prev is not None:
                prevs.append(prev)
                nexts.append(gray)
                if len(prevs) * (2 if both else 1) >= batch:
                    flush()
            prev = gray
            if _test_exit_marker and writer.flows >= 2:
                _test_exit(_test_exit_marker)
            if _test_delay:
                time.sleep(_test_delay)
        flush()
        size = [frame.shape[1], frame.shape[0]]  # read_frames yields at least 2 frames or raises
        warning = frames.describe() if frames.partial else None
        meta = dict(opts.store_info(), id=video_id, label=video_class(video_id), source=str(src.resolve()),
                    fps=info.fps, source_frames=info.frames, source_size=[info.width, info.height],
                    size=size, declared_frames=frames.declared, decoded_frames=frames.decoded,
                    partial=frames.partial, warning=warning)
        writer.commit(meta)
        return manifest_record(video_id, src, frames=writer.frames, flows=writer.flows, size=size,
                               seconds=time.perf_counter() - t0, status="partial" if frames.partial else "ok",
                               declared_frames=frames.declared, decoded_frames=frames.decoded, warning=warning,
                               bflows=writer.bflows)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: stop, leaving nothing half-written
        reason, stop = _failure(e, store_root)
        return failed_record(video_id, src, reason, time.perf_counter() - t0, errno=stop)


def add_backward(src: str | Path, store_root: str | Path, video_id: str, opts: ExtractOptions,
                 *, flow_batch: tuple | None = None, _test_exit_marker: str | None = None,
                 _test_delay: float = 0.0) -> dict:
    """Give a whole forward-only video of the store its backward flows; returns its manifest record.

    The source is decoded again with the store's settings and must give the frames the store holds:
    the same count and, where RGB is stored, the same JPEG bytes (their CRC32s), so the backward
    flows belong to the stored forward ones. Only flow(next, prev) is computed; the forward frames
    are not rewritten (store.open_backward_writer). Never raises for a bad video, as extract_video.
    """
    t0 = time.perf_counter()
    src = Path(src)
    writer = None
    try:
        store = Store(store_root, findings=False)
        with store.open(video_id) as v:
            stored = dict(v.meta)
            crcs = (v.checksums() or {}).get("img") if v.has_rgb else None
        flow_batch, batch = flow_batch or make_flow_batch(opts.algo, opts.preset, opts.device)
        writer = open_backward_writer(opts.format, store_root, video_id)
        prevs: list = []
        nexts: list = []

        def flush() -> None:
            for f in flow_batch(nexts, prevs) if prevs else ():
                writer.write_flow(quantize(f, opts.bound))
            prevs.clear()
            nexts.clear()

        redo = (f"delete {video_path(store_root, video_id, opts.format)} and run again to extract it afresh, "
                "or --overwrite to redo every video")
        prev = None
        count = 0
        for frame in read_frames(src, opts.size, opts.short_side, opts.step, opts.max_frames):
            if count >= stored["frames"]:
                raise VideoError(f"the source now decodes to more than the {stored['frames']} frames the store "
                                 f"holds, so backward flows would not match the stored forward ones; {redo}")
            if crcs is not None and zlib.crc32(encode_jpeg(frame, opts.jpeg_quality)) != crcs[count]:
                raise VideoError(f"frame {count + 1} of the source differs from the stored one (changed since it was "
                                 f"extracted?), so backward flows would not match the stored forward ones; {redo}")
            count += 1
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            if prev is not None:
                prevs.append(prev)
                nexts.append(gray)
                if len(prevs) >= batch:
                    flush()
            prev = gray
            if _test_exit_marker and writer.bflows >= 2:
                _test_exit(_test_exit_marker)
            if _test_delay:
                time.sleep(_test_delay)
        flush()
        if count != stored["frames"]:
            raise VideoError(f"the source now decodes to {count} frames but the store holds {stored['frames']}, so "
                             f"backward flows would not match the stored forward ones; {redo}")
        writer.commit({"direction": "both"})
        return manifest_record(video_id, src, frames=stored["frames"], flows=stored["flows"], size=stored.get("size"),
                               seconds=time.perf_counter() - t0, status="partial" if stored.get("partial") else "ok",
                               declared_frames=stored.get("declared_frames"),
                               decoded_frames=stored.get("decoded_frames"), warning=stored.get("warning"),
                               bflows=writer.bflows)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if not isinstance(e, Exception):
            raise
        reason, stop = _failure(e, store_root)
        return failed_record(video_id, src, f"adding backward flows: {reason}", time.perf_counter() - t0, errno=stop)


def _run_one(src: str, root: str, video_id: str, opts: ExtractOptions, marker: str | None, service=None,
             delay: float = 0.0, backward_only: bool = False) -> dict:
    """Task body for both backends (a module-level function, so workers import it by name).

    `service`: a FlowService actor (Ray, --device cuda) that computes this task's flow batches.
    `backward_only`: the video is whole forward; add its backward flows (`add_backward`).
    """
    set_single_thread()
    flow_batch = None
    if service is not None:
        from flowprep.flow_service import service_flow_batch

        flow_batch = service_flow_batch(service)
    task = add_backward if backward_only else extract_video
    return task(src, root, video_id, opts, flow_batch=flow_batch, _test_exit_marker=marker, _test_delay=delay)


def _delay_from_env() -> float:
    """TEST_DELAY_ENV, read by the driver and passed to tasks (workers may outlive an environment change)."""
    return float(os.environ.get(TEST_DELAY_ENV) or 0)


# ---------------------------------------------------------------- backends

def _ray_temp_dir(out: Path) -> str:
    """Ray's session dir: under the output when short enough (unix socket paths are limited to
    about 107 bytes and Ray appends about 62), else a fresh folder in /tmp."""
    d = out.resolve() / ".tmp.ray"  # a .tmp. name: skipped by store walks, removed by clean_temps
    if len(str(d)) <= 40:
        return str(d)
    return tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")


def _keep_ray_logs(temp_dir: str, dest: Path) -> None:
    """Move the session logs of a local cluster out of its temporary folder (deleted next) to
    `dest`, keeping their paths below it (session_*/logs/...), so paths in messages stay valid."""
    shutil.rmtree(dest, ignore_errors=True)
    for session in sorted(Path(temp_dir).glob("session_*")):
        if session.is_dir() and not session.is_symlink() and (session / "logs").is_dir():
            (dest / session.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(session / "logs"), str(dest / session.name / "logs"))


def _run_ray(todo, out: Path, opts: ExtractOptions, workers: int, address: str | None,
             markers: dict[str, str], state: dict | None = None, upgrades: frozenset = frozenset()) -> Iterator[dict]:
    """Yield the records of `todo` as Ray finishes them. `state["logs"]` is set to the folder
    holding the local cluster's logs when a task's worker died (they outlive the job)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    state = {} if state is None else state
    own = not ray.is_initialized()
    temp_dir = None
    logs = out / LOGS / "ray"
    crashed = False
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
        delay = _delay_from_env()

        def submit() -> None:
            nonlocal submitted
            for vid, src in queue:
                service = services[submitted % len(services)] if services else None
                inflight[task.remote(str(src), str(out), vid, opts, markers.get(vid), service, delay,
                                     vid in upgrades)] = (vid, src)
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
                    crashed = True
                    text = f"{type(e).__name__}: {e}".strip()
                    if temp_dir:  # the logs move to the store when the cluster stops: name them there
                        text = text.replace(str(Path(temp_dir).resolve()), str(logs)).replace(temp_dir, str(logs))
                        where = f"Ray's logs: {logs}"
                    else:
                        where = "Ray's logs are on the cluster's nodes (/tmp/ray/session_latest/logs by default)"
                    rec = failed_record(vid, src, f"worker died on all 4 attempts ({text.splitlines()[0]}); {where}")
                submit()
                yield rec
    finally:
        if own:
            ray.shutdown()
            if temp_dir:
                if crashed:
                    try:
                        _keep_ray_logs(temp_dir, logs)
                        state["logs"] = logs
                    except OSError as e:
                        log.warning(f"could not keep Ray's logs in {logs}: {e}")
                shutil.rmtree(temp_dir, ignore_errors=True)


def _run_joblib(todo, out: Path, opts: ExtractOptions, workers: int, markers: dict[str, str],
                upgrades: frozenset = frozenset()) -> Iterator[dict]:
    """Yield the records of `todo` from worker processes on this machine (flowprep/pool.py)."""
    from flowprep.pool import WorkerDied, run_tasks

    sources = dict(todo)
    delay = _delay_from_env()
    tasks = ((vid, (str(src), str(out), vid, opts, markers.get(vid), None, delay, vid in upgrades))
             for vid, src in todo)
    for vid, result in run_tasks(_run_one, tasks, workers or _local_cores(), retries=3):
        if isinstance(result, WorkerDied):
            yield failed_record(vid, sources[vid], result.reason())
        elif isinstance(result, str):  # _run_one raised: a bug rather than bad input
            yield failed_record(vid, sources[vid], result)
        else:
            yield result


# ---------------------------------------------------------------- job

@dataclass
class Summary:
    out: Path
    total: int = 0
    done: list[str] = field(default_factory=list)  # extracted by this run (partial ones included)
    upgraded: list[str] = field(default_factory=list)  # whole forward videos that gained backward flows
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    partial: dict[str, str] = field(default_factory=dict)  # extracted, but the source was cut short
    notes: list[str] = field(default_factory=list)  # what the job decided for the user (capped workers, ...)
    pairs: int = 0
    seconds: float = 0.0
    workers: int = 0
    stopped: str | None = None  # why the job stopped before the end
    not_run: int = 0  # videos left undone by a stop
    logs: Path | None = None  # Ray's logs, kept because a worker died

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.stopped else 0

    def format(self) -> str:
        rate = self.pairs / self.seconds if self.seconds > 0 else 0.0
        added = f", {len(self.upgraded)} gained backward flows" if self.upgraded else ""
        lines = [f"{self.total} videos: {len(self.done)} extracted{added}, {len(self.skipped)} already done (skipped), "
                 f"{len(self.failed)} failed" + (f", {len(self.partial)} partial" if self.partial else "")
                 + f"; {self.pairs} frame pairs in {self.seconds:.1f} s ({rate:.2f} pairs/s)",
                 f"store: {self.out}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  PARTIAL {vid}: {why}" for vid, why in sorted(self.partial.items())]
        lines += [f"  FAILED {vid}: {reason}" for vid, reason in sorted(self.failed.items())]
        if self.logs:
            lines.append(f"Ray logs: {self.logs} (kept because a worker died)")
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; {self.not_run} not started or interrupted. Fix that and "
                         "run the same command again: finished videos are kept")
        return "\n".join(lines)


# Parameters added after the first stores were made: what a store.json without them means.
PARAM_DEFAULTS = {"direction": "forward", "flow_codec": "jpeg"}


def _check_store_params(out: Path, info: dict, overwrite: bool) -> dict:
    """The store's recorded settings (empty for a new store); raises if they differ from `info`.

    One difference is accepted: direction forward -> both (the videos gain backward flows).
    """
    try:
        old = read_store_info(out)
    except StoreError:
        if (out / STORE_INFO).is_file() and not overwrite:
            raise ExtractError(f"{out / STORE_INFO} is damaged, so the parameters this store was made with are "
                               "unknown; run with --overwrite (redoes every video) or use another --out") from None
        return {}
    if old.get("adopted_from") and not overwrite:
        raise ExtractError(f"{out} was made by `flowprep adopt` from {old['adopted_from']}, not extracted: its "
                           "parameters are unknown, so extracted videos cannot join it; use another --out")
    params = {**PARAM_DEFAULTS, **{k: v for k, v in old.items() if k not in LISTING_KEYS}}
    if store_direction(params) == "both" and info["direction"] == "forward" and not overwrite:
        raise ExtractError(f"{out} holds backward flows too (direction both); resume it with --direction both, or "
                           "use --overwrite to redo every video forward only")
    if store_direction(params) == "forward" and info["direction"] == "both":
        params["direction"] = "both"  # an upgrade: the videos gain backward flows (add_backward)
    if params != info and not overwrite:
        diff = ", ".join(f"{k}: store has {params.get(k)!r}, asked {info.get(k)!r}"
                         for k in sorted(set(params) | set(info)) if params.get(k) != info.get(k))
        raise ExtractError(f"{out} was extracted with different parameters ({diff}); use the same options to "
                           "resume, another --out, or --overwrite to redo every video")
    return old


def _local_cores() -> int:
    """Cores this process may run on (the affinity mask: a cluster job's share, not the whole node)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_opencv(opts: ExtractOptions) -> None:
    """TV-L1 on the CPU is OpenCV's contrib module: refuse to start without it (else every video fails)."""
    if opts.algo == "tvl1" and opts.device == "cpu" and not hasattr(getattr(cv2, "optflow", None),
                                                                    "DualTVL1OpticalFlow_create"):
        raise ExtractError(
            f"this OpenCV ({cv2.__version__}, {Path(cv2.__file__).parent}) has no cv2.optflow, which TV-L1 on the CPU "
            "needs: it is the main-modules build (opencv-python), probably installed over or instead of the "
            f"contrib build. Fix: {CONTRIB_FIX} (the version setup.cfg pins). Or use --algo farneback, or "
            "--device cuda / torch-cpu (the torch TV-L1)")


def _os_sentence(e: OSError, out: Path) -> str:
    if e.errno in STOP_ERRNOS:
        return (os_error_sentence(e, out) + "; free some space or choose another --out, then run the same command "
                "again (finished videos are kept)")
    return os_error_sentence(e, out)


def _make_store_folder(out: Path) -> None:
    """Create --out, or say in a sentence why it cannot be: a file in the way, no permission, a full disk."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ExtractError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise ExtractError(f"the disk holding {out} is full ({free / 2**20:.1f} MiB free, at least "
                           f"{MIN_FREE_BYTES >> 20} MiB needed to start); free some space or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExtractError(f"cannot create the store folder {out}: {_os_sentence(e, out)}") from None


def _labels(splits: Path | None, old: dict, records, notes: list[str]) -> Labels:
    """The class index for the list files: --splits, else the one recorded in the store, else sorted names."""
    if splits is not None:
        return read_splits(splits)  # checked before the job started
    if old.get("splits"):
        try:
            return read_splits(old["splits"])
        except SplitsError as e:
            notes.append(f"the split folder this store was listed with cannot be read ({e}); labels are the "
                         "sorted class names now (pass --splits to keep the official ones)")
    return sorted_labels(r["id"] for r in records if r.get("status") in DONE)


def run_extract(videos: str | Path, out: str | Path, opts: ExtractOptions = ExtractOptions(), *,
                list_file: str | Path | None = None, workers: int = 0, backend: str = "ray",
                address: str | None = None, overwrite: bool = False, repair: bool = False,
                splits: str | Path | None = None, progress: bool = True, command: str | None = None) -> Summary:
    """Extract every video under `videos` (or those in `list_file`) into the store `out`.

    workers: parallel tasks (0 = all cores, or all CPUs of the cluster at `address`). Without
    `address` they run on this machine, so more than its cores are capped at its cores (a note
    says so); on a cluster, `workers` is the number of tasks in flight.
    backend: "ray" (local cluster, or the existing one at `address`: "auto" or "ray://host:port";
    every node must see `videos` and `out` at the same paths) or "joblib" (this machine).
    Resumes: videos already complete in the store are skipped unless `overwrite`, or flagged by
    the last `flowprep verify`; `repair` runs verify's full pass first and redoes what it finds.
    splits: a UCF-101 / HMDB-51 split folder: labels from its class index, lists per split.
    command: what the store's lock names as its holder (default: this process's command line).
    Raises ExtractError for problems with the job itself, before anything runs; bad videos only
    fail their own record.
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
    _check_opencv(opts)
    if splits is not None:
        try:
            read_splits(splits)  # a bad folder stops the job now, not after hours of extraction
        except SplitsError as e:
            raise ExtractError(str(e)) from None
        splits = Path(splits).absolute()
    try:
        scan = scan_videos(videos, list_file)
    except (OSError, ValueError) as e:
        raise ExtractError(str(e)) from None
    found = scan.videos
    if not found:
        raise ExtractError(f"no videos found under {videos}" + (f" from the list {list_file}" if list_file else
                           " (looked for .avi .mp4 .mkv .mov .webm .mpg .mpeg .flv .wmv .m4v)"))
    summary = Summary(out=out, total=len(found), notes=list(scan.notes))
    if not address:
        cores = _local_cores()
        if workers > cores:
            summary.notes.append(f"--workers {workers} capped at {cores}: this machine has {cores} cores, and more "
                                 "processes than cores only slow the job down (for more, run on a Ray cluster "
                                 "with --address)")
        asked = workers
        workers = min(workers, cores) if workers else cores
        if opts.device.startswith("cuda") and backend == "joblib" and not asked:  # one process per GPU
            import torch

            workers = max(1, torch.cuda.device_count())
    summary.workers = workers

    _make_store_folder(out)
    lock = StoreLock(out, command or f"run_extract({videos} -> {out}) in {shlex.join(sys.argv)}")
    try:
        lock.acquire()
    except StoreLocked as e:
        raise ExtractError(str(e)) from None
    except OSError as e:
        raise ExtractError(f"cannot lock the store {out}: {_os_sentence(e, out)}") from None
    try:
        return _run_locked(summary, lock, videos, out, opts, found, backend, workers, address, overwrite, repair,
                           splits, progress, t0)
    except OSError as e:  # the driver's own writes (manifest, lists) on a full or failing disk
        raise ExtractError(_os_sentence(e, out)) from None
    finally:
        lock.release()


def _run_locked(summary: Summary, lock: StoreLock, videos: Path, out: Path, opts: ExtractOptions, found: list,
                backend: str, workers: int, address: str | None, overwrite: bool, repair: bool,
                splits: Path | None, progress: bool, t0: float) -> Summary:
    """The job, holding the store's lock: nothing else writes the store meanwhile."""
    if lock.note:
        summary.notes.insert(0, lock.note + "; its unfinished videos are redone")
    info = opts.store_info()
    old = _check_store_params(out, info, overwrite)
    clean_temps(out)  # leftovers of a killed run: under the lock, no job is writing them
    write_store_info(out, {**{k: old[k] for k in LISTING_KEYS if k in old}, **info})
    add_expected(out, found)

    store = Store(out)
    manifest = read_manifest(out)
    findings = read_findings(out)
    if repair:
        from flowprep.verify import verify_store

        if progress:
            log.info(f"flowprep: --repair: checking every frame of {out} first")
        report = verify_store(out, record=False, lock=False)
        findings.update(report.damaged)
        asked = dict(found)
        damaged = sorted(v for v in report.problems if v in asked)
        summary.notes.append(f"--repair: verify found {len(report.problems)} video(s) with problems"
                             + "".join(f"\n    {v}: {report.problems[v]}" for v in damaged[:20]))
    todo = []
    upgrades = set()  # whole forward videos of a store now asked for backward flows too
    for vid, src in found:
        if not overwrite and vid not in findings and store.check(vid) is None:
            summary.skipped.append(vid)
            if manifest.get(vid, {}).get("status") not in DONE:  # manifest lost or stale: rebuild the record
                with store.open(vid) as v:
                    append_manifest(out, manifest_record(
                        vid, src, frames=v.num_frames, flows=v.num_flows, size=v.meta.get("size"),
                        status="partial" if v.meta.get("partial") else "ok", warning=v.meta.get("warning"),
                        declared_frames=v.meta.get("declared_frames"), decoded_frames=v.meta.get("decoded_frames"),
                        bflows=v.num_bflows))
        else:
            todo.append((vid, src))
            if not overwrite and vid not in findings and opts.direction == "both" and store.needs_backward(vid):
                upgrades.add(vid)

    markers = {}
    if os.environ.get(TEST_EXIT_ENV):
        vid, _, marker = os.environ[TEST_EXIT_ENV].partition(":")
        markers[vid] = marker

    state: dict = {}
    if not todo:
        results = iter(())  # nothing to do: do not start a cluster
    elif backend == "ray":
        results = _run_ray(todo, out, opts, workers, address, markers, state, frozenset(upgrades))
    else:
        results = _run_joblib(todo, out, opts, workers, markers, frozenset(upgrades))
    if progress:
        adding = f" ({len(upgrades)} of them only to add backward flows)" if upgrades else ""
        log.info(f"flowprep: {len(found)} videos, {len(summary.skipped)} already done, {len(todo)} to extract{adding} "
                 f"with {backend} ({workers or 'all'} workers{' on ' + address if address else ''}) into {out}")
        for note in summary.notes:
            log.info(f"note: {note}")
    t_run = time.perf_counter()
    processed = 0
    try:
        with Progress(len(todo), "extracting", unit="videos", show=progress) as bar:
            for rec in results:
                processed += 1
                append_manifest(out, rec)
                vid = rec["id"]
                if rec["status"] in DONE:
                    if vid in upgrades:
                        summary.upgraded.append(vid)
                        summary.pairs += rec["bflows"]
                    else:
                        summary.done.append(vid)
                        summary.pairs += rec["flows"] + rec["bflows"]
                    findings.pop(vid, None)
                    if rec["status"] == "partial" and vid not in upgrades:
                        summary.partial[vid] = rec["warning"]
                else:
                    summary.failed[vid] = rec["error"]
                    if overwrite:  # do not leave an older copy made with other parameters
                        stale = video_path(out, vid, opts.format)
                        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
                dt = time.perf_counter() - t_run
                bar.update(1, status=f"{summary.pairs} pairs, {summary.pairs / dt if dt > 0 else 0:.2f} pairs/s",
                           failed=int(rec["status"] not in DONE))
                if rec.get("errno"):
                    summary.stopped = rec["error"]
                    summary.not_run = len(todo) - processed
                    break
    finally:
        close = getattr(results, "close", None)
        if close:
            close()  # stops the workers of a stopped job; shuts down a local Ray cluster
    summary.logs = state.get("logs")

    clean_temps(out)  # partial copies of videos whose worker was killed and retried
    write_findings(out, findings)
    records = read_manifest(out).values()
    labels = _labels(splits, old, records, summary.notes)
    write_list_file(out, records, labels.index)
    summary.notes += write_lists(out, records, labels, rgb=opts.rgb)
    listing = {"labels_from": labels.source, "classes": labels.classes}
    if labels.folder:
        listing["splits"] = labels.folder
    if opts.format == "jpeg":
        listing["mmaction2"] = MMACTION2
    write_store_info(out, {**info, **listing})
    summary.seconds = time.perf_counter() - t0
    if progress:
        click.echo(summary.format(), err=True)
    return summary
