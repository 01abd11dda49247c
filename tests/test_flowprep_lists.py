"""List files for MMAction2: labels from the official class index when --splits is given, per-split and
per-modality rawframe lists, flow lists counting n-1, and every file MMAction2's naming opens exists."""
import json
from pathlib import Path

import pytest

from videos import FAST, write_moving_video
from videos import run_flowprep as cli

# As in UCF-101's classInd.txt, where a case-sensitive sort would swap each pair.
UCF_CLASSES = ["Hammering", "HammerThrow", "JumpingJack", "JumpRope"]


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    videos = tmp_path_factory.mktemp("ucf")
    ids = []
    for k, cls in enumerate(UCF_CLASSES):
        for g in (1, 2):
            vid = f"{cls}/v_{cls}_g{g:02d}_c01"
            write_moving_video(videos / f"{vid}.avi", n=4 + k, seed=k)
            ids.append(vid)
    splits = videos / "ucfTrainTestlist"
    splits.mkdir()
    # classInd's own order (1-based), given out of alphabetical order on purpose.
    (splits / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(UCF_CLASSES, 1)))
    (splits / "trainlist01.txt").write_text("".join(f"{v}.avi {UCF_CLASSES.index(v.split('/')[0]) + 1}\n"
                                                    for v in ids if "_g01_" in v))
    (splits / "testlist01.txt").write_text("".join(f"{v}.avi\n" for v in ids if "_g02_" in v))
    out = tmp_path_factory.mktemp("store") / "ucf101"
    r = cli("extract", "--videos", videos, "--out", out, "--splits", splits, *FAST)
    assert r.exit_code == 0, r.output
    return videos, out, ids


def rows(path: Path) -> list[tuple[str, int, int]]:
    return [(d, int(n), int(lab)) for d, n, lab in (line.split() for line in path.read_text().splitlines())]


def test_labels_follow_classind_not_a_case_sensitive_sort(ucf):
    _, out, ids = ucf
    labels = {d.split("/")[0]: lab for d, _, lab in rows(out / "videos.txt")}
    assert labels == {c: i for i, c in enumerate(UCF_CLASSES)}
    info = json.loads((out / "store.json").read_text())
    assert info["labels_from"].endswith("classInd.txt") and info["classes"] == UCF_CLASSES


def test_split_lists_per_modality(ucf):
    _, out, ids = ucf
    train = rows(out / "ucf101_rgb_split1_train.txt")
    test = rows(out / "ucf101_flow_split1_test.txt")
    assert [d for d, _, _ in train] == [v for v in ids if "_g01_" in v]  # the split file's order, as MMAction2's
    assert [d for d, _, _ in test] == [v for v in ids if "_g02_" in v]
    for d, n, lab in train:
        assert n == 4 + lab  # RGB: every frame
    for d, n, lab in test:
        assert n == 4 + lab - 1  # flow: n frames give n-1 flows
    lists = ["rgb.txt", "flow.txt", "ucf101_rgb_split1_train.txt", "ucf101_rgb_split1_test.txt",
             "ucf101_flow_split1_train.txt", "ucf101_flow_split1_test.txt"]
    assert sorted(p.name for p in out.glob("*.txt")) == sorted(lists + ["videos.txt"])  # at the top, as files
    assert sorted(json.loads((out / "store.json").read_text())["lists"]) == sorted(lists)


def mmaction2_file_lists(root: Path, annotations: Path, split: int = 1) -> tuple[str, str]:
    """What MMAction2 1.2's `tools/data/build_file_list.py ucf101 ROOT --level 2 --format rawframes`
    writes for a split (its parse_directory, parse_ucf101_splits and build_file_list, line for line
    in what they do): every entry two levels below ROOT is taken for a video folder and listed."""
    import fnmatch
    import glob
    import os
    import os.path as osp

    frame_info = {}
    for frame_dir in glob.glob(osp.join(root, "*", "*")):
        lst = os.listdir(frame_dir)  # a file two levels down: NotADirectoryError, as in MMAction2
        rgb, fx, fy = (len(fnmatch.filter(lst, p + "*")) for p in ("img_", "flow_x_", "flow_y_"))
        assert fx == fy, frame_dir
        frame_info[osp.join(osp.basename(osp.dirname(frame_dir)), osp.basename(frame_dir))] = (frame_dir, rgb, fx)
    with open(annotations / "classInd.txt") as f:
        class_mapping = {x[1]: int(x[0]) - 1 for x in (line.strip().split() for line in f)}

    def line_to_map(line):
        items = line.strip().split()
        video = osp.splitext(items[0])[0]
        return osp.join(osp.basename(osp.dirname(video)), osp.basename(video)), class_mapping[osp.dirname(items[0])]

    def build(part):
        with open(annotations / f"{part}list{split:02d}.txt") as f:
            items = [line_to_map(x) for x in f]
        return "".join(f"{v} {frame_info[v][1]} {label}\n" for v, label in items
                       if v in frame_info and frame_info[v][1] > 0)
    return build("train"), build("test")


