"""`flowprep adopt`: frame folders written by other tools (denseflow / MMAction2 rawframes, 0- or 1-based,
x_ or flow_x_; the u/ v/ layout of two-stream repos) become a store the trainer trains on, nothing
recomputed; real counts kept, odd videos reported, hard links unless asked otherwise, resumable."""
import errno
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from flowprep.job import JobError
from flowprep.adopt_scan import jpeg_size
from flowprep.adopt import run_adopt
from twostream.flowprep_cli import main as cli
from flowprep.extract_options import ExtractOptions
from flowprep.extract_job import run_extract
from flowprep.store import Store
from flowprep.store_files import read_manifest, write_findings
from flowprep.verify import verify_store
from trainer_toy import toy_config, toy_video
from videos import write_moving_video


def jpg(img) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def write_rawframes(src: Path, splits: Path | None = None, per_class: tuple[int, int] = (6, 2), frames: int = 7,
                    prefixes=("img_", "x_", "y_"), start: int = 0, cut_last_flow: tuple[str, ...] = ()) -> dict:
    """Toy videos (a square moving up or down) as <class>/<video>/ frame folders, named like denseflow /
    MMAction2 by default; `cut_last_flow`: videos written with n frames and n-2 flows (tsn-pytorch).
    Returns {video id: (frames, flows)} as written, and the `list` split under `splits`."""
    rng = np.random.default_rng(0)
    written, lines = {}, {"train": [], "test": []}
    for part, n in zip(("train", "test"), per_class):
        for label, cls in enumerate(("down", "up")):
            for i in range(n):
                vid = f"{cls}/v_{cls}_{part}{i}"
                imgs, flows = toy_video(rng, label == 1, frames)
                if vid in cut_last_flow:
                    flows = flows[:-1]
                folder = src / vid
                folder.mkdir(parents=True)
                for k, im in enumerate(imgs):
                    (folder / f"{prefixes[0]}{k + start:05d}.jpg").write_bytes(jpg(im))
                for k, q in enumerate(flows):
                    (folder / f"{prefixes[1]}{k + start:05d}.jpg").write_bytes(jpg(q[..., 0]))
                    (folder / f"{prefixes[2]}{k + start:05d}.jpg").write_bytes(jpg(q[..., 1]))
                written[vid] = (len(imgs), len(flows))
                lines[part].append(f"{vid}.avi {label}\n")
    if splits is not None:
        splits.mkdir(parents=True, exist_ok=True)
        for part, ls in lines.items():
            (splits / f"{part}.txt").write_text("".join(ls))
    return written


CUT = "up/v_up_train1"


def test_denseflow_rawframes_adopted_by_hard_links_and_the_trainer_trains_on_them(tmp_path):
    from trainer.train import main as train

    src, splits, out = tmp_path / "rawframes", tmp_path / "splits", tmp_path / "store"
    written = write_rawframes(src, splits, cut_last_flow=(CUT,))
    before = {p: p.read_bytes() for p in src.rglob("*.jpg")}
    summary = run_adopt(src, out, progress=False)
    assert summary.exit_code == 0 and summary.odd == {} and len(summary.adopted) == len(written) == 16
    assert list(summary.partial) == [CUT] and "7 frames but 5 flows" in summary.partial[CUT]
    assert {p: p.read_bytes() for p in src.rglob("*.jpg")} == before  # the source is as it was
    store = Store(out)
    for vid, (frames, flows) in written.items():
        assert store.check(vid) is None
        with store.open(vid) as v:
            assert (v.num_frames, v.num_flows) == (flows + 1, flows)  # the cut video keeps 6 of its 7 frames
            assert v.meta["naming"] == {"img": "img_{:05d}.jpg from 0", "flow_x": "x_{:05d}.jpg from 0",
                                        "flow_y": "y_{:05d}.jpg from 0"}
            assert v.meta["adopted_from"] == str(src) and v.meta["bound"] == 20.0 and v.meta["size"] == [48, 40]
    with store.open(CUT) as v:
        assert v.meta["left_out"] == {"img": ["img_00006.jpg"]} and v.meta["partial"] is True
    assert os.path.samefile(out / CUT / "flow_x_00001.jpg", src / CUT / "x_00000.jpg")  # a link, not a copy
    assert not (out / CUT / "img_00007.jpg").exists()
    assert verify_store(out).problems == {}
    rec = read_manifest(out)[CUT]
    assert (rec["status"], rec["frames"], rec["flows"], rec["layout"]) == ("partial", 6, 5, "rawframes")
    assert f"{CUT} 6 1" in (out / "videos.txt").read_text()
    assert f"{CUT} 5 1" in (out / "flow.txt").read_text()
    info = json.loads((out / "store.json").read_text())
    assert info["adopted_from"] == str(src) and info["layout"] == "rawframes" and info["mmaction2"]

    again = run_adopt(src, out, progress=False)
    assert sorted(again.skipped) == sorted(written) and again.adopted == []

    summary = train(toy_config(tmp_path, out, splits, epochs=1), "temporal")
    assert [r["epoch"] for r in summary["log"]] == [1]


