"""Backward flow (`--direction both`): the sign of a known motion, a finished forward store gaining
backward flows without its forward frames changing, verify and resume knowing about them."""
import filecmp
import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from twostream.flowprep_cli import main
from flowprep.faults import EXIT_ENV as TEST_EXIT_ENV
from flowprep.job import JobError as ExtractError
from flowprep.extract_options import ExtractOptions
from flowprep.extract import extract_video
from flowprep.extract_job import run_extract
from flowprep.quant import dequantize
from core.layout import MANIFEST, STORE_INFO
from flowprep.store import Store
from flowprep.store_files import write_store_info
from flowprep.verify import verify_store
from videos import write_moving_video

OPTS = ExtractOptions(size=(64, 48), preset="fast")
VIDEOS = ["jump/a", "jump/b", "run/c"]
KINDS = {"jpeg": ("jpeg", "jpeg"), "hdf5": ("hdf5", "jpeg"), "hdf5-raw": ("hdf5", "raw")}


def opts(kind: str, **kw) -> ExtractOptions:
    fmt, codec = KINDS[kind]
    return OPTS.replace(format=fmt, flow_codec=codec, **kw)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(VIDEOS):
        # The window slides by -velocity, so the texture moves by +1.5 px in x per frame.
        write_moving_video(root / f"{vid}.avi", n=7, h=48, w=64, seed=i, velocity=(-1.5, 0.0))
    return root


def extract(videos, out, o, **kw):
    return run_extract(videos, out, o, workers=2, backend="joblib", progress=False, **kw)


def frame_files(out: Path) -> dict[str, tuple]:
    """Every stored frame of a JPEG store: bytes, mtime (ns) and inode."""
    return {p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in out.rglob("*.jpg")}


def forward_datasets(out: Path) -> dict[str, bytes]:
    """Every forward dataset of an HDF5 store, as bytes."""
    import h5py

    got = {}
    for path in out.rglob("*.h5"):
        with h5py.File(path, "r") as f:
            for name in ("rgb", "flow_x", "flow_y", "crc32_rgb", "crc32_flow_x", "crc32_flow_y"):
                data = f[name][()]
                got[f"{path.name}/{name}"] = (b"".join(x.tobytes() for x in data) if data.dtype == object
                                              else data.tobytes())
    return got


def age(out: Path) -> None:
    """Date every file back a day, so a rewrite would show in its mtime."""
    for p in out.rglob("*"):
        if p.is_file():
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns - 86400 * 10**9, st.st_mtime_ns - 86400 * 10**9))


@pytest.mark.parametrize("kind", list(KINDS))
def test_backward_flow_of_a_known_motion_has_the_opposite_sign(videos, tmp_path, kind):
    o = opts(kind, direction="both")
    write_store_info(tmp_path, o.store_info())
    rec = extract_video(videos / "jump/a.avi", tmp_path, "jump/a", o)
    assert rec["status"] == "ok" and (rec["flows"], rec["bflows"]) == (6, 6)
    store = Store(tmp_path)
    assert store.check("jump/a") is None
    with store.open("jump/a") as v:
        assert (v.num_frames, v.num_flows, v.num_bflows) == (7, 6, 6) and v.meta["direction"] == "both"
        fwd = dequantize(v.flow_stack(0, 6), 20.0)[8:-8, 8:-8]
        bwd = dequantize(v.flow_stack(0, 6, backward=True), 20.0)[8:-8, 8:-8]
        assert abs(fwd[..., 0::2].mean() - 1.5) < 0.15 and abs(bwd[..., 0::2].mean() + 1.5) < 0.15
        assert abs(fwd[..., 1::2].mean()) < 0.15 and abs(bwd[..., 1::2].mean()) < 0.15
        crc = v.checksums()
        assert [zlib.crc32(v.frame_bytes("bflow_y", i)) for i in range(6)] == crc["bflow_y"]
    if kind == "jpeg":
        names = sorted(p.name for p in (tmp_path / "jump/a").glob("bflow_*"))
        assert names[0] == "bflow_x_00001.jpg" and names[-1] == "bflow_y_00006.jpg" and len(names) == 12


@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_store_gains_backward_flows_and_keeps_its_forward_frames(videos, tmp_path, kind):
    out = tmp_path / "store"
    first = extract(videos, out, opts(kind))
    assert sorted(first.done) == VIDEOS
    assert json.loads((out / STORE_INFO).read_text())["direction"] == "forward"
    age(out)
    before = frame_files(out) if kind == "jpeg" else forward_datasets(out)

    up = extract(videos, out, opts(kind, direction="both"))
    assert sorted(up.upgraded) == VIDEOS and up.done == [] and up.failed == {}
    assert "3 gained backward flows" in up.format()
    after = frame_files(out) if kind == "jpeg" else forward_datasets(out)
    if kind == "jpeg":  # same bytes, same mtimes, same files (not rewritten, not replaced)
        assert {k: after[k] for k in before} == before
        assert len(after) == 2 * len(before) - 3 * 7  # plus 6 bflow_x and 6 bflow_y per video
    else:
        assert after == before
    assert json.loads((out / STORE_INFO).read_text())["direction"] == "both"
    report = verify_store(out)
    assert report.problems == {} and report.flows == 3 * 12
    with Store(out).open("run/c") as v:
        assert v.num_bflows == 6 and v.meta["direction"] == "both"

    # What an upgrade leaves is what extracting both at once writes (JPEG: to the byte).
    direct = tmp_path / "direct"
    extract(videos, direct, opts(kind, direction="both"))
    if kind == "jpeg":
        a = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
        b = {p.relative_to(direct).as_posix(): p for p in direct.rglob("*") if p.is_file() and p.name != MANIFEST}
        assert sorted(a) == sorted(b) and [k for k in a if not filecmp.cmp(a[k], b[k], shallow=False)] == []
    for vid in VIDEOS:
        with Store(out).open(vid) as u, Store(direct).open(vid) as d:
            assert np.array_equal(u.flow_stack(0, 6, backward=True), d.flow_stack(0, 6, backward=True))
            assert u.checksums() == d.checksums()
    again = extract(videos, out, opts(kind, direction="both"))
    assert sorted(again.skipped) == VIDEOS and again.upgraded == []


