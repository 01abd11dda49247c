"""flowprep extract on a real two-node Ray cluster on this host that loses its worker node (the
head has no CPUs, so every video runs on the worker node): with a new node joining, the job
finishes as a joblib run would; with none, it stops after --node-timeout, saying why, keeping what
finished, and a re-run on a healthy cluster completes the store."""
from __future__ import annotations

import threading
import time

import pytest

from flowprep.extract_job import run_extract
from flowprep.extract_options import ExtractOptions
from flowprep.faults import DELAY_ENV
from flowprep.store import Store
from flowprep.store_files import read_manifest
from ray_cluster import RayNodes
from videos import assert_same_store, write_moving_video

pytestmark = pytest.mark.slow
OPTS = ExtractOptions(size=(64, 48), preset="fast")
VIDEOS = [f"c/v{i}" for i in range(8)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i in range(len(VIDEOS)):
        write_moving_video(root / "c" / f"v{i}.avi", n=8, seed=i)
    reference = tmp_path_factory.mktemp("joblib") / "store"
    run_extract(root, reference, OPTS, backend="joblib", workers=2, progress=False)
    return root, reference


@pytest.fixture
def nodes():
    cluster = RayNodes()
    try:
        cluster.head()
        cluster.worker("w1")
        yield cluster
    finally:
        cluster.stop()


def finished(out) -> int:
    return sum(r.get("status") == "ok" for r in read_manifest(out).values()) if out.is_dir() else 0


def start(videos, out, address, node_timeout) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def job():
        try:
            got["summary"] = run_extract(videos, out, OPTS, backend="ray", workers=2, address=address,
                                         node_timeout=node_timeout, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            got["error"] = e
    thread = threading.Thread(target=job)
    thread.start()
    return thread, got


def kill_mid_job(nodes, out, thread) -> float:
    """Lose the worker node once two videos are done (the others are running or waiting)."""
    deadline = time.monotonic() + 120
    while finished(out) < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert thread.is_alive(), "the job ended before the node could be lost"
    nodes.kill("w1")
    return time.monotonic()


def test_node_lost_mid_job_and_a_new_one_joins(videos, nodes, tmp_path, monkeypatch):
    root, reference = videos
    monkeypatch.setenv(DELAY_ENV, "0.25")  # ~2 s a video, so the kill lands mid-job
    out = tmp_path / "store"
    thread, got = start(root, out, nodes.address, node_timeout=120)
    kill_mid_job(nodes, out, thread)
    nodes.worker("w2")
    thread.join(300)
    assert "error" not in got, got
    s = got["summary"]
    assert s.exit_code == 0 and sorted(s.done) == VIDEOS and not s.failed, s.format()
    assert s.retried >= 1 and len(s.lost_nodes) == 1, s.format()
    assert "ran again after their worker or node died" in s.format() and "lost" in s.format()
    job = [line for line in (out / "manifest.jsonl").read_text().splitlines() if '"job"' in line][-1]
    assert '"retried_tasks": ' in job and '"lost_nodes": [{' in job
    assert_same_store(out, reference)


def test_node_lost_for_good_stops_the_job_and_a_rerun_completes_it(videos, nodes, tmp_path, monkeypatch):
    root, reference = videos
    monkeypatch.setenv(DELAY_ENV, "0.25")
    out = tmp_path / "store"
    timeout = 10
    thread, got = start(root, out, nodes.address, node_timeout=timeout)
    killed = kill_mid_job(nodes, out, thread)
    thread.join(300)
    waited = time.monotonic() - killed
    assert "error" not in got, got
    s = got["summary"]
    # Ray marks the node dead in ~3-4 s here, the driver looks every 2 s, then waits `timeout`.
    assert timeout <= waited <= timeout + 20, waited
    assert s.exit_code == 2 and s.stopped and "no Ray node could run the remaining videos" in s.stopped, s.format()
    assert "no alive node has CPUs" in s.stopped and "--node-timeout" in s.stopped and "1 node lost" in s.stopped
    kept = [v for v in VIDEOS if Store(out).check(v) is None]
    assert len(kept) >= 2 and set(s.done) <= set(kept), (kept, s.done)

    monkeypatch.delenv(DELAY_ENV)
    nodes.worker("w2")
    again = run_extract(root, out, OPTS, backend="ray", workers=2, address=nodes.address, node_timeout=60,
                        progress=False)
    assert again.exit_code == 0 and sorted(again.skipped + again.done) == VIDEOS, again.format()
    assert set(again.skipped) >= set(kept)
    assert_same_store(out, reference)
