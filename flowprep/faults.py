"""Test-only fault injection for store jobs: the one seam, outside every production signature.

    FLOWPREP_TEST_EXIT_ONCE="VIDEO_ID:MARKER_FILE[:TIMES]"   the worker running VIDEO_ID exits
        abruptly (exit code 3) after writing a few flows, while MARKER_FILE holds fewer than
        TIMES lines (default 1: once); each exit adds a line. Proves a killed worker's video is
        retried (Ray and joblib), and failed with the reason when it dies every time.
    FLOWPREP_TEST_FRAME_DELAY=SECONDS   sleep per decoded frame, so a test can act while a job runs.

The driver reads the environment when a job starts (`from_env`) and the job hands the settings
to each task, which `install`s them in its worker: a worker process may outlive an environment
change (joblib's kept workers). Per-video code calls `frame_done(video_id, flows_written)` once
per frame: a no-op unless a test set one of the variables.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_ENV = "FLOWPREP_TEST_EXIT_ONCE"
DELAY_ENV = "FLOWPREP_TEST_FRAME_DELAY"


@dataclass(frozen=True)
class Faults:
    exit_video: str | None = None
    marker: str | None = None
    times: int = 1
    delay: float = 0.0


_active: Faults | None = None


def from_env() -> Faults | None:
    """The faults the environment asks for (None: none)."""
    exit_spec, delay = os.environ.get(EXIT_ENV), float(os.environ.get(DELAY_ENV) or 0)
    if not exit_spec and not delay:
        return None
    video = marker = None
    times = 1
    if exit_spec:
        video, _, marker = exit_spec.partition(":")
        path, _, count = marker.rpartition(":")
        if count.isdigit():
            marker, times = path, int(count)
    return Faults(video, marker, times, delay)


def install(faults: Faults | None) -> None:
    """Make `faults` the ones this worker process applies (None: none)."""
    global _active
    _active = faults


def frame_done(video_id: str, flows_written: int) -> None:
    """Called once per frame by the per-video work: exits or sleeps as the installed faults say."""
    f = _active
    if f is None:
        return
    if f.exit_video == video_id and flows_written >= 2:
        done = len(Path(f.marker).read_text().splitlines()) if os.path.exists(f.marker) else 0
        if done < f.times:
            with open(f.marker, "a") as out:
                out.write(f"{os.getpid()}\n")
            os._exit(3)  # simulate a worker killed mid-video
    if f.delay:
        time.sleep(f.delay)
