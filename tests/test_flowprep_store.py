"""Store writers are atomic and the completeness check catches what is missing."""
import json

import numpy as np
import pytest

from core.layout import STORE_INFO
from flowprep.store import Store, open_writer
from flowprep.store_base import StoreError
from flowprep.store_files import append_manifest, read_manifest, write_store_info
from core.atomic import remove_temps as clean_temps
from flowprep.lists import write_list_file
from videos import textured_frame

H, W = 24, 32


def fill(root, vid, fmt, n=4, rgb=True):
    with open_writer(fmt, root, vid) as w:
        for i in range(n):
            w.write_rgb(textured_frame(H, W, i)) if rgb else w.skip_rgb()
            if i:
                w.write_flow(np.full((H, W, 2), 100 + i, np.uint8))
        w.commit({"size": [W, H], "bound": 20.0})


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_write_read_check(tmp_path, fmt):
    write_store_info(tmp_path, {"format": fmt})
    fill(tmp_path, "a/v1", fmt)
    store = Store(tmp_path)
    assert store.video_ids() == ["a/v1"]
    assert store.check("a/v1") is None
    with store.open("a/v1") as v:
        assert (v.num_frames, v.num_flows) == (4, 3)
        assert v.rgb(0).shape == (H, W, 3)
        assert np.abs(v.flow(2).astype(int) - 103).max() <= 1
        assert v.flow_stack(0, 2).shape == (H, W, 4)


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_aborted_video_leaves_nothing(tmp_path, fmt):
    write_store_info(tmp_path, {"format": fmt})
    with pytest.raises(RuntimeError):
        with open_writer(fmt, tmp_path, "a/v1") as w:
            w.write_rgb(textured_frame(H, W, 0))
            raise RuntimeError("decode failed")
    assert Store(tmp_path).video_ids() == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != STORE_INFO]


def test_check_finds_missing_frame_and_clean_temps(tmp_path):
    write_store_info(tmp_path, {"format": "jpeg"})
    fill(tmp_path, "v", "jpeg")
    (tmp_path / "v" / "flow_y_00002.jpg").unlink()
    assert "flow_y" in Store(tmp_path).check("v")
    w = open_writer("jpeg", tmp_path, "half")  # a killed worker's leftover
    w.write_rgb(textured_frame(H, W, 0))
    assert clean_temps(tmp_path) == 1
    assert Store(tmp_path).video_ids() == ["v"]


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_flow_only_store_is_complete(tmp_path, fmt):
    write_store_info(tmp_path, {"format": fmt})
    fill(tmp_path, "v", fmt, rgb=False)
    store = Store(tmp_path)
    assert store.check("v") is None
    with store.open("v") as v:
        assert (v.num_frames, v.num_flows, v.has_rgb) == (4, 3, False)
        with pytest.raises(StoreError, match="no-rgb"):
            v.rgb(0)


def test_manifest_last_record_wins_and_list_file(tmp_path):
    append_manifest(tmp_path, {"id": "b/v2", "status": "failed", "frames": 0})
    append_manifest(tmp_path, {"id": "a/v1", "status": "ok", "frames": 5})
    append_manifest(tmp_path, {"id": "b/v2", "status": "ok", "frames": 7})
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"id": "c/cut", "sta')  # a crash mid-line
    recs = read_manifest(tmp_path)
    assert sorted(recs) == ["a/v1", "b/v2"] and recs["b/v2"]["frames"] == 7
    path = write_list_file(tmp_path, recs.values())
    assert path.read_text() == "a/v1 5 0\nb/v2 7 1\n"
    assert json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])["id"] == "b/v2"


@pytest.mark.parametrize("vid", ["../outside", "a/../../x", "/abs/v", "a/.hidden", "with space", "new\nline", ""])
@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
def test_ids_outside_the_store_are_refused_by_every_writer_and_reader(tmp_path, fmt, vid):
    """Defence in depth: whatever the caller checked, a video id never reaches outside the store."""
    root = tmp_path / "store"
    write_store_info(root, {"format": fmt})
    with pytest.raises(StoreError, match="cannot be a video id"):
        open_writer(fmt, root, vid)
    with pytest.raises(StoreError, match="cannot be a video id"):
        Store(root).open(vid)
    assert "cannot be a video id" in Store(root).check(vid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("fmt", ["jpeg", "hdf5"])
@pytest.mark.parametrize("rgb", [True, False])
def test_checksums_of_every_frame(tmp_path, fmt, rgb):
    import zlib

    write_store_info(tmp_path, {"format": fmt})
    fill(tmp_path, "v", fmt, rgb=rgb)
    with Store(tmp_path).open("v") as v:
        crc = v.checksums()
        assert len(crc["img"]) == (4 if rgb else 0) and len(crc["flow_x"]) == len(crc["flow_y"]) == 3
        assert [zlib.crc32(v.frame_bytes("flow_y", i)) for i in range(3)] == crc["flow_y"]
        if rgb:
            assert [zlib.crc32(v.rgb_bytes(i)) for i in range(4)] == crc["img"]
