"""The two CPU engines of TV-L1 in a whole extraction: the fused engine (the default) and OpenCV's
own give the same store byte for byte, so a store started with one resumes with the other; the
engine is recorded in store.json and, per video, in the manifest (where a fallback says why)."""
from __future__ import annotations

import json

import pytest

from flowprep import tvl1_fused
from flowprep.extract import extract_video
from flowprep.extract_job import run_extract
from flowprep.extract_options import ExtractOptions
from flowprep.faults import EXIT_ENV
from flowprep.store_files import read_manifest, write_store_info
from videos import assert_same_store, write_moving_video

pytestmark = pytest.mark.skipif(tvl1_fused._machine_problem() is not None,
                                reason=f"fused TV-L1 not bit-identical here: {tvl1_fused._machine_problem()}")
JOB = dict(backend="joblib", workers=2, progress=False)
VIDEOS = ["run/v0", "run/v1", "walk/v2", "walk/v3"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(VIDEOS):
        write_moving_video(root / f"{vid}.avi", n=6, h=40, w=56, seed=i, velocity=(1.0 + 0.3 * i, -0.5))
    return root


def same_store_but_the_engine(a, b) -> None:
    assert_same_store(a, b, store_json_but=("engine",))


@pytest.mark.parametrize("fmt,preset", [("jpeg", "accurate"), ("hdf5", "fast")])
def test_each_engine_writes_the_same_store(videos, tmp_path, fmt, preset):
    opts = ExtractOptions(size=(56, 40), preset=preset, format=fmt)
    stores = {}
    for engine in ("fused", "opencv"):
        stores[engine] = tmp_path / engine
        s = run_extract(videos, stores[engine], opts.replace(engine=engine), **JOB)
        assert s.exit_code == 0 and sorted(s.done) == VIDEOS
        assert json.loads((stores[engine] / "store.json").read_text())["engine"] == engine
        assert {r["engine"] for r in read_manifest(stores[engine]).values()} == {engine}
    same_store_but_the_engine(stores["fused"], stores["opencv"])


def test_a_store_started_with_one_engine_resumes_with_the_other(videos, tmp_path, monkeypatch):
    opts = ExtractOptions(size=(56, 40), preset="fast")
    clean = tmp_path / "clean"
    run_extract(videos, clean, opts, **JOB)
    out = tmp_path / "out"
    monkeypatch.setenv(EXIT_ENV, f"walk/v3:{tmp_path / 'marker'}:99")  # its worker dies every time: not done
    first = run_extract(videos, out, opts.replace(engine="opencv"), **JOB)
    assert sorted(first.done) == VIDEOS[:3] and list(first.failed) == ["walk/v3"]
    monkeypatch.delenv(EXIT_ENV)
    second = run_extract(videos, out, opts, **JOB)  # the fused engine, the default
    assert second.exit_code == 0 and second.done == ["walk/v3"] and sorted(second.skipped) == VIDEOS[:3]
    assert read_manifest(out)["walk/v3"]["engine"] == "fused" and read_manifest(out)["run/v0"]["engine"] == "opencv"
    same_store_but_the_engine(out, clean)
    assert json.loads((out / "store.json").read_text())["engine"] == "fused"


def test_where_the_fused_engine_cannot_match_opencv_computes_and_the_manifest_says_so(videos, tmp_path,
                                                                                       monkeypatch):
    """Frames the fused engine refuses (as on a machine whose OpenCV it cannot match): OpenCV
    computes them, the video is the same, and its record names the reason."""
    why = "a test's reason: the fused engine is not bit-identical here"
    monkeypatch.setattr(tvl1_fused, "unsupported", lambda params, shape: why)
    recs = {}
    for engine in ("fused", "opencv"):
        opts = ExtractOptions(size=(56, 40), preset="fast", engine=engine)
        flow = opts.flow_spec()
        write_store_info(tmp_path / engine, opts.store_info(flow))
        recs[engine] = extract_video(videos / "run/v0.avi", tmp_path / engine, "run/v0", opts, flow)
    assert recs["fused"]["engine"] == f"opencv (fused engine not bit-identical here: {why})"
    assert recs["opencv"]["engine"] == "opencv"
    a, b = (sorted((tmp_path / e / "run" / "v0").iterdir()) for e in ("fused", "opencv"))
    assert [p.name for p in a] == [p.name for p in b] and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_idle_cores_go_to_the_fused_engine_from_four_on():
    """A job's last videos (and predict's one at a time) get the idle cores as row threads: the
    fused engine only (OpenCV's DualTVL1 is single-threaded here), and only with 4 or more to give."""
    from flowprep.extract_job import with_idle_cores
    from flowprep.flow import flow_spec

    fused, opencv = flow_spec("tvl1", "fast", engine="fused"), flow_spec("tvl1", "fast", engine="opencv")
    assert with_idle_cores(fused, 4).threads == 4 and with_idle_cores(fused, 15).threads == 15
    assert with_idle_cores(fused, 3) is fused and with_idle_cores(opencv, 16) is opencv
