"""`python -m twostream ablate`: the paper's grid of cells, each trained once (resumable), with
cells that cannot run here skipped with the reason."""
from __future__ import annotations

import json

import pytest

import trainer.train as train_mod
from trainer.ablate import ablate, grid
from trainer_toy import make_toy, toy_config
from twostream.pipeline import validate


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    store, splits = make_toy(root, "jpeg", train_per_class=6, test_per_class=2, frames=6)
    return root, toy_config(root, store, splits, epochs=1)


def test_grid_has_the_papers_cells_and_says_why_some_cannot_run(toy):
    root, cfg = toy
    cells = {c.name: c for c in grid(validate(cfg))}
    for name in ("flow_L1", "flow_L1_nomean", "flow_L5", "flow_L10", "flow_L10_nomean", "trajectory_L10",
                 "flow_bidir_L10", "rgb_stack", "spatial_scratch", "spatial_finetune", "spatial_last_layer",
                 "flow_farneback", "flow_dis", "flow_deepflow", "flow_lk"):
        assert name in cells, name
    assert cells["flow_L5"].settings == {"input": "flow", "flow_length": 5, "mean_subtraction": True}
    assert "pretrained" in cells["spatial_finetune"].skip  # no weights in the toy pipeline
    assert cells["spatial_last_layer"].settings["freeze"] == "backbone"
    assert "data.videos" in cells["flow_dis"].skip  # no source videos to extract other flow from


def test_cells_train_once_and_the_table_is_written(toy, monkeypatch):
    root, cfg = toy
    cfg = validate({**cfg, "ablate": {"epochs": 1}})
    first = ablate(cfg, ["flow_L1", "rgb_stack", "flow_bidir_L10"])
    table = (root / "run" / "ablate" / "table.md").read_text()
    assert "| flow_L1 | flow | 1 | on |" in table and "| rgb_stack | rgb_stack |" in table
    assert "skipped: the store has no backward flow" in table
    saved = json.loads((root / "run" / "ablate" / "table.json").read_text())["cells"]
    assert [c["cell"] for c in saved] == ["flow_L1", "flow_bidir_L10", "rgb_stack"]  # in grid order
    assert 0 <= saved[0]["top1"] <= 1 and saved[0]["videos"] == 4

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(train_mod, "main", no_training)
    again = ablate(cfg, ["flow_L1", "rgb_stack"])
    assert [c["top1"] for c in again["cells"]] == [first["cells"][0]["top1"], first["cells"][2]["top1"]]
    with pytest.raises(ValueError, match="unknown ablation cell"):
        ablate(cfg, ["flow_L2"])
