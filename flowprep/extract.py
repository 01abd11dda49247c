"""Extraction of one video into a store: `extract_video`, and `add_backward` (the backward flows of
a video stored forward). What a store holds is `ExtractOptions` (flowprep/extract_options.py);
a whole folder is `run_extract` (flowprep/extract_job.py).

A video streams through decode -> resize -> RGB JPEG -> flow against the previous frame -> quantize
-> flow JPEGs, holding two frames at a time (a batch of pairs with a GPU), into a temporary name
that is renamed into place only when the video is whole. Bad input never raises out of a task: it
comes back as a record with status "failed" and the reason, and every other video is still extracted.
A source cut short is kept without its last decoded frame and marked "partial" (flowprep/video.py).
With `--direction both` each pair also gets its backward flow, flow(next, prev), computed through
the same batch hook (one call for both directions, so a GPU solves them together).

Stores hold no timestamps, so the same input gives byte-identical stores whatever the backend,
worker count, order of completion or number of re-runs.
"""
from __future__ import annotations

import errno as errnos
import time
import zlib
from pathlib import Path

import cv2

from core.ids import video_class
from flowprep import faults
from flowprep.extract_options import FREE_ON_RESUME, ExtractOptions
from flowprep.flow import FlowSpec, make_flow_batch, set_single_thread
from flowprep.job import record
from flowprep.quant import quantize
from flowprep.store import Store, open_backward_writer, open_writer, video_path
from flowprep.store_base import encode_jpeg
from flowprep.store_files import STOP_ERRNOS, os_error_sentence
from flowprep.video import VideoError, fingerprint, probe, read_frames


def _failure(e: Exception, store_root: str | Path) -> tuple[str, str | None]:
    """(reason, errno name when the failure stops the job) for an exception out of one video."""
    if isinstance(e, VideoError):
        return e.reason, None
    if isinstance(e, OSError) and e.errno in STOP_ERRNOS:
        return os_error_sentence(e, store_root), errnos.errorcode[e.errno]
    return f"{type(e).__name__}: {e}", None


def _flow_batch(flow: FlowSpec, service) -> tuple:
    """The (function, batch size) computing this task's flow: a GPU service's (an actor shared by
    the tasks around it, flowprep/flow_service.py), or the worker's own."""
    set_single_thread()
    if service is not None:
        from flowprep.flow_service import service_flow_batch

        return service_flow_batch(service)
    return make_flow_batch(flow)


def _engine(flow_batch, flow: FlowSpec) -> str:
    """What computed a video's flow (the manifest's "engine"): the fused engine, OpenCV (and why,
    where it stood in for the fused one), or the torch port."""
    used = getattr(flow_batch, "engine_used", None)
    return used() if used else flow.engine


def extract_video(src: str | Path, store_root: str | Path, video_id: str, opts: ExtractOptions,
                  flow: FlowSpec | None = None, service=None) -> dict:
    """Extract one video into the store; returns its manifest record (status "ok", "partial" or "failed").

    Never raises for a bad video: the reason goes into record["error"] and nothing is left in
    the store (the temporary copy is removed). `flow`: what to compute (a job resolves it once
    for all its tasks; default: `opts.flow_spec()`); `service`: a GPU FlowService actor that
    computes it for this task.
    """
    t0 = time.perf_counter()
    src = Path(src)
    flow = flow or opts.flow_spec()
    writer = None
    try:
        info = probe(src)
        source_fingerprint = fingerprint(src)  # so a resumed job notices a replaced or grown source
        flow_batch, batch = _flow_batch(flow, service)
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
            faults.frame_done(video_id, writer.flows)
        flush()
        size = [frame.shape[1], frame.shape[0]]  # read_frames yields at least 2 frames or raises
        warning = frames.describe() if frames.partial else None
        # What the video is, not which engine made it (both give these bytes): the manifest says that.
        meta = dict({k: v for k, v in opts.store_info(flow).items() if k not in FREE_ON_RESUME}, id=video_id, label=video_class(video_id), source=str(src.resolve()),
                    fps=info.fps, source_frames=info.frames, source_size=[info.width, info.height],
                    size=size, declared_frames=frames.declared, decoded_frames=frames.decoded,
                    partial=frames.partial, warning=warning, source_fingerprint=source_fingerprint)
        writer.commit(meta)
        return record(video_id, src, frames=writer.frames, flows=writer.flows, size=size,
                      seconds=time.perf_counter() - t0, status="partial" if frames.partial else "ok",
                      warning=warning, bflows=writer.bflows, declared_frames=frames.declared,
                      decoded_frames=frames.decoded, engine=_engine(flow_batch, flow))
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if not isinstance(e, Exception):
            raise  # KeyboardInterrupt / SystemExit: stop, leaving nothing half-written
        reason, stop = _failure(e, store_root)
        return record(video_id, src, error=reason, seconds=time.perf_counter() - t0, errno=stop,
                      declared_frames=None, decoded_frames=None)


def add_backward(src: str | Path, store_root: str | Path, video_id: str, opts: ExtractOptions,
                 flow: FlowSpec | None = None, service=None) -> dict:
    """Give a whole forward-only video of the store its backward flows; returns its manifest record.

    The source is decoded again with the store's settings and must give the frames the store holds:
    the same count and, where RGB is stored, the same JPEG bytes (their CRC32s), so the backward
    flows belong to the stored forward ones. Only flow(next, prev) is computed; the forward frames
    are not rewritten (store.open_backward_writer). Never raises for a bad video, as extract_video.
    """
    t0 = time.perf_counter()
    src = Path(src)
    flow = flow or opts.flow_spec()
    writer = None
    try:
        store = Store(store_root, findings=False)
        with store.open(video_id) as v:
            stored = dict(v.meta)
            crcs = (v.checksums() or {}).get("img") if v.has_rgb else None
        flow_batch, batch = _flow_batch(flow, service)
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
            faults.frame_done(video_id, writer.bflows)
        flush()
        if count != stored["frames"]:
            raise VideoError(f"the source now decodes to {count} frames but the store holds {stored['frames']}, so "
                             f"backward flows would not match the stored forward ones; {redo}")
        writer.commit({"direction": "both"})
        return record(video_id, src, frames=stored["frames"], flows=stored["flows"], size=stored.get("size"),
                      seconds=time.perf_counter() - t0, status="partial" if stored.get("partial") else "ok",
                      warning=stored.get("warning"), bflows=writer.bflows,
                      declared_frames=stored.get("declared_frames"), decoded_frames=stored.get("decoded_frames"),
                      engine=_engine(flow_batch, flow))
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if not isinstance(e, Exception):
            raise
        reason, stop = _failure(e, store_root)
        return record(video_id, src, error=f"adding backward flows: {reason}", seconds=time.perf_counter() - t0,
                      errno=stop, declared_frames=None, decoded_frames=None)
