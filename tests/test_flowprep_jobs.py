"""The job as a whole under faults: killed joblib workers are retried, then failed with the reason; a
store folder that cannot be made and a full disk are sentences, not tracebacks; Ray's logs named in an
error survive the job; --workers on a local machine is capped at its cores; progress lines in logs.

Ray is started by run_extract itself here (no shared cluster), as `flowprep extract` does.
"""
import errno
import os
import shutil
from collections import namedtuple

import pytest

import flowprep.job
from flowprep.job import DISTRIBUTORS
from flowprep.faults import EXIT_ENV as TEST_EXIT_ENV
from flowprep.extract_options import ExtractOptions
from flowprep.job import record
from flowprep.extract_job import run_extract
from flowprep.store_files import read_manifest
from videos import FAST, assert_same_store, write_moving_video
from videos import run_flowprep as cli

OPTS = ExtractOptions(size=(64, 48), preset="fast")
GOOD = ["jump/v1", "jump/v2", "run/v3"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(GOOD):
        write_moving_video(root / f"{vid}.avi", n=8, h=60, w=80, seed=i, velocity=(1.0 + i * 0.5, 0.5))
    return root


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "store"
    assert run_extract(videos, out, OPTS, workers=2, backend="joblib", progress=False).exit_code == 0
    return out


# ---------------------------------------------------------------- 7. killed joblib workers

def test_killed_joblib_worker_is_retried(videos, reference, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(TEST_EXIT_ENV, f"jump/v2:{marker}")
    out = tmp_path / "store"
    summary = run_extract(videos, out, OPTS, workers=2, backend="joblib", progress=False)
    assert marker.exists()  # the worker really died mid-video
    assert sorted(summary.done) == GOOD and summary.exit_code == 0
    assert_same_store(out, reference)


def test_worker_killed_on_every_try_fails_its_video_only(videos, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(TEST_EXIT_ENV, f"jump/v2:{marker}:99")  # dies on every attempt
    out = tmp_path / "store"
    summary = run_extract(videos, out, OPTS, workers=2, backend="joblib", progress=False)
    assert sorted(summary.done) == ["jump/v1", "run/v3"] and summary.exit_code == 1
    reason = summary.failed["jump/v2"]
    assert "worker process died" in reason and "4 attempts" in reason and "exit code 3" in reason, reason
    assert len(marker.read_text().splitlines()) == 4  # first try + 3 retries
    assert "FAILED jump/v2: worker process died" in summary.format()
    assert read_manifest(out)["jump/v2"]["status"] == "failed"


def test_cli_summary_and_exit_1_after_a_worker_dies_for_good(videos, tmp_path):
    r = cli("extract", "--videos", videos, "--out", tmp_path / "o", *FAST,
            env={TEST_EXIT_ENV: f"run/v3:{tmp_path / 'm'}:99"})
    assert r.exit_code == 1, r.output
    assert "2 extracted" in r.output and "1 failed" in r.output and "FAILED run/v3" in r.output


# ---------------------------------------------------------------- 9. sentences, not tracebacks

def test_out_under_a_file_is_a_sentence(videos, tmp_path):
    (tmp_path / "afile").write_text("x")
    r = cli("extract", "--videos", videos, "--out", tmp_path / "afile" / "store", *FAST)
    assert r.exit_code == 2, r.output
    assert "afile" in r.output and "not a folder" in r.output and "Traceback" not in r.output, r.output


def test_full_disk_at_start_is_a_sentence(videos, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1024))
    r = cli("extract", "--videos", videos, "--out", tmp_path / "store", *FAST)
    assert r.exit_code == 2, r.output
    assert "free" in r.output and "full" in r.output and str(tmp_path / "store") in r.output, r.output


def test_write_failing_with_enospc_at_start_is_a_sentence(videos, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "store" / "store.json"))
    monkeypatch.setattr(flowprep.job, "write_store_info", full)
    r = cli("extract", "--videos", videos, "--out", tmp_path / "store", *FAST)
    assert r.exit_code == 2, r.output
    assert "No space left on device" in r.output and "free some space" in r.output, r.output


def test_disk_filling_up_mid_job_stops_the_job(videos, tmp_path, monkeypatch):
    """A video failing with ENOSPC stops the job: every further video would fail the same way."""
    started = []

    def fake_backend(fn, tasks, workers, cluster):
        for vid, (work, args, faults) in tasks:
            started.append(vid)
            yield vid, record(vid, args[0], error="OSError: [Errno 28] No space left on device", errno="ENOSPC")
    monkeypatch.setitem(DISTRIBUTORS, "joblib", fake_backend)
    summary = run_extract(videos, tmp_path / "store", OPTS, workers=1, backend="joblib", progress=False)
    assert started == ["jump/v1"] and summary.exit_code == 1
    text = summary.format()
    assert "stopped" in text and "No space left" in text and "2 not started" in text, text


@pytest.mark.slow
def test_ray_logs_named_in_a_failure_survive_and_workers_are_capped(videos, tmp_path, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    marker = tmp_path / "killed"
    monkeypatch.setenv(TEST_EXIT_ENV, f"jump/v1:{marker}:99")
    out = tmp_path / "store"
    summary = run_extract(videos, out, OPTS, workers=32, backend="ray", progress=False)
    cores = len(os.sched_getaffinity(0))
    assert summary.workers == cores and any("capped" in n and str(cores) in n for n in summary.notes), summary.notes
    assert sorted(summary.done) == ["jump/v2", "run/v3"]
    reason = summary.failed["jump/v1"]
    logs = out / ".logs" / "ray"
    assert str(logs) in reason, reason
    assert logs.is_dir() and list(logs.rglob("*.log")), list(logs.rglob("*"))
    assert f"Ray logs: {logs}" in summary.format()
    assert not list(out.glob(".tmp.*"))


# ---------------------------------------------------------------- 11. --workers on a local machine

def test_workers_capped_at_the_cores_of_a_local_machine(videos, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    r = cli("extract", "--videos", videos, "--out", tmp_path / "o", "--backend", "joblib", "--workers", "32",
            "--size", "64x48", "--preset", "fast")
    assert r.exit_code == 0, r.output
    assert "--workers 32 capped at 2" in r.output and "--address" in r.output, r.output
    assert "(2 workers)" in r.output


# ---------------------------------------------------------------- 12. progress in log files

def test_progress_lines_when_stderr_is_not_a_terminal(videos, tmp_path):
    r = cli("extract", "--videos", videos, "--out", tmp_path / "o", *FAST, env={"TWOSTREAM_PROGRESS_SECONDS": "0"})
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("extracting: ")]
    assert any(ln.startswith("extracting: 3/3 videos (100%)") for ln in lines), r.output
    assert "ETA" in lines[0] and "pairs/s" in lines[0] and "videos/s" in lines[0]
    quiet = cli("-q", "extract", "--videos", videos, "--out", tmp_path / "o2", *FAST,
                env={"TWOSTREAM_PROGRESS_SECONDS": "0"})
    assert quiet.exit_code == 0 and "extracting: " not in quiet.output, quiet.output
    assert "3 extracted" in quiet.output  # the summary is the command's result: always shown
    assert cli("-v", "extract", "--videos", videos, "--out", tmp_path / "o2", *FAST).exit_code == 0