def test_mmaction2s_own_file_list_tool_reads_the_store_and_writes_our_lists(ucf):
    """The store is a valid MMAction2 rawframes root as it stands: its file-list tool (glob over
    STORE/*/*) finds the videos, and the lists it writes are ours byte for byte."""
    videos, out, _ = ucf
    train, test = mmaction2_file_lists(out, videos / "ucfTrainTestlist")
    assert train == (out / "ucf101_rgb_split1_train.txt").read_text() and train.count("\n") == 4
    assert test == (out / "ucf101_rgb_split1_test.txt").read_text() and test.count("\n") == 4


def test_every_file_mmaction2_would_open_exists(ucf):
    _, out, ids = ucf
    mm = json.loads((out / "store.json").read_text())["mmaction2"]
    assert mm["rgb"]["filename_tmpl"] == "img_{:05}.jpg" and mm["flow"]["filename_tmpl"] == "flow_{}_{:05d}.jpg"
    flow = rows(out / "flow.txt")
    rgb = rows(out / "rgb.txt")
    assert len(flow) == len(rgb) == len(ids)
    for (d, n, _), (d2, n2, _) in zip(rgb, flow):
        assert d == d2 and n2 == n - 1
    for lst, kind, dirs in (("rgb", "rgb", rgb), ("flow", "flow", flow)):
        tmpl, start = mm[kind]["filename_tmpl"], mm[kind]["start_index"]
        for d, n, _ in dirs:
            for i in range(start, start + n):
                names = [tmpl.format(i)] if kind == "rgb" else [tmpl.format("x", i), tmpl.format("y", i)]
                for name in names:
                    assert (out / d / name).is_file(), (d, name)
            # one past the end does not exist: the count is exact
            beyond = tmpl.format(start + n) if kind == "rgb" else tmpl.format("x", start + n)
            assert not (out / d / beyond).exists()


def test_rerun_without_splits_keeps_the_official_labels(ucf):
    videos, out, _ = ucf
    before = (out / "videos.txt").read_text()
    r = cli("extract", "--videos", videos, "--out", out, *FAST)  # the splits folder is recorded in store.json
    assert r.exit_code == 0 and "0 extracted" in r.output, r.output
    assert (out / "videos.txt").read_text() == before
    assert (out / "ucf101_flow_split1_test.txt").is_file()


def test_without_splits_labels_are_sorted_names(tmp_path):
    write_moving_video(tmp_path / "v" / "b" / "x.avi", n=3)
    write_moving_video(tmp_path / "v" / "A" / "y.avi", n=3)
    out = tmp_path / "out"
    assert cli("extract", "--videos", tmp_path / "v", "--out", out, *FAST).exit_code == 0
    assert (out / "videos.txt").read_text() == "A/y 3 0\nb/x 3 1\n"
    assert (out / "flow.txt").read_text() == "A/y 2 0\nb/x 2 1\n"
    info = json.loads((out / "store.json").read_text())
    assert info["labels_from"] == "sorted class names" and info["classes"] == ["A", "b"]
    assert sorted(p.name for p in out.glob("*.txt")) == ["flow.txt", "rgb.txt", "videos.txt"]


def test_hmdb51_split_folder(tmp_path):
    videos = tmp_path / "hmdb"
    for cls in ("wave", "brush_hair"):
        for k in (1, 2):
            write_moving_video(videos / cls / f"{cls}_{k}.avi", n=3)
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    for cls in ("wave", "brush_hair"):
        (splits / f"{cls}_test_split1.txt").write_text(f"{cls}_1.avi 1\n{cls}_2.avi 2\n")
    out = tmp_path / "out"
    r = cli("extract", "--videos", videos, "--out", out, "--splits", splits, *FAST)
    assert r.exit_code == 0, r.output
    assert rows(out / "hmdb51_flow_split1_train.txt") == [("brush_hair/brush_hair_1", 2, 0),
                                                                   ("wave/wave_1", 2, 1)]
    assert rows(out / "hmdb51_rgb_split1_test.txt") == [("brush_hair/brush_hair_2", 3, 0),
                                                                 ("wave/wave_2", 3, 1)]


def test_bad_splits_folder_is_a_usage_error(tmp_path):
    write_moving_video(tmp_path / "v" / "a" / "x.avi", n=3)
    (tmp_path / "empty").mkdir()
    r = cli("extract", "--videos", tmp_path / "v", "--out", tmp_path / "o", "--splits", tmp_path / "empty", *FAST)
    assert r.exit_code == 2 and "classInd.txt" in r.output and "_test_split" in r.output, r.output
