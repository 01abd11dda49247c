"""The synthetic colour x motion set: UCF-101 layout, decodable videos, and classes that need both streams."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from flowprep.synth import SynthError, synth_dataset
from twostream.flowprep_cli import synth_command

FRAMES, W, H = 16, 96, 72


def read_video(path: Path) -> np.ndarray:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return np.stack(frames)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("synth") / "videos"
    summary = synth_dataset(out, videos_per_class=12, clips_per_group=3, frames=FRAMES, size=(W, H), seed=1)
    videos = {p.relative_to(out).with_suffix("").as_posix(): read_video(p) for p in sorted(out.glob("*/*.avi"))}
    return out, summary, videos


def disc_mask(frames: np.ndarray) -> np.ndarray:
    """Coloured pixels: the background is grey."""
    f = frames.astype(np.int16)
    return (f.max(axis=-1) - f.min(axis=-1)) > 30


def disc_centroid_y(frames: np.ndarray) -> np.ndarray:
    mask = disc_mask(frames)
    ys = np.arange(frames.shape[1])[None, :, None]
    return (mask * ys).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))


def mean_flow(frames: np.ndarray) -> np.ndarray:
    """Mean Farneback flow (x, y) over the moving pixels, on grey frames as flowprep does."""
    grey = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    flows = np.stack([cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
                      for a, b in zip(grey[:-1], grey[1:])])
    moving = np.linalg.norm(flows, axis=-1) > 0.3
    return flows[moving].mean(axis=0)


def scene_key(video_id: str) -> str:
    return video_id.rsplit("_", 2)[-2] + video_id.rsplit("_", 1)[-1]  # gGGcCC


def by_class(videos: dict, cls: str) -> dict[str, np.ndarray]:
    return {scene_key(v): f for v, f in videos.items() if v.startswith(cls + "/")}


def test_ucf_layout_and_split_files(synth):
    out, summary, videos = synth
    classes = ["GreenDown", "GreenUp", "RedDown", "RedUp"]
    assert summary["classes"] == classes and len(videos) == 48
    lists = out / "ucfTrainTestlist"
    index = {}
    for line in (lists / "classInd.txt").read_text().splitlines():
        i, name = line.split()
        index[name] = int(i)
    assert index == {c: i + 1 for i, c in enumerate(classes)}
    train = [line.split() for line in (lists / "trainlist01.txt").read_text().splitlines()]
    test = [line.split() for line in (lists / "testlist01.txt").read_text().splitlines()]
    assert all(len(t) == 2 for t in train) and all(len(t) == 1 for t in test)
    pattern = re.compile(r"^(\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.avi$")
    groups = {"train": set(), "test": set()}
    for part, rows in (("train", train), ("test", test)):
        for row in rows:
            m = pattern.match(row[0])
            assert m and m.group(1) == m.group(2) and (out / row[0]).is_file(), row
            if part == "train":
                assert int(row[1]) == index[m.group(1)]
            groups[part].add(int(m.group(3)))
    assert groups["train"].isdisjoint(groups["test"])  # split by group like UCF-101
    listed = sorted(r[0] for r in train + test)
    assert listed == sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.avi"))
    assert len(test) == summary["test_videos"] > 0 and len(train) == summary["train_videos"] > len(test)


def test_videos_decode_with_requested_frames_and_size(synth):
    _, _, videos = synth
    assert {f.shape for f in videos.values()} == {(FRAMES, H, W, 3)}


def test_colour_separates_colours_but_not_motions(synth):
    _, _, videos = synth
    redness = {v: float(np.mean(f[..., 2].astype(float) - f[..., 1])) for v, f in videos.items()}  # BGR: R - G
    red = [r for v, r in redness.items() if v.startswith("Red")]
    green = [r for v, r in redness.items() if v.startswith("Green")]
    assert min(red) > max(green) + 5
    # Opposite motions of the same scene have the same colour statistics (same frames, reversed).
    for colour in ("Red", "Green"):
        up, down = by_class(videos, colour + "Up"), by_class(videos, colour + "Down")
        for key in up:
            assert np.abs(up[key].mean(axis=(0, 1, 2)) - down[key].mean(axis=(0, 1, 2))).max() < 0.5


def test_grey_frames_do_not_show_the_colour(synth):
    _, _, videos = synth
    red, green = by_class(videos, "RedUp"), by_class(videos, "GreenUp")
    for key in red:
        g_red = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in red[key]]).astype(float)
        g_green = np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in green[key]]).astype(float)
        assert abs(g_red.mean() - g_green.mean()) < 0.5
        assert np.abs(g_red - g_green).mean() < 4  # only sensor noise and JPEG differ


def test_flow_separates_motions_but_not_colours(synth):
    _, _, videos = synth
    flows = {v: mean_flow(f) for v, f in videos.items()}
    up = [fl[1] for v, fl in flows.items() if "Up/" in v]
    down = [fl[1] for v, fl in flows.items() if "Down/" in v]
    assert max(up) < -0.5 and min(down) > 0.5  # image y grows downwards
    for v, fl in flows.items():
        if v.startswith("Red"):
            other = flows[v.replace("Red", "Green")]
            assert np.abs(fl - other).max() < 0.15


def test_single_frames_do_not_show_the_motion(synth):
    _, _, videos = synth
    for colour in ("Red", "Green"):
        up, down = by_class(videos, colour + "Up"), by_class(videos, colour + "Down")
        pooled_up, pooled_down = [], []
        for key in up:
            # Down is Up played backwards: the same frames up to noise...
            assert np.abs(up[key].astype(float) - down[key][::-1]).mean() < 4
            assert np.abs(up[key][0].astype(float) - down[key][0]).mean() > 4  # ...but not in the same order
            pooled_up += list(disc_centroid_y(up[key]))
            pooled_down += list(disc_centroid_y(down[key]))
        # ...so the disc position at a random time has the same distribution for both motions.
        np.testing.assert_allclose(np.sort(pooled_up), np.sort(pooled_down), atol=0.5)


def test_expand_contract_are_time_mirrors(tmp_path):
    out = tmp_path / "v"
    synth_dataset(out, videos_per_class=4, clips_per_group=2, frames=12, size=(W, H), colours=("Blue",),
                  motions=("Expand", "Contract"), seed=2)
    for key in ("g01_c01", "g02_c02"):
        grow = read_video(out / f"BlueExpand/v_BlueExpand_{key}.avi")
        shrink = read_video(out / f"BlueContract/v_BlueContract_{key}.avi")
        area_grow, area_shrink = disc_mask(grow).sum(axis=(1, 2)), disc_mask(shrink).sum(axis=(1, 2))
        assert area_grow[-1] > 1.8 * area_grow[0] and area_shrink[0] > 1.8 * area_shrink[-1]
        np.testing.assert_allclose(np.sort(area_grow), np.sort(area_shrink), rtol=0.05)


def test_same_seed_same_files_and_cli(tmp_path):
    args = ["--videos-per-class", "4", "--frames", "6", "--size", "64x48", "--clips-per-group", "2"]
    runner = CliRunner()
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        res = runner.invoke(synth_command, ["--out", str(tmp_path / name), "--seed", seed, *args])
        assert res.exit_code == 0, res.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 4 * 4 + 4  # 16 videos, 3 split files, synth.json
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    avi = "RedUp/v_RedUp_g01_c01.avi"
    assert (tmp_path / "a" / avi).read_bytes() != (tmp_path / "c" / avi).read_bytes()

    stamp = (tmp_path / "a" / avi).stat().st_mtime_ns
    res = runner.invoke(synth_command, ["--out", str(tmp_path / "a"), *args])  # same set: left alone
    assert res.exit_code == 0 and "already holds" in res.output
    assert (tmp_path / "a" / avi).stat().st_mtime_ns == stamp
    res = runner.invoke(synth_command, ["--out", str(tmp_path / "a"), "--seed", "1", *args])
    assert res.exit_code == 2 and "not empty" in res.output
    res = runner.invoke(synth_command, ["--out", str(tmp_path / "a"), "--seed", "1", "--overwrite", *args])
    assert res.exit_code == 0 and (tmp_path / "a" / avi).read_bytes() == (tmp_path / "c" / avi).read_bytes()
    res = runner.invoke(synth_command, ["--out", str(tmp_path / "d"), "--size", "64by48"])
    assert res.exit_code == 2 and "WIDTHxHEIGHT" in res.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    res = runner.invoke(synth_command, ["--out", str(tmp_path / "mine"), "--overwrite", *args])
    assert res.exit_code == 2 and "no synthetic set" in res.output and (tmp_path / "mine" / "thesis.txt").is_file()
    with pytest.raises(SynthError, match="multiple of"):
        synth_dataset(tmp_path / "e", videos_per_class=5, clips_per_group=2)


def test_cli_takes_settings_from_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text('name = "x"\n[data]\nvideos = "data/v"\n'
                                     '[synth]\nvideos_per_class = 4\nclips_per_group = 2\nframes = 5\n'
                                     'size = "64x48"\nmotions = ["Expand", "Contract"]\n')
    res = CliRunner().invoke(synth_command, ["--pipeline", "p.toml", "--frames", "7"])
    assert res.exit_code == 0, res.output
    video = read_video(tmp_path / "data/v/GreenExpand/v_GreenExpand_g02_c01.avi")
    assert video.shape == (7, 48, 64, 3)  # --frames beats the file, the file beats the defaults
    (tmp_path / "bad.toml").write_text('[data]\nvideos = "v"\n[synth]\nframe = 5\n')
    res = CliRunner().invoke(synth_command, ["--pipeline", "bad.toml"])
    assert res.exit_code == 2 and "synth.frame" in res.output
