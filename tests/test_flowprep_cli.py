"""The flowprep command line: exit codes, help, real footage, verify catching damage, show."""
import shutil

import cv2
import pytest

from videos import FAST, bikes_path, write_bad_videos, write_moving_video
from videos import run_flowprep as run

@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    videos = tmp_path_factory.mktemp("clips")
    write_moving_video(videos / "wave" / "a.avi", n=6, seed=1)
    write_moving_video(videos / "wave" / "b.avi", n=6, seed=2)
    shutil.copy(bikes_path(), videos / "bikes.mp4")  # real footage, H.264 in .mp4
    out = tmp_path_factory.mktemp("store")
    r = run("extract", "--videos", videos, "--out", out, "--max-frames", 5, *FAST)
    return videos, out, r


def test_extract_all_done_exit_0(extracted):
    videos, out, r = extracted
    assert r.exit_code == 0, r.output
    assert f"output: {out}" in r.output
    assert "3 extracted" in r.output and "0 failed" in r.output
    assert sorted((out / "videos.txt").read_text().splitlines()) == ["bikes 5 0", "wave/a 5 1", "wave/b 5 1"]
    bikes = sorted(p.name for p in (out / "bikes").iterdir())
    assert bikes.count("flow_x_00004.jpg") == 1 and "img_00005.jpg" in bikes and "img_00006.jpg" not in bikes
    assert cv2.imread(str(out / "bikes" / "img_00001.jpg")).shape == (48, 64, 3)


def test_rerun_skips(extracted):
    videos, out, _ = extracted
    r = run("extract", "--videos", videos, "--out", out, "--max-frames", 5, *FAST)
    assert r.exit_code == 0 and "0 extracted, 3 already done" in r.output


def test_some_failed_exit_1(tmp_path):
    write_moving_video(tmp_path / "v" / "good.avi", n=4)
    write_bad_videos(tmp_path / "v")
    r = run("extract", "--videos", tmp_path / "v", "--out", tmp_path / "o", *FAST)
    assert r.exit_code == 1
    assert "1 extracted" in r.output and "4 failed" in r.output and "empty file" in r.output


def test_default_out_under_cwd(tmp_path, monkeypatch):
    write_moving_video(tmp_path / "myclips" / "x.avi", n=3)
    monkeypatch.chdir(tmp_path)
    r = run("extract", "--videos", "myclips", *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data" / "myclips" / "x" / "flow_y_00002.jpg").is_file()


@pytest.mark.parametrize("args,words", [
    (["--size", "64by48"], "WIDTHxHEIGHT"),
    (["--size", "64x48", "--short-side", "32"], "not both"),
    (["--backend", "spark"], "spark"),
    (["--preset", "fast", "--bound", "0"], "bound"),
    (["--device", "cuda"], "cuda"),
])
def test_usage_errors_exit_2(tmp_path, args, words):
    write_moving_video(tmp_path / "v" / "x.avi", n=3)
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run("extract", "--videos", tmp_path / "v", "--out", tmp_path / "o", *args)
    assert r.exit_code == 2 and words in r.output, r.output


def test_changed_parameters_exit_2(extracted, tmp_path):
    videos, out, _ = extracted
    r = run("extract", "--videos", videos, "--out", out, "--max-frames", 5, *FAST, "--bound", 10)
    assert r.exit_code == 2 and "different parameters" in r.output and "--overwrite" in r.output
    r = run("extract", "--videos", tmp_path / "nothing-here", "--out", tmp_path / "o")
    assert r.exit_code == 2


def test_help_explains_presets():
    r = run("extract", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "accurate = OpenCV defaults" in text and "nscales 5" in text and "fast = nscales 3" in text
    for opt in ("--videos", "--list", "--workers", "--backend", "--address", "--format", "--size", "--short-side",
                "--bound", "--jpeg-quality", "--step", "--algo", "--rgb / --no-rgb", "--overwrite"):
        assert opt in text
    assert run("--help").exit_code == 0


def test_verify_catches_deleted_and_corrupted_frames(extracted, tmp_path):
    _, out, _ = extracted
    r = run("verify", out)
    assert r.exit_code == 0 and "3 videos complete" in r.output and "0 with problems" in r.output
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "wave" / "a" / "img_00003.jpg").unlink()
    (copy / "wave" / "b" / "flow_y_00002.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = run("verify", copy)
    assert r.exit_code == 1
    assert "PROBLEM wave/a" in r.output and "PROBLEM wave/b: flow 2" in r.output and "bikes" not in r.output
    assert run("verify", tmp_path).exit_code == 2  # not a store


def test_show_writes_png(extracted, tmp_path):
    _, out, _ = extracted
    png = tmp_path / "sheet.png"
    r = run("show", out, "bikes", "--out", png, "--frames", 3)
    assert r.exit_code == 0, r.output
    sheet = cv2.imread(str(png))
    assert sheet is not None and sheet.shape[0] > 3 * 48 and sheet.shape[1] >= 2 * 240
    assert run("show", out, "no/such", "--out", png).exit_code == 2


def test_flow_to_color_direction_and_magnitude():
    import numpy as np

    from flowprep.show import flow_to_color

    flow = np.zeros((2, 2, 2), np.float32)
    flow[0, 0] = (4, 0)  # right, strongest
    flow[0, 1] = (-2, 0)  # left, half as strong
    img = flow_to_color(flow)
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    assert img[1, 1].max() == 0  # no motion is black
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(int)
    assert hsv[0, 0, 2] == 255 and abs(hsv[0, 1, 2] - 128) <= 2
    assert abs(abs(hsv[0, 0, 0] - hsv[0, 1, 0]) - 90) <= 2  # opposite directions: opposite hues