@pytest.mark.parametrize("kind", ["jpeg", "hdf5"])
def test_verify_flags_a_both_store_video_without_backward_flows(videos, tmp_path, kind):
    out = tmp_path / "store"
    lst = tmp_path / "list.txt"
    lst.write_text("jump/a.avi\njump/b.avi\n")
    extract(videos, out, opts(kind), list_file=lst)
    info = json.loads((out / STORE_INFO).read_text())
    write_store_info(out, {**info, "direction": "both"})  # as a store whose upgrade never ran
    report = verify_store(out)
    assert sorted(report.problems) == ["jump/a", "jump/b"]
    assert "no backward flows" in report.problems["jump/a"] and "--direction both" in report.problems["jump/a"]
    assert "no backward flows" in Store(out, findings=False).check("jump/b")
    write_store_info(out, info)
    extract(videos, out, opts(kind, direction="both"), list_file=lst)
    assert verify_store(out).problems == {}
    if kind == "jpeg":  # one backward file lost: the count check finds it
        (out / "jump/b/bflow_x_00003.jpg").unlink()
        assert "bflow_x" in verify_store(out).problems["jump/b"]


@pytest.mark.parametrize("kind", ["jpeg", "hdf5"])
def test_a_kill_mid_upgrade_leaves_the_forward_video_whole_and_a_rerun_completes_it(videos, tmp_path, monkeypatch,
                                                                                  kind):
    out = tmp_path / "store"
    extract(videos, out, opts(kind))
    before = frame_files(out) if kind == "jpeg" else forward_datasets(out)
    marker = tmp_path / "killed"
    monkeypatch.setenv(TEST_EXIT_ENV, f"jump/b:{marker}:99")  # the worker dies mid-video, on every attempt
    killed = extract(videos, out, opts(kind, direction="both"))
    assert sorted(killed.upgraded) == ["jump/a", "run/c"] and list(killed.failed) == ["jump/b"]
    assert marker.read_text().count("\n") == 4  # it died in the middle, 4 times
    store = Store(out)
    assert store.check("jump/b", backward=False) is None and store.needs_backward("jump/b")
    assert "no backward flows" in store.check("jump/b")
    assert "jump/b" in verify_store(out).problems
    if kind == "jpeg":  # as if killed between moving the files into place and rewriting meta.json
        shutil.copy(out / "jump/a/bflow_x_00001.jpg", out / "jump/b/bflow_x_00001.jpg")
        assert store.needs_backward("jump/b") and store.check("jump/b") is not None
    monkeypatch.delenv(TEST_EXIT_ENV)
    resumed = extract(videos, out, opts(kind, direction="both"))
    assert resumed.upgraded == ["jump/b"] and resumed.done == [] and resumed.failed == {}, resumed.format()
    after = frame_files(out) if kind == "jpeg" else forward_datasets(out)
    assert {k: after[k] for k in before} == before
    assert verify_store(out).problems == {}
    assert not list(out.rglob(".tmp.*"))


def test_direction_both_store_refuses_forward_and_old_stores_resume(videos, tmp_path):
    out = tmp_path / "store"
    lst = tmp_path / "list.txt"
    lst.write_text("run/c.avi\n")
    extract(videos, out, opts("jpeg", direction="both"), list_file=lst)
    with pytest.raises(ExtractError, match="holds backward flows too.*--direction both"):
        extract(videos, out, opts("jpeg"), list_file=lst)
    with pytest.raises(ExtractError, match="different parameters.*flow_codec"):
        extract(videos, out, opts("jpeg", direction="both").replace(format="hdf5", flow_codec="raw"), list_file=lst)
    # A store made before direction / flow_codec were recorded resumes as forward / jpeg.
    old = tmp_path / "old"
    extract(videos, old, opts("jpeg"), list_file=lst)
    info = json.loads((old / STORE_INFO).read_text())
    write_store_info(old, {k: v for k, v in info.items() if k not in ("direction", "flow_codec")})
    assert extract(videos, old, opts("jpeg"), list_file=lst).skipped == ["run/c"]


def test_cli_direction_and_codec_options(videos, tmp_path):
    r = CliRunner().invoke(main, ["extract", "--help"])
    text = " ".join(r.output.split())
    assert "--direction [forward|both]" in text and "--flow-codec [jpeg|raw]" in text
    r = CliRunner().invoke(main, ["extract", "--videos", str(videos), "--out", str(tmp_path / "o"), "--flow-codec",
                                  "raw"])
    assert r.exit_code == 2 and "needs extract.format (--format) = \"hdf5\"" in r.output
