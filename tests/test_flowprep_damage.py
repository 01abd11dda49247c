"""Damage to a store is found and repaired: bytes changed in place (a frame that still decodes, wrongly),
a truncated frame, a half-finished store. `flowprep verify` names the video and the frame; a re-run
after verify, or `flowprep extract --repair`, redoes exactly those videos, byte-identical to a clean run."""
import json
import shutil
from pathlib import Path

import pytest

from core.layout import MANIFEST
from flowprep.store import Store
from videos import FAST, assert_same_store, write_moving_video
from videos import run_flowprep as run

VIDEOS = ["wave/a", "wave/b", "run/c"]



@pytest.fixture(scope="module", params=["jpeg", "hdf5"])
def clean(request, tmp_path_factory):
    videos = tmp_path_factory.mktemp("videos")
    for i, vid in enumerate(VIDEOS):
        write_moving_video(videos / f"{vid}.avi", n=6, seed=i)
    out = tmp_path_factory.mktemp(f"clean-{request.param}") / "store"
    r = run("extract", "--videos", videos, "--out", out, "--format", request.param, *FAST)
    assert r.exit_code == 0, r.output
    return videos, out, request.param


def damaged_copy(clean, tmp_path) -> tuple[Path, Path, str]:
    videos, out, fmt = clean
    copy = tmp_path / "store"
    shutil.copytree(out, copy)
    return videos, copy, fmt


def zero_inside_frame(store: Path, fmt: str, vid: str, kind: str, index: int) -> None:
    """Overwrite 100 bytes inside one stored JPEG, in place: same size, and it still decodes (to a wrong
    picture). Small flow JPEGs do not survive every spot, so the first spot from the middle out that does."""
    import cv2
    import numpy as np

    with Store(store).open(vid) as v:
        data = v.rgb_bytes(index) if kind == "img" else v.flow_bytes(index)[0]
    path = store / vid if fmt == "jpeg" else store / f"{vid}.h5"
    if fmt == "jpeg":
        path = path / f"{kind}_{index + 1:05d}.jpg"
    blob = bytearray(path.read_bytes())
    start = blob.find(data)
    assert start >= 0 and blob.find(data, start + 1) < 0
    for frac in (0.5, 0.6, 0.7, 0.4, 0.8):
        damaged = bytearray(data)
        at = int(len(data) * frac)
        damaged[at:at + 100] = bytes(100)
        if cv2.imdecode(np.frombuffer(bytes(damaged), np.uint8), cv2.IMREAD_UNCHANGED) is not None:
            break
    else:
        raise AssertionError("no spot in this frame survives 100 zero bytes")
    blob[start:start + len(data)] = damaged
    path.write_bytes(bytes(blob))
    with Store(store).open(vid) as v:  # the damage is silent to a decoder
        (v.rgb(index) if kind == "img" else v.flow(index))


def test_damage_in_place_found_by_verify_and_redone_by_a_rerun(clean, tmp_path):
    videos, store, fmt = damaged_copy(clean, tmp_path)
    zero_inside_frame(store, fmt, "wave/b", "img", 2)
    r = run("verify", store)
    assert r.exit_code == 1, r.output
    assert "PROBLEM wave/b: img 3" in r.output and "checksum" in r.output, r.output
    assert "wave/a" not in r.output and "run/c" not in r.output
    assert "flowprep verify" in Store(store).check("wave/b")  # nor does the trainer take it (its check_videos)
    r = run("extract", "--videos", videos, "--out", store, "--format", fmt, *FAST)  # plain re-run
    assert r.exit_code == 0 and "1 extracted, 2 already done" in r.output, r.output
    assert_same_store(store, clean[1])
    assert run("verify", store).exit_code == 0


def test_damaged_flow_repaired_by_extract_repair_without_verify_first(clean, tmp_path):
    videos, store, fmt = damaged_copy(clean, tmp_path)
    zero_inside_frame(store, fmt, "run/c", "flow_x", 1)
    r = run("extract", "--videos", videos, "--out", store, "--format", fmt, *FAST)  # cheap check: unseen
    assert r.exit_code == 0 and "0 extracted" in r.output
    r = run("extract", "--videos", videos, "--out", store, "--format", fmt, *FAST, "--repair")
    assert r.exit_code == 0 and "1 extracted, 2 already done" in r.output, r.output
    assert "run/c" in r.output and "flow 2" in r.output  # says what it found
    assert_same_store(store, clean[1])
    assert run("verify", store).exit_code == 0


def test_truncated_frame_flagged_by_verify_is_redone_by_a_rerun(clean, tmp_path):
    videos, store, fmt = damaged_copy(clean, tmp_path)
    if fmt == "jpeg":
        frame = store / "wave" / "a" / "flow_y_00002.jpg"
        frame.write_bytes(frame.read_bytes()[:200])  # what verify always flagged, and a re-run skipped
        expect = "PROBLEM wave/a: flow 2"
    else:
        h5 = store / "wave" / "a.h5"
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size * 9 // 10])
        expect = "PROBLEM wave/a"
    r = run("verify", store)
    assert r.exit_code == 1 and expect in r.output, r.output
    r = run("extract", "--videos", videos, "--out", store, "--format", fmt, *FAST)
    assert "1 extracted, 2 already done" in r.output, r.output
    assert_same_store(store, clean[1])


def test_half_finished_store_does_not_pass_verify(clean, tmp_path):
    """As if a run died before it reached run/c: no copy, no manifest record, not in videos.txt."""
    videos, store, fmt = damaged_copy(clean, tmp_path)
    shutil.rmtree(store / "run" / "c") if fmt == "jpeg" else (store / "run" / "c.h5").unlink()
    manifest = store / MANIFEST
    manifest.write_text("".join(line + "\n" for line in manifest.read_text().splitlines()
                                if json.loads(line)["id"] != "run/c"))
    (store / "videos.txt").write_text("".join(line + "\n" for line in (store / "videos.txt").read_text().splitlines()
                                              if not line.startswith("run/c ")))
    r = run("verify", store)
    assert r.exit_code == 1 and "run/c" in r.output and "not extracted" in r.output, r.output
    r = run("extract", "--videos", videos, "--out", store, "--format", fmt, *FAST)
    assert "1 extracted" in r.output
    assert_same_store(store, clean[1])


def test_checksums_recorded_per_frame(clean):
    import zlib

    _, out, _ = clean
    with Store(out).open("wave/a") as v:
        crc = v.checksums()
        assert len(crc["img"]) == v.num_frames and len(crc["flow_x"]) == len(crc["flow_y"]) == v.num_flows
        assert crc["img"][3] == zlib.crc32(v.rgb_bytes(3)) and crc["flow_y"][1] == zlib.crc32(v.flow_bytes(1)[1])
