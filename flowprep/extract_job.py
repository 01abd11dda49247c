"""`flowprep extract` over a folder: `run_extract`, the store job (flowprep/job.py) whose per-video
work is `extract_video` or `add_backward` (flowprep/extract.py), on Ray or joblib.

Before anything runs, the job as a whole is checked, so a problem is one sentence and not a
thousand failed videos: the video list (ids inside --videos only, no collisions, names the list
files can hold; flowprep/video.py), the OpenCV build, the device, the split folder, the store
folder and its free space, and the store's lock (one job per store; flowprep/lock.py).

The job is resumable: a video whose stored copy passes `Store.check` (counts, cheap) and that the
last `flowprep verify` did not flag (OUT/verify.json) is skipped; anything else (missing,
half-written, killed mid-way, damaged) is redone. A plain re-run does not read every byte;
`--repair` does: it runs verify's full checksum pass first and redoes what it finds.

Backward flows for a finished forward store: `--direction both` on a store made with direction
forward (and otherwise the same parameters) is accepted as an upgrade. store.json says "both" from
then on; every whole forward video gains its backward flows (`add_backward`: the source is decoded
again, its frames are checked against the stored ones, and only flow(next, prev) is computed and
written); the forward frames keep their bytes. A video killed mid-upgrade is still whole forward
(the backward part is written aside) and is upgraded by the next run. The reverse, direction
forward on a "both" store, is refused like any other change: the store would claim backward flows
its new videos lack (--overwrite redoes it forward only).

Workers: a task whose worker process dies (OOM kill, segfault, node lost) runs again from scratch
in a new one, up to 3 times, on both backends; then its video fails with the reason and the job
finishes with its summary. A video failing because the store's disk is full (or read-only, or
over quota) stops the job: every further video would fail the same way.
"""
from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import cv2

from core.layout import LISTING_KEYS, STORE_INFO
from core.splits import SplitsError, read_splits
from flowprep.distribute import BACKENDS, Cluster, local_cores
from flowprep.extract import add_backward, extract_video
from flowprep.extract_options import FREE_ON_RESUME, ExtractOptions
from flowprep.flow import FlowSpec, check_device
from flowprep.job import JobError, StoreJob, Summary, log
from flowprep.store import Store, video_path
from flowprep.store_files import store_direction
from flowprep.video import scan_videos, source_changed

# The command that turns a main-modules OpenCV into the contrib build TV-L1 on the CPU needs.
CONTRIB_FIX = "pip uninstall opencv-python opencv-python-headless && pip install opencv-contrib-python-headless"
# The fewest threads worth giving one video's flow (rows of a pair in parallel; see for_submission).
TAIL_MIN_THREADS = 4
# Parameters added after the first stores were made: what a store.json without them means.
PARAM_DEFAULTS = {"direction": "forward", "flow_codec": "jpeg"}


class ExtractSummary(Summary):
    def headline(self) -> str:
        rate = self.pairs / self.seconds if self.seconds > 0 else 0.0
        added = f", {len(self.upgraded)} gained backward flows" if self.upgraded else ""
        return (f"{self.total} videos: {len(self.done)} extracted{added}, {len(self.skipped)} already done (skipped), "
                f"{len(self.failed)} failed" + (f", {len(self.partial)} partial" if self.partial else "")
                + f"; {self.pairs} frame pairs in {self.seconds:.1f} s ({rate:.2f} pairs/s)")


