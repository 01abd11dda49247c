"""The raw flow codec of the HDF5 store: lossless, the same HxWx2L layout as JPEG flow, two HDF5 reads
per stack, checksums of every plane, and verify / resume / repair / lists / show working on it."""
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from twostream.flowprep_cli import main
from flowprep.extract_options import ExtractOptions
from flowprep.extract_job import run_extract
from flowprep.store import Store, open_writer
from flowprep.store_files import write_store_info
from flowprep.verify import verify_store
from videos import textured_frame, write_moving_video

H, W = 24, 32


def flows(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 2), dtype=np.uint8) for _ in range(n)]


def fill(root, vid, fmt, codec, fwd, bwd=()):
    with open_writer(fmt, root, vid, flow_codec=codec) as w:
        for i in range(len(fwd) + 1):
            w.write_rgb(textured_frame(H, W, i))
        for q in fwd:
            w.write_flow(q)
        for q in bwd:
            w.write_flow(q, backward=True)
        w.commit({"size": [W, H], "bound": 20.0})


def test_raw_flow_is_lossless_in_the_layout_jpeg_flow_has(tmp_path):
    fwd, bwd = flows(6), flows(6, seed=1)
    for name, fmt, codec in (("raw", "hdf5", "raw"), ("jpeg", "hdf5", "jpeg")):
        write_store_info(tmp_path / name, {"format": fmt})
        fill(tmp_path / name, "a/v", fmt, codec, fwd, bwd)
    raw, jpeg = Store(tmp_path / "raw"), Store(tmp_path / "jpeg")
    assert raw.check("a/v") is None
    with raw.open("a/v") as r, jpeg.open("a/v") as j:
        assert r.flow_codec == "raw" and r.meta["flow_storage"]["chunks"] == [1, H, W]
        for backward, src in ((False, fwd), (True, bwd)):
            stack = r.flow_stack(2, 3, backward=backward)
            assert stack.shape == (H, W, 6) and stack.dtype == np.uint8
            assert np.array_equal(stack, np.concatenate(src[2:5], axis=-1))  # x1, y1, x2, y2, ... exactly
            assert np.array_equal(r.flow(4, backward=backward), src[4])
            # JPEG flow: same layout, within JPEG's loss
            assert np.abs(stack.astype(int) - j.flow_stack(2, 3, backward=backward)).mean() < 20
        a, b = r.flow_stack(0, 2), r.flow_stack(1, 2)  # a result is the caller's, not a reused buffer
        assert np.array_equal(a, np.concatenate(fwd[0:2], axis=-1)) and not np.shares_memory(a, b)
        crc = r.checksums()
        assert crc["flow_x"] == [zlib.crc32(np.ascontiguousarray(q[..., 0]).tobytes()) for q in fwd]
        assert crc["bflow_y"] == [zlib.crc32(r.frame_bytes("bflow_y", i)) for i in range(6)]
        with pytest.raises(IndexError):
            r.flow_stack(4, 3)


def test_a_raw_stack_is_two_hdf5_reads(tmp_path, monkeypatch):
    write_store_info(tmp_path, {"format": "hdf5"})
    fill(tmp_path, "v", "hdf5", "raw", flows(12))
    calls = []
    real_read, real_get = h5py.Dataset.read_direct, h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda self, *a, **k: calls.append("read") or
                        real_read(self, *a, **k))
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, *a: calls.append("get") or real_get(self, *a))
    with Store(tmp_path).open("v") as v:
        v.flow_stack(0, 10)
        calls.clear()
        v.flow_stack(1, 10)
        assert len(calls) == 2, calls  # one read per component, whichever h5py call makes it
        calls.clear()
        v.flow_planes(1, 10, box=(8, 8, 16, 16))
        assert len(calls) == 2, calls


def test_the_jpeg_store_takes_jpeg_flow_only(tmp_path):
    with pytest.raises(ValueError, match="needs the hdf5 format"):
        open_writer("jpeg", tmp_path, "v", flow_codec="raw")
    with pytest.raises(ValueError, match="flow_codec must be one of"):
        open_writer("hdf5", tmp_path, "v", flow_codec="png")


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(["wave/a", "wave/b"]):
        write_moving_video(videos / f"{vid}.avi", n=6, seed=i)
    out = tmp_path_factory.mktemp("raw") / "store"
    opts = ExtractOptions(size=(64, 48), preset="fast", format="hdf5", flow_codec="raw", direction="both")
    summary = run_extract(videos, out, opts, workers=2, backend="joblib", progress=False)
    assert sorted(summary.done) == ["wave/a", "wave/b"]
    return videos, out, opts


def test_extract_verify_resume_repair_lists_and_show_with_raw_flow(raw_store, tmp_path):
    videos, out, opts = raw_store
    assert (out / "flow.txt").read_text() == "wave/a 5 0\nwave/b 5 0\n"
    report = verify_store(out)
    assert report.problems == {} and report.flows == 2 * 10
    with h5py.File(out / "wave/b.h5", "r+") as f:  # one flow value changed in place: only the checksum sees it
        f["bflow_y"][3, 10, 10] ^= 1
    assert Store(out).check("wave/b") is None
    report = verify_store(out)
    assert list(report.problems) == ["wave/b"] and "bflow 4 (bflow_y[3]): checksum mismatch" in report.problems["wave/b"]
    again = run_extract(videos, out, opts, workers=2, backend="joblib", progress=False)
    assert again.done == ["wave/b"] and again.skipped == ["wave/a"]  # the damaged one, recorded by verify
    with h5py.File(out / "wave/a.h5", "r+") as f:
        f["flow_x"][1, 0, 0] ^= 1
    repaired = run_extract(videos, out, opts, workers=2, backend="joblib", progress=False, repair=True)
    assert repaired.done == ["wave/a"]
    assert verify_store(out).problems == {}
    r = CliRunner().invoke(main, ["show", str(out), "wave/a", "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0
