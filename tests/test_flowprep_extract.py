"""Extraction jobs: identical stores on Ray and joblib, bad videos reported, resume, killed workers, memory.

One Ray cluster serves the whole module (starting one costs seconds); run_extract reuses a running one.
"""
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest

from flowprep.faults import EXIT_ENV as TEST_EXIT_ENV
from flowprep.job import JobError as ExtractError
from flowprep.extract_options import ExtractOptions
from flowprep.extract import extract_video
from flowprep.extract_job import run_extract
from flowprep.store import Store
from flowprep.store_files import read_manifest
from flowprep.verify import verify_store
from videos import assert_same_store, write_bad_videos, write_moving_video

OPTS = ExtractOptions(size=(64, 48), preset="fast")
GOOD = ["jump/v1", "jump/v2", "run/v3"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(GOOD):
        write_moving_video(root / f"{vid}.avi", n=8, h=60, w=80, seed=i, velocity=(1.0 + i * 0.5, 0.5))
    bad = write_bad_videos(root / "broken")
    return root, {f"broken/{Path(name).stem}": why for name, why in bad.items()}


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    tmp = tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)



@pytest.fixture(scope="module")
def stores(videos, ray_cluster, tmp_path_factory):
    """The same job on both backends, in both formats: {(backend, format): (out, summary)}."""
    root, _ = videos
    out = {}
    for fmt in ("jpeg", "hdf5"):
        opts = ExtractOptions(**{**OPTS.__dict__, "format": fmt})
        for backend in ("ray", "joblib"):
            dest = tmp_path_factory.mktemp(f"{backend}-{fmt}")
            out[backend, fmt] = dest, run_extract(root, dest, opts, workers=2, backend=backend, progress=False)
    return out


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_ray_and_joblib_stores_are_byte_identical(stores, fmt):
    (ray_out, ray_sum), (jl_out, jl_sum) = stores["ray", fmt], stores["joblib", fmt]
    assert sorted(ray_sum.done) == sorted(jl_sum.done) == GOOD
    assert_same_store(ray_out, jl_out)
    assert verify_store(ray_out).problems == {}
    store = Store(ray_out)
    for vid in GOOD:
        with store.open(vid) as v:
            assert (v.num_frames, v.num_flows) == (8, 7)
            assert v.rgb(0).shape == (48, 64, 3) and v.flow(0).shape == (48, 64, 2)
            assert v.meta["params"]["nscales"] == 3 and v.meta["source_size"] == [80, 60]


def test_bad_videos_reported_others_finish(stores, videos):
    _, expected = videos
    out, summary = stores["ray", "jpeg"]
    assert summary.exit_code == 1
    assert sorted(summary.failed) == sorted(expected)
    manifest = read_manifest(out)
    for vid, words in expected.items():
        assert manifest[vid]["status"] == "failed"
        assert words in manifest[vid]["error"] and words in summary.failed[vid]
        assert vid in summary.format()
    assert all(manifest[v]["status"] == "ok" for v in GOOD)
    listed = (out / "videos.txt").read_text().split("\n")
    assert listed[:3] == ["jump/v1 8 0", "jump/v2 8 0", "run/v3 8 1"]  # failed videos are not listed
    assert not list(out.rglob(".tmp.*"))


def test_resume_skips_finished_and_redoes_damaged(stores, videos, tmp_path):
    root, _ = videos
    out, _ = stores["joblib", "jpeg"]
    again = run_extract(root, out, OPTS, workers=2, backend="joblib", progress=False)
    assert sorted(again.skipped) == GOOD and again.done == [] and again.pairs == 0
    (out / "run" / "v3" / "flow_x_00004.jpg").unlink()  # damaged: must be redone, not trusted
    (out / "jump" / "v2" / "meta.json").unlink()  # unfinished (as if killed before commit)
    again = run_extract(root, out, OPTS, workers=2, backend="joblib", progress=False)
    assert sorted(again.done) == ["jump/v2", "run/v3"] and sorted(again.skipped) == ["jump/v1"]
    assert_same_store(out, stores["ray", "jpeg"][0])
    forced = run_extract(root, out, OPTS, workers=2, backend="joblib", progress=False, overwrite=True)
    assert sorted(forced.done) == GOOD and forced.skipped == []


def test_other_parameters_refused_without_overwrite(stores, videos):
    root, _ = videos
    out, _ = stores["joblib", "hdf5"]
    with pytest.raises(ExtractError, match="different parameters.*bound"):
        run_extract(root, out, ExtractOptions(**{**OPTS.__dict__, "format": "hdf5", "bound": 10.0}),
                    backend="joblib", progress=False)


def test_killed_ray_worker_is_retried(videos, ray_cluster, stores, tmp_path, monkeypatch):
    root, _ = videos
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(TEST_EXIT_ENV, f"jump/v2:{marker}")
    out = tmp_path / "store"
    summary = run_extract(root, out, OPTS, workers=2, backend="ray", progress=False)
    assert marker.exists()  # the worker really died mid-video
    assert sorted(summary.done) == GOOD
    assert_same_store(out, stores["ray", "jpeg"][0])  # the retry wrote exactly what an undisturbed run writes


def test_memory_stays_flat_on_long_videos(tmp_path):
    """Streaming: peak Python/numpy memory must not grow with the number of frames."""
    opts = ExtractOptions(size=(96, 72), algo="farneback", format="hdf5")
    peaks = {}
    for n in (20, 20, 200):  # the first run pays one-off allocations (imports, codec tables)
        src = write_moving_video(tmp_path / f"v{n}.avi", n=n, h=72, w=96, velocity=(0.2, 0.1))
        tracemalloc.start()
        rec = extract_video(src, tmp_path / "store", f"v{n}", opts)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rec["status"] == "ok" and rec["flows"] == n - 1
    whole_video = 200 * 72 * 96 * 3
    assert peaks[200] < 1.5 * peaks[20] + 256 * 1024, peaks
    assert peaks[200] < whole_video / 4, peaks


def test_flow_only_store(videos, tmp_path):
    root, _ = videos
    out = tmp_path / "flow-only"
    summary = run_extract(root, out, ExtractOptions(**{**OPTS.__dict__, "rgb": False}), list_file=_list(root, tmp_path),
                          workers=1, backend="joblib", progress=False)
    assert summary.done == ["run/v3"]
    assert not list(out.rglob("img_*.jpg"))
    report = verify_store(out)
    assert report.problems == {} and report.flows == 7
    assert (out / "videos.txt").read_text() == "run/v3 8 0\n"


def _list(root, tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("run/v3.avi 3\n")
    return path


@pytest.mark.slow
def test_flow_service_path_matches_per_process_flow(videos, ray_cluster, tmp_path):
    """--device cuda on Ray sends every task's frame pairs to one FlowService actor per GPU; run here
    with the torch TV-L1 on the CPU, it must write exactly what per-process torch flow writes."""
    root, _ = videos
    opts = ExtractOptions(**{**OPTS.__dict__, "device": "torch-cpu"})
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{vid}.avi\n" for vid in GOOD[:2]))
    via_service = run_extract(root, tmp_path / "ray", opts, list_file=lst, workers=2, backend="ray", progress=False)
    per_process = run_extract(root, tmp_path / "jl", opts, list_file=lst, workers=2, backend="joblib", progress=False)
    assert sorted(via_service.done) == sorted(per_process.done) == GOOD[:2]
    assert_same_store(tmp_path / "ray", tmp_path / "jl")