def test_a_video_verify_found_damaged_is_adopted_again_and_its_finding_cleared(tmp_path):
    """verify.json sends a damaged video back to be redone; once adopt has redone it, the finding
    goes, so the trainer takes the video and the next adopt skips it."""
    src, out = tmp_path / "rawframes", tmp_path / "store"
    written = write_rawframes(src, per_class=(2, 1))
    run_adopt(src, out, progress=False)
    write_findings(out, {CUT: "flow_x_00002.jpg: CRC mismatch"})
    assert Store(out).check(CUT) is not None
    again = run_adopt(src, out, progress=False)
    assert again.adopted == [CUT] and sorted(again.skipped) == sorted(set(written) - {CUT})
    assert not (out / "verify.json").exists() and Store(out).check(CUT) is None
    assert run_adopt(src, out, progress=False).adopted == []


def test_store_names_are_adopted_in_place_writing_only_the_store_files(tmp_path):
    src = tmp_path / "frames"
    written = write_rawframes(src, per_class=(2, 0), prefixes=("img_", "flow_x_", "flow_y_"), start=1,
                              cut_last_flow=("down/v_down_train0",))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.rglob("*") if p.is_file()}
    r = CliRunner().invoke(cli, ["adopt", str(src)])
    assert r.exit_code == 0, r.output
    assert "4 videos: 4 adopted, 0 odd, 0 already adopted (skipped)" in r.output and "in place" in r.output
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before} == before
    new = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p not in before and p.is_file())
    assert new == sorted(["store.json", "manifest.jsonl", "expected.json", "videos.txt", "rgb.txt",
                          "flow.txt"] + [f"{vid}/meta.json" for vid in written])
    store = Store(src)
    with store.open("down/v_down_train0") as v:  # 7 img files in the folder, 6 of them stored
        assert (v.num_frames, v.num_flows) == (6, 5) and v.meta["extra_files"] == {"img": 1}
    assert all(store.check(vid) is None for vid in written)
    assert verify_store(src).problems == {}
    (src / "up/v_up_train1/flow_y_00003.jpg").unlink()
    assert "flow_y" in Store(src).check("up/v_up_train1")


def write_uv(root: Path, names=("v_Up_g01_c01", "v_Up_g02_c01", "v_Down_g01_c01", "v_Down_g02_c01")) -> dict:
    """The well-known download layout: tvl1_flow/{u,v}/<video>/frame000001.jpg beside jpegs_256/<video>/
    (flat names, no class folders); the last video has no RGB frames (never extracted: odd)."""
    rng = np.random.default_rng(1)
    truth = {}
    for name in names:
        imgs, flows = toy_video(rng, "Up" in name, 6)
        for k, im in enumerate(imgs):
            if name != names[-1]:
                (root / "jpegs_256" / name).mkdir(parents=True, exist_ok=True)
                (root / "jpegs_256" / name / f"frame{k + 1:06d}.jpg").write_bytes(jpg(im))
        for k, q in enumerate(flows):
            for c, sub in enumerate("uv"):
                (root / "tvl1_flow" / sub / name).mkdir(parents=True, exist_ok=True)
                (root / "tvl1_flow" / sub / name / f"frame{k + 1:06d}.jpg").write_bytes(jpg(q[..., c]))
        truth[name] = flows
    return truth


