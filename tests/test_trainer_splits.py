from pathlib import Path

import numpy as np
import pytest

from flowprep.store import Store, open_writer
from flowprep.store_base import StoreError
from flowprep.store_files import write_store_info
from core.splits import Part, SplitError, read_split
from trainer.tasks import check_videos


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def ucf_folder(tmp_path: Path) -> Path:
    d = tmp_path / "ucfTrainTestlist"
    write(d / "classInd.txt", "1 ApplyEyeMakeup\n2 Archery\n")
    train = [f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi {i + 1}" for i, c in enumerate(["ApplyEyeMakeup", "Archery"])
             for g in range(8, 26) for k in (1, 2)]
    write(d / "trainlist01.txt", "\n".join(train) + "\n")
    write(d / "testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g02_c03.avi\n")
    return d


def test_ucf101_split_ids_labels_and_val_by_group(tmp_path):
    s = read_split("ucf101", ucf_folder(tmp_path), 1, val_fraction=0.1)
    assert s.class_names == ["ApplyEyeMakeup", "Archery"]
    assert s.test.video_ids == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01", "Archery/v_Archery_g02_c03"]
    assert s.test.labels == [0, 1]
    assert len(s.train) + len(s.val) == 72
    groups = lambda part: {(lab, v.split("_g")[1][:2]) for v, lab in zip(part.video_ids, part.labels)}  # noqa: E731
    assert not groups(s.train) & groups(s.val)        # a group never straddles train and val
    assert {lab for lab in s.val.labels} == {0, 1}    # every class validates
    assert len(groups(s.val)) == 4                    # round(0.1 * 18) = 2 groups per class
    # the same group numbers are held out for every class (clips of a group number can share a source)
    assert len({g for _, g in groups(s.val)}) == 2
    again = read_split("ucf101", ucf_folder(tmp_path), 1, val_fraction=0.1)
    assert again.val.video_ids == s.val.video_ids     # deterministic


def test_hmdb51_split_uses_1_train_2_test_0_unused(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    write(d / "brush_hair_test_split1.txt", "a.avi 1\nb.avi 2\nc.avi 0\nd.avi 1\n")
    write(d / "cartwheel_test_split1.txt", "e.avi 1 \nf.avi 2\n")
    write(d / "cartwheel_test_split2.txt", "e.avi 2\nf.avi 1\n")
    s = read_split("hmdb51", d, 1, val_fraction=0.0)
    assert s.class_names == ["brush_hair", "cartwheel"]
    assert s.train.video_ids == ["brush_hair/a", "brush_hair/d", "cartwheel/e"] and s.train.labels == [0, 0, 1]
    assert s.test.video_ids == ["brush_hair/b", "cartwheel/f"]
    assert len(s.val) == 0


def test_list_split_with_names_or_indices(tmp_path):
    d = tmp_path / "lists"
    write(d / "train.txt", "jump/a.mp4 jump\nrun/b.mp4 run\nrun/c.mp4 run\n")
    write(d / "test.txt", "jump/x.mp4 jump\n")
    s = read_split("list", d, 1, val_fraction=0.0)
    assert s.class_names == ["jump", "run"] and s.train.labels == [0, 1, 1] and s.test.video_ids == ["jump/x"]
    write(d / "train.txt", "jump/a.mp4 1\nrun/b.mp4 0\n")
    write(d / "test.txt", "jump/x.mp4 1\n")
    s = read_split("list", d, 1, val_fraction=0.0)
    assert s.class_names == ["run", "jump"] and s.train.labels == [1, 0]


def test_wrong_split_format_or_folder_is_a_clear_error(tmp_path):
    d = ucf_folder(tmp_path)
    with pytest.raises(SplitError, match="_test_split1.txt"):
        read_split("hmdb51", d, 1)
    with pytest.raises(SplitError, match="classInd.txt"):
        read_split("ucf101", tmp_path, 1)
    with pytest.raises(SplitError, match="does not exist"):
        read_split("ucf101", tmp_path / "nope", 1)
    with pytest.raises(SplitError, match="trainlist04.txt"):
        read_split("ucf101", d, 4)
    with pytest.raises(SplitError, match="split_format must be one of"):
        read_split("kinetics", d, 1)
    write(tmp_path / "bad" / "x_test_split1.txt", "a.avi train\n")
    with pytest.raises(SplitError, match=r"x_test_split1.txt:1"):
        read_split("hmdb51", tmp_path / "bad", 1)


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_check_videos_names_missing_and_incomplete_or_skips(tmp_path, fmt, caplog):
    root = tmp_path / "store"
    write_store_info(root, {"format": fmt})
    img = np.zeros((8, 8, 3), np.uint8)
    flow = np.full((8, 8, 2), 128, np.uint8)
    with open_writer(fmt, root, "a/ok") as w:
        for _ in range(3):
            w.write_rgb(img)
        w.write_flow(flow)
        w.write_flow(flow)
        w.commit({})
    with open_writer(fmt, root, "a/short") as w:  # one flow missing: incomplete
        for _ in range(3):
            w.write_rgb(img)
        w.write_flow(flow)
        w.commit({})
    part = Part(["a/ok", "a/short", "a/gone"], [0, 0, 0])
    with pytest.raises(StoreError) as e:
        check_videos(Store(root), part)
    assert "a/short" in str(e.value) and "a/gone" in str(e.value) and "a/ok" not in str(e.value)
    assert "--skip-missing" in str(e.value)
    kept, counts = check_videos(Store(root), part, skip_missing=True)
    assert kept.video_ids == ["a/ok"] and counts == [(3, 2)]
    assert "skipping 2" in caplog.text


def test_flow_only_videos_are_rejected_for_the_spatial_stream_only(tmp_path):
    root = tmp_path / "store"
    write_store_info(root, {"format": "jpeg"})
    with open_writer("jpeg", root, "a/flowonly") as w:  # as `flowprep extract --no-rgb` writes it
        for _ in range(3):
            w.skip_rgb()
        for _ in range(2):
            w.write_flow(np.full((8, 8, 2), 128, np.uint8))
        w.commit({})
    part = Part(["a/flowonly"], [0])
    kept, counts = check_videos(Store(root), part)  # temporal: flow is all it needs
    assert kept.video_ids == ["a/flowonly"] and counts == [(3, 2)]
    with pytest.raises(StoreError, match="--no-rgb"):
        check_videos(Store(root), part, reads=("rgb", "flow"))