class ExtractJob(StoreJob):
    summary_class = ExtractSummary
    verb = "extract"

    def __init__(self, out: Path, videos: list, opts: ExtractOptions, flow: FlowSpec, *, overwrite: bool,
                 repair: bool, **kw):
        super().__init__(out, videos, **kw)
        self.opts, self.overwrite, self.repair = opts, overwrite, repair
        self.flow = flow  # resolved once, for every task
        self.what = f"{flow.algo}{' ' + flow.preset if flow.preset else ''}, {flow.engine} engine"
        self.changed: dict[str, str] = {}  # whole stored videos whose source changed since: redone

    def store_info(self, old: dict) -> dict:
        """The store's parameters (store.json); JobError when they differ from what is asked.
        One difference is accepted: direction forward -> both (the videos gain backward flows)."""
        out, full = self.out, self.opts.store_info(self.flow)
        if old.get("damaged") and not self.overwrite:
            raise JobError(f"{out / STORE_INFO} is damaged, so the parameters this store was made with are "
                           "unknown; run with --overwrite (redoes every video) or use another --out")
        if old.get("damaged") or not old:
            self.old = {}
            return full
        if old.get("adopted_from") and not self.overwrite:
            raise JobError(f"{out} was made by `flowprep adopt` from {old['adopted_from']}, not extracted: its "
                           "parameters are unknown, so extracted videos cannot join it; use another --out")
        params = {**PARAM_DEFAULTS, **{k: v for k, v in old.items() if k not in LISTING_KEYS + FREE_ON_RESUME}}
        info = {k: v for k, v in full.items() if k not in FREE_ON_RESUME}
        if store_direction(params) == "both" and info["direction"] == "forward" and not self.overwrite:
            raise JobError(f"{out} holds backward flows too (direction both); resume it with --direction both, or "
                           "use --overwrite to redo every video forward only")
        if store_direction(params) == "forward" and info["direction"] == "both":
            params["direction"] = "both"  # an upgrade: the videos gain backward flows (add_backward)
        if params != info and not self.overwrite:
            diff = ", ".join(f"{k}: store has {params.get(k)!r}, asked {info.get(k)!r}"
                             for k in sorted(set(params) | set(info)) if params.get(k) != info.get(k))
            raise JobError(f"{out} was extracted with different parameters ({diff}); use the same options to "
                           "resume, another --out, or --overwrite to redo every video")
        return full

    def prepare(self, store: Store) -> None:
        if self.repair:
            from flowprep.verify import verify_store

            if self.progress:
                log.info(f"flowprep: --repair: checking every frame of {self.out} first")
            report = verify_store(self.out, record=False, lock=False)
            self.findings.update(report.damaged)
            asked = dict(self.videos)
            damaged = sorted(v for v in report.problems if v in asked)
            self.summary.notes.append(f"--repair: verify found {len(report.problems)} video(s) with problems"
                                      + "".join(f"\n    {v}: {report.problems[v]}" for v in damaged[:20]))

    def plan(self, store: Store, video_id: str, source: str) -> tuple | None:
        fresh = not self.overwrite and video_id not in self.findings
        args = (str(source), str(self.out), video_id, self.opts, self.flow)
        seen = store.inspect(video_id) if fresh else None
        if seen and seen.problem is None:
            changed = source_changed(seen.meta.get("source_fingerprint"), source)
            if changed is None:
                return None
            self.changed[video_id] = changed
            return extract_video, args
        if fresh and self.opts.direction == "both" and store.needs_backward(video_id):
            self.upgrades.add(video_id)
            return add_backward, args
        return extract_video, args

    def before_run(self) -> None:
        """The fused engine's kernels compiled once here, into numba's on-disk cache, so that the
        workers (other processes of this machine) load them instead of each compiling its own."""
        if self.flow.engine == "fused":
            from flowprep.tvl1_fused import warm_up

            seconds = warm_up()
            if self.progress:
                log.info(f"flowprep: fused TV-L1 engine ready in {seconds:.1f} s (compiled once, cached for the "
                         "workers)")

    def for_submission(self, task: tuple, remaining: int, in_flight: int) -> tuple:
        """The last videos of a job (or all of them with fewer workers than cores) get the idle
        cores: the fused engine computes each pair's rows in parallel, to the same bits. Only with
        TAIL_MIN_THREADS or more cores to give: on fewer, threads cost more than they bring."""
        work, args = task
        if self.cluster.address:
            return task
        free = local_cores() - in_flight
        flow = with_idle_cores(self.flow, free // max(1, min(self.workers or free, remaining)))
        return task if flow is self.flow else (work, (*args[:4], flow, *args[5:]))

    def record_extra(self, meta: dict) -> dict:
        return {"declared_frames": meta.get("declared_frames"), "decoded_frames": meta.get("decoded_frames")}

    def account(self, rec: dict, upgrade: bool) -> None:
        vid = rec["id"]
        if rec["status"] in ("ok", "partial"):
            self.summary.pairs += rec["bflows"] if upgrade else rec["flows"] + rec["bflows"]
        elif self.overwrite:  # do not leave an older copy made with other parameters
            stale = video_path(self.out, vid, self.opts.format)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def status(self, seconds: float) -> str:
        pairs = self.summary.pairs
        return f"{pairs} pairs, {pairs / seconds if seconds > 0 else 0:.2f} pairs/s"

    def has_rgb(self, store: Store, records) -> bool:
        return self.opts.rgb

    def finish(self, store: Store) -> None:
        if self.changed:
            shown = "".join(f"\n    {vid}: {why}" for vid, why in sorted(self.changed.items())[:20])
            self.summary.notes.append(f"{len(self.changed)} stored video(s) redone: their source changed since "
                                      f"they were extracted{shown}")
        super().finish(store)


def with_idle_cores(flow: FlowSpec, threads: int) -> FlowSpec:
    """`flow` computing each pair's rows on `threads` cores (the fused engine only, bit-identical),
    or `flow` itself below TAIL_MIN_THREADS, where threads cost more than they bring."""
    if flow.engine != "fused" or threads < TAIL_MIN_THREADS:
        return flow
    return replace(flow, threads=threads)


def _check_opencv(opts: ExtractOptions) -> None:
    """TV-L1 on the CPU is OpenCV's contrib module: refuse to start without it (else every video fails)."""
    if opts.algo == "tvl1" and opts.device == "cpu" and not hasattr(getattr(cv2, "optflow", None),
                                                                    "DualTVL1OpticalFlow_create"):
        raise JobError(
            f"this OpenCV ({cv2.__version__}, {Path(cv2.__file__).parent}) has no cv2.optflow, which TV-L1 on the CPU "
            "needs: it is the main-modules build (opencv-python), probably installed over or instead of the "
            f"contrib build. Fix: {CONTRIB_FIX} (the version setup.cfg pins). Or use --algo farneback, or "
            "--device cuda / torch-cpu (the torch TV-L1)")


def run_extract(videos: str | Path, out: str | Path, opts: ExtractOptions = ExtractOptions(), *,
                list_file: str | Path | None = None, workers: int = 0, backend: str = "ray",
                address: str | None = None, node_timeout: float = 600.0, overwrite: bool = False, repair: bool = False,
                splits: str | Path | None = None, progress: bool = True, command: str | None = None) -> Summary:
    """Extract every video under `videos` (or those in `list_file`) into the store `out`.

    workers: parallel tasks (0 = all cores, or all CPUs of the cluster at `address`). Without
    `address` they run on this machine, so more than its cores are capped at its cores (a note
    says so); on a cluster, `workers` is the number of tasks in flight.
    backend: "ray" (local cluster, or the existing one at `address`: "auto" or "ray://host:port";
    every node must see `videos` and `out` at the same paths) or "joblib" (this machine).
    node_timeout: Ray: seconds in which no node could run the remaining videos (nodes lost) after
    which the job stops as after Ctrl-C (finished videos kept; the summary's exit status is 2).
    Resumes: videos already complete in the store are skipped unless `overwrite`, or flagged by
    the last `flowprep verify`; `repair` runs verify's full pass first and redoes what it finds.
    splits: a UCF-101 / HMDB-51 split folder: labels from its class index, lists per split.
    command: what the store's lock names as its holder (default: this process's command line).
    Raises JobError for problems with the job itself, before anything runs; bad videos only
    fail their own record.
    """
    out = Path(out).absolute()  # workers (other processes, other nodes) may not share our working directory
    videos = Path(videos).absolute()
    if backend not in BACKENDS:
        raise JobError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if workers < 0:
        raise JobError(f"--workers must be >= 0 (0 = all cores), got {workers}")
    if address and backend != "ray":
        raise JobError("--address names a Ray cluster; it needs --backend ray")
    try:
        if not (address and opts.device.startswith("cuda")):  # a cluster's GPUs are checked on the cluster
            check_device(opts.algo, opts.device)
    except ValueError as e:
        raise JobError(str(e)) from None
    _check_opencv(opts)
    if splits is not None:
        try:
            read_splits(splits)  # a bad folder stops the job now, not after hours of extraction
        except SplitsError as e:
            raise JobError(str(e)) from None
        splits = Path(splits).absolute()
    try:
        scan = scan_videos(videos, list_file)
    except (OSError, ValueError) as e:
        raise JobError(str(e)) from None
    found = [(vid, str(src)) for vid, src in scan.videos]
    if not found:
        raise JobError(f"no videos found under {videos}" + (f" from the list {list_file}" if list_file else
                       " (looked for .avi .mp4 .mkv .mov .webm .mpg .mpeg .flv .wmv .m4v)"))
    notes = list(scan.notes)
    if not address:
        cores = local_cores()
        if workers > cores:
            notes.append(f"--workers {workers} capped at {cores}: this machine has {cores} cores, and more processes "
                         "than cores only slow the job down (for more, run on a Ray cluster with --address)")
        asked = workers
        workers = min(workers, cores) if workers else cores
        if opts.device.startswith("cuda") and backend == "joblib" and not asked:  # one process per GPU
            import torch

            workers = max(1, torch.cuda.device_count())
    flow = opts.flow_spec()
    cluster = Cluster(store=out, address=address, actors=_services(flow) if flow.device != "cpu" else None,
                      node_timeout=node_timeout, report=log.warning)
    job = ExtractJob(out, found, opts, flow, overwrite=overwrite, repair=repair, backend=backend, workers=workers,
                     cluster=cluster, splits=splits, progress=progress, notes=notes,
                     command=command or f"run_extract({videos} -> {out}) in {shlex.join(sys.argv)}")
    return job.run()


def _services(flow: FlowSpec):
    """Off the CPU on Ray, one FlowService actor per GPU computes the flow for every task
    (flowprep/flow_service.py): the actors, made once the cluster is up."""
    def start(ray) -> list:
        from flowprep.flow_service import start_services

        try:
            return start_services(ray, flow)
        except RuntimeError as e:
            raise JobError(str(e)) from None
    return start
