"""One job per store: a second `flowprep extract` on a store in use refuses, naming the holder; a lock
left by a killed run on this host is taken over; a run killed mid-way leaves a store verify rejects
and a re-run completes."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowprep.job import JobError as ExtractError
from flowprep.extract_options import ExtractOptions
from flowprep.extract_job import run_extract
from flowprep.verify import verify_store
from videos import write_moving_video

OPTS = ExtractOptions(size=(64, 48), preset="fast")
LOCK = ".flowprep.lock"
# Slow on purpose: accurate TV-L1 at 96x72, and a test-only pause per frame (FLOWPREP_TEST_FRAME_DELAY).
SLOW = ["--backend", "joblib", "--workers", "1", "--size", "96x72", "--preset", "accurate"]


def flowprep(*args, env=None, **kw):
    env = {**os.environ, "FLOWPREP_TEST_FRAME_DELAY": "0.2", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "flowprep", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(cond, what, timeout=60.0):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def in_progress(out: Path) -> bool:
    return out.is_dir() and any(p.name.startswith(".tmp.") and p.is_dir() for p in out.rglob(".tmp.*"))


def ok_records(out: Path) -> int:
    path = out / "manifest.jsonl"
    return sum('"status": "ok"' in line for line in path.read_text().splitlines()) if path.is_file() else 0


@pytest.fixture
def clips(tmp_path):
    videos = tmp_path / "videos"
    for i in range(3):
        write_moving_video(videos / "c" / f"v{i}.avi", n=12, h=72, w=96, seed=i)
    return videos


@pytest.mark.slow
def test_second_run_on_a_store_in_use_refuses_naming_the_holder(clips, tmp_path):
    out = tmp_path / "store"
    first = flowprep("extract", "--videos", clips, "--out", out, *SLOW)
    try:
        wait_for(lambda: in_progress(out), "the first run to start a video")
        second = flowprep("extract", "--videos", clips, "--out", out, *SLOW)
        text, _ = second.communicate(timeout=120)
        assert second.returncode == 2, text
        assert "in use" in text and f"pid {first.pid}" in text and socket.gethostname() in text, text
        assert "flowprep extract" in text  # the holder's command
        text, _ = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, text
    assert sorted((out / "videos.txt").read_text().splitlines()) == ["c/v0 12 0", "c/v1 12 0", "c/v2 12 0"]
    assert verify_store(out).exit_code == 0
    assert not (out / LOCK).exists()  # released at the end


@pytest.mark.slow
def test_killed_run_leaves_a_store_verify_rejects_and_a_rerun_completes(clips, tmp_path):
    out = tmp_path / "store"
    run = flowprep("extract", "--videos", clips, "--out", out, *SLOW, start_new_session=True)
    try:
        wait_for(lambda: ok_records(out) >= 1 and in_progress(out), "one video done and the next started")
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the driver and its workers, as a cluster's scheduler would
        run.wait()
    report = verify_store(out)
    assert report.exit_code == 1
    missing = {vid for vid in report.problems if "not extracted" in report.problems[vid]}
    assert missing and missing <= {"c/v1", "c/v2"}, report.format()
    again = flowprep("extract", "--videos", clips, "--out", out, *SLOW, env={"FLOWPREP_TEST_FRAME_DELAY": "0"})
    text, _ = again.communicate(timeout=180)
    assert again.returncode == 0, text
    assert "3 videos" in text
    assert verify_store(out).exit_code == 0
    assert not [p for p in out.rglob(".tmp.*")]


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(clips, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "2020-01-01T00:00:00Z",
                                        "command": "flowprep extract --videos x", "token": "old"}))
    summary = run_extract(clips, out, OPTS, backend="joblib", workers=2, progress=False)
    assert summary.exit_code == 0 and len(summary.done) == 3
    notes = "\n".join(summary.notes)
    assert "stale lock" in notes and f"pid {dead.pid}" in notes and "no longer running" in notes
    assert not (out / LOCK).exists()


def test_lock_held_on_another_host_is_reported_with_how_to_remove_it(clips, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "node-17.cluster", "pid": 4242, "started": "2020-01-01T00:00:00Z",
                                        "command": "flowprep extract --videos /data/ucf101", "token": "other"}))
    with pytest.raises(ExtractError) as e:
        run_extract(clips, out, OPTS, backend="joblib", workers=1, progress=False)
    msg = str(e.value)
    assert "node-17.cluster" in msg and "pid 4242" in msg and "/data/ucf101" in msg
    assert f"rm {out / LOCK}" in msg
    assert (out / LOCK).exists() and not (out / "c").exists()


def test_lock_of_a_live_process_on_this_host_is_respected(clips, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": alive.pid,
                                            "started": "2020-01-01T00:00:00Z", "command": "flowprep extract",
                                            "token": "live"}))
        with pytest.raises(ExtractError, match=f"in use.*pid {alive.pid}"):
            run_extract(clips, out, OPTS, backend="joblib", workers=1, progress=False)
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
def test_sigterm_stops_the_job_cleanly_and_releases_the_lock(clips, tmp_path):
    """What a cluster scheduler sends before SIGKILL: the job stops its workers, says how to go on, unlocks."""
    out = tmp_path / "store"
    run = flowprep("extract", "--videos", clips, "--out", out, *SLOW, start_new_session=True)
    try:
        wait_for(lambda: in_progress(out), "a video in progress")
        os.killpg(run.pid, signal.SIGTERM)
        text, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, text
    assert re.search(r"stopped; \d+ videos were finished by this run and kept, \d+ in all are whole in", text), text
    assert "run the same command again" in text
    assert not (out / LOCK).exists()