def test_uv_download_root_found_one_level_down_with_classes_inferred_or_given(tmp_path):
    """Pointed at the folder holding tvl1_flow/ and jpegs_256/, adopt finds both; flat UCF-101 names
    give their class; --class-regex gives another; names with no class stop the job, saying what to give."""
    root = tmp_path / "ucf"
    write_uv(root)
    r = CliRunner().invoke(cli, ["adopt", str(root), "--out", str(tmp_path / "a"), "-j", "2"])
    assert r.exit_code == 1, r.output  # the video without RGB frames is odd; the other three are adopted
    assert "4 videos: 3 adopted, 1 odd" in r.output and "ODD Down/v_Down_g02_c01: no frames in" in r.output
    assert f"u/ and v/ flow folders found in {root / 'tvl1_flow'}" in r.output
    assert f"RGB frames from {root / 'jpegs_256'}" in r.output and "their UCF-101 names" in r.output
    assert Store(tmp_path / "a").video_ids() == ["Down/v_Down_g01_c01", "Up/v_Up_g01_c01", "Up/v_Up_g02_c01"]
    assert json.loads((tmp_path / "a" / "store.json").read_text())["classes"] == ["Down", "Up"]

    r = CliRunner().invoke(cli, ["adopt", str(root), "--out", str(tmp_path / "b"), "--class-regex",
                                 "v_(?P<class>[A-Z])"])
    assert r.exit_code == 1 and Store(tmp_path / "b").video_ids() == ["D/v_Down_g01_c01", "U/v_Up_g01_c01",
                                                                        "U/v_Up_g02_c01"], r.output

    other = tmp_path / "mine"
    write_uv(other, names=("clip1", "clip2"))
    r = CliRunner().invoke(cli, ["adopt", str(other), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "none of the 2 video folders has a class" in r.output, r.output
    assert "give --class-regex" in r.output and "--splits" in r.output and not (tmp_path / "c" / "store.json").exists()


def test_uv_layout_with_separate_rgb_folder_and_classes_from_names(tmp_path):
    root = tmp_path / "ucf"
    truth = write_uv(root)
    out = tmp_path / "store"
    r = CliRunner().invoke(cli, ["adopt", str(root), "--out", str(out), "--flow-root", "tvl1_flow", "--rgb-root",
                                 "jpegs_256", "--class-regex", "v_([A-Za-z]+)_g", "--bound", "15"])
    assert r.exit_code == 1, r.output  # one odd video
    assert "4 videos: 3 adopted, 1 odd, 0 already adopted (skipped)" in r.output
    assert "ODD Down/v_Down_g02_c01: no frames in" in r.output and "jpegs_256/v_Down_g02_c01" in r.output
    store = Store(out)
    assert store.video_ids() == ["Down/v_Down_g01_c01", "Up/v_Up_g01_c01", "Up/v_Up_g02_c01"]
    with store.open("Up/v_Up_g02_c01") as v:
        assert (v.num_frames, v.num_flows, v.has_rgb) == (6, 5, True) and v.meta["bound"] == 15.0
        assert v.meta["layout"] == "uv" and v.meta["naming"]["flow_y"] == "frame{:06d}.jpg from 1"
        src_x = cv2.imread(str(root / "tvl1_flow/u/v_Up_g02_c01/frame000003.jpg"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(v.flow(2)[..., 0], src_x)
        assert np.abs(v.flow_stack(0, 5).astype(int) - np.concatenate(truth["v_Up_g02_c01"], -1)).mean() < 3
    assert verify_store(out).failed == {"Down/v_Down_g02_c01": read_manifest(out)["Down/v_Down_g02_c01"]["error"]}
    # Without --rgb-root: a flow-only store (classes from the UCF-101 names), whose summary counts no RGB frame
    flow_only = run_adopt(root / "tvl1_flow", tmp_path / "flow-only", progress=False)
    assert len(flow_only.adopted) == 4 and flow_only.layout == "uv"
    assert flow_only.frames == 0 and flow_only.flows == 20 and "0 RGB frames and 20 flows" in flow_only.format()
    assert verify_store(tmp_path / "flow-only").frames == 0
    with Store(tmp_path / "flow-only").open("Down/v_Down_g02_c01") as v:
        assert (v.num_frames, v.num_flows, v.has_rgb) == (6, 5, False)


def test_odd_videos_are_reported_and_the_rest_adopted(tmp_path):
    src = tmp_path / "src"
    write_rawframes(src, per_class=(4, 0))
    (src / "down/v_down_train0/x_00003.jpg").unlink()  # a gap
    (src / "down/v_down_train0/y_00003.jpg").unlink()
    (src / "down/v_down_train1/y_00005.jpg").unlink()  # x and y counts differ
    data = (src / "down/v_down_train2/x_00001.jpg").read_bytes()
    (src / "down/v_down_train2/x_00001.jpg").write_bytes(data[:len(data) // 2])  # truncated
    for p in (src / "up/v_up_train0").glob("[xy]_*"):  # frames only
        p.unlink()
    (src / "up/v_up_train1/img_00002.jpg").write_bytes(b"not a jpeg at all")
    for p in sorted((src / "up/v_up_train2").glob("[ix]*_*.jpg"), reverse=True):  # img and x from 1, y from 0
        stem, _, num = p.stem.rpartition("_")
        p.rename(p.with_name(f"{stem}_{int(num) + 1:05d}.jpg"))
    out = tmp_path / "store"
    s = run_adopt(src, out, progress=False)
    assert sorted(s.adopted) == ["down/v_down_train3", "up/v_up_train2", "up/v_up_train3"], s.format()
    odd = s.odd
    assert "gaps in the numbering" in odd["down/v_down_train0"] and "1 missing (3)" in odd["down/v_down_train0"]
    assert "6 x flows but 5 y flows" in odd["down/v_down_train1"]
    assert "x_00001.jpg is not a readable JPEG (truncated)" in odd["down/v_down_train2"]
    assert "no flow: only 7 RGB frames" in odd["up/v_up_train0"]
    assert "img_00002.jpg is not a readable JPEG (no frame header)" in odd["up/v_up_train1"]
    assert s.exit_code == 1 and "5 odd" in s.format()
    with Store(out).open("up/v_up_train2") as v:  # img / x from 1, y from 0: detected per sequence
        assert v.meta["naming"]["img"] == "img_{:05d}.jpg from 1" and v.meta["naming"]["flow_y"].endswith("from 0")
    assert not (out / "down").exists() or not (out / "down/v_down_train0").exists()
    assert read_manifest(out)["up/v_up_train1"]["status"] == "failed"


def test_copy_move_and_links_across_file_systems(tmp_path, monkeypatch):
    src = tmp_path / "src"
    written = write_rawframes(src, per_class=(1, 0))

    def no_links(a, b, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as m:
        m.setattr(os, "link", no_links)
        with pytest.raises(JobError, match="different file systems.*--copy"):
            run_adopt(src, tmp_path / "linked", progress=False)
        assert not list((tmp_path / "linked").rglob("*.jpg"))
        copied = run_adopt(src, tmp_path / "copied", mode="copy", progress=False)
    assert len(copied.adopted) == 2
    assert not os.path.samefile(tmp_path / "copied/up/v_up_train0/img_00001.jpg", src / "up/v_up_train0/img_00000.jpg")
    moved = run_adopt(src, tmp_path / "moved", mode="move", progress=False)
    assert len(moved.adopted) == 2 and not list(src.rglob("*.jpg"))  # every source name gone ...
    assert verify_store(tmp_path / "moved").problems == {}  # ... into the store
    assert sorted(Store(tmp_path / "moved").video_ids()) == sorted(written)


def test_adopted_and_extracted_stores_do_not_mix(tmp_path):
    src = tmp_path / "src"
    write_rawframes(src, per_class=(1, 0))
    out = tmp_path / "store"
    run_adopt(src, out, progress=False)
    write_moving_video(tmp_path / "videos/a/v.avi", n=4)
    with pytest.raises(JobError, match="made by `flowprep adopt`"):
        run_extract(tmp_path / "videos", out, ExtractOptions(size=(64, 48), preset="fast"), backend="joblib",
                    progress=False)
    extracted = tmp_path / "extracted"
    run_extract(tmp_path / "videos", extracted, ExtractOptions(size=(64, 48), preset="fast"), backend="joblib",
                workers=1, progress=False)
    with pytest.raises(JobError, match="made by `flowprep extract`"):
        run_adopt(src, extracted, progress=False)
    with pytest.raises(JobError, match="--bound 20.0, asked 10"):
        run_adopt(src, out, bound=10.0, progress=False)
    with pytest.raises(JobError, match="not named as in a store.*--out DIR"):
        run_adopt(src, progress=False)  # in place, but 0-based x_ names


def test_jpeg_size_reads_the_frame_header():
    img = np.zeros((37, 53, 3), np.uint8)
    assert jpeg_size(jpg(img)) == (53, 37)
    progressive = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert jpeg_size(progressive) == (53, 37)
    assert jpeg_size(b"\x89PNG....") is None and jpeg_size(jpg(img)[:20]) is None
