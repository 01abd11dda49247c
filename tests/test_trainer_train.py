import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from twostream.trainer_cli import main as cli
from trainer.fit import TrainingError
from trainer.train import main
from trainer_toy import ddp_worker, kill_in_second_epoch, log_without_speed, make_toy, toy_config, toy_raw, write_pipeline
from twostream.pipeline import validate


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    """Classes differ in appearance and in motion: both streams can learn."""
    root = tmp_path_factory.mktemp("tinted")
    return root, *make_toy(root, "jpeg", train_per_class=10, test_per_class=2, tint=True)


@pytest.fixture(scope="module")
def tinted_h5(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinted_h5")
    return root, *make_toy(root, "hdf5", train_per_class=10, test_per_class=2, tint=True)


@pytest.mark.parametrize("stream,store", [("spatial", "tinted"), ("temporal", "tinted_h5")])
def test_stream_trains_on_cpu_and_loss_falls(stream, store, request, tmp_path):
    root, store_dir, splits = request.getfixturevalue(store)
    # temporal from HDF5 with two loader workers: each opens the files itself
    cfg = toy_config(tmp_path, store_dir, splits, epochs=3, optimizer="adamw", lr=1e-3,
                     workers=2 if stream == "temporal" else 0)
    summary = main(cfg, stream)
    log = summary["log"]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    run = tmp_path / "run" / stream
    assert [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    ck = torch.load(run / "last.pt", weights_only=True)  # only tensors and primitives inside
    assert ck["epoch"] == 3 and ck["class_names"] == ["down", "up"] and ck["stream"] == stream  # as the log counts
    assert ck["in_channels"] == (3 if stream == "spatial" else 6)
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["val_acc"] == max(r["val_acc"] for r in log) and best["chosen_by"] == "best validation accuracy"
    assert log[best["epoch"] - 1]["val_acc"] == best["val_acc"]  # the log's record of the epoch best.pt holds
    assert (run / "curve.png").read_bytes()[:4] == b"\x89PNG"


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_resume_after_interrupted_epoch_equals_uninterrupted_run(tinted, tmp_path, monkeypatch):
    _, store, splits = tinted
    # dropout on: the torch RNG state must be restored too
    straight = toy_config(tmp_path / "a", store, splits, epochs=2, dropout=0.5, lr=0.01)
    main(straight, "spatial")

    cut = toy_config(tmp_path / "b", store, splits, epochs=2, dropout=0.5, lr=0.01)
    kill_in_second_epoch(monkeypatch, lambda: main(cut, "spatial"))
    cut["train"]["resume"] = True
    summary = main(cut, "spatial")
    assert [r["epoch"] for r in summary["log"]] == [1, 2]
    a, b = weights(tmp_path / "a/run/spatial/last.pt"), weights(tmp_path / "b/run/spatial/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_without_speed(tmp_path / "a/run/spatial/log.jsonl") == log_without_speed(tmp_path / "b/run/spatial/log.jsonl")


def test_without_a_validation_part_the_last_epoch_is_best_and_says_so(tinted, tmp_path):
    """val_fraction = 0: no validation accuracy is made up from the training one; best.pt is the
    last epoch, and the command line says so."""
    _, store, splits = tinted
    raw = toy_raw(tmp_path, store, splits, epochs=2, lr=0.01)
    raw["data"]["val_fraction"] = 0.0
    r = CliRunner().invoke(cli, ["train", "--stream", "spatial", "--pipeline", str(write_pipeline(tmp_path / "p.toml",
                                                                                                    raw))])
    assert r.exit_code == 0, r.output
    assert "no validation part (data.val_fraction = 0), so best.pt is the last epoch (2)" in r.output, r.output
    assert "best val accuracy" not in r.output
    best = torch.load(tmp_path / "run" / "spatial" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["val_acc"] is None and best["chosen_by"].startswith("last epoch")


def test_diverging_loss_stops_with_a_clear_message(tinted, tmp_path):
    _, store, splits = tinted
    cfg = toy_config(tmp_path, store, splits, epochs=1, lr=1e12, print_freq=1)
    with pytest.raises(TrainingError, match="lower the learning rate"):
        main(cfg, "spatial")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tinted, tmp_path):
    """2 processes x 4 samples = 1 process x 8 samples per step: same data, same updates.
    (BatchNorm frozen, dropout off: per-process batch statistics and masks are the only
    intended differences.)"""
    _, store, splits = tinted
    one = toy_config(tmp_path / "one", store, splits, epochs=1, freeze_bn=True, lr=0.01)
    two = toy_config(tmp_path / "two", store, splits, epochs=1, freeze_bn=True, lr=0.01)
    main(one, "spatial")
    mp.spawn(ddp_worker, args=(2, free_port(), two, "spatial"), nprocs=2, join=True)
    a, b = weights(tmp_path / "one/run/spatial/last.pt"), weights(tmp_path / "two/run/spatial/last.pt")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-4
    la = json.loads((tmp_path / "one/run/spatial/log.jsonl").read_text())
    lb = json.loads((tmp_path / "two/run/spatial/log.jsonl").read_text())
    assert la["train_acc"] == lb["train_acc"] and la["val_acc"] == lb["val_acc"]
    assert np.isclose(la["train_loss"], lb["train_loss"], rtol=1e-4)


def test_cli_bad_inputs_fail_before_training_with_clear_messages(tinted, tmp_path):
    _, store, splits = tinted
    pipeline = write_pipeline(tmp_path / "p.toml", toy_raw(tmp_path, store, splits, epochs=1))
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(cli, ["train", "--stream", "spatial", "--pipeline", str(pipeline), *args])
        assert r.exit_code != 0 and not isinstance(r.exception, (AssertionError, TypeError))
        return r.output

    assert "does not exist; run `flowprep extract" in run("--store", str(tmp_path / "nostore"))
    assert "unknown architecture 'resnet7'" in run("--arch", "resnet7")
    assert "nope.pth does not exist" in run("--pretrained", str(tmp_path / "nope.pth"))
    assert "classInd.txt" in run("-o", "data.split_format=ucf101")
    assert "unknown key train.lr_step; did you mean train.lr_steps" in run("-o", "train.lr_step=3")
    missing = (Path(splits) / "train.txt").read_text() + "down/v_never_extracted.avi 0\n"
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2/train.txt").write_text(missing)
    (tmp_path / "s2/test.txt").write_text((Path(splits) / "test.txt").read_text())
    out = run("-o", f"data.splits={tmp_path / 's2'}")
    assert "down/v_never_extracted" in out and "--skip-missing" in out
    assert not (tmp_path / "run").exists()  # nothing written before the inputs were checked


def test_cli_train_then_evaluate_with_option_overrides(tinted, tmp_path):
    _, store, splits = tinted
    cfg = toy_raw(tmp_path, store, splits, epochs=5, lr=0.5)
    cfg["temporal"]["lr"] = 0.5  # the stream section would win over [train]; the options must win over both
    pipeline = write_pipeline(tmp_path / "p.toml", cfg)
    runner = CliRunner()
    r = runner.invoke(cli, ["train", "--stream", "temporal", "--pipeline", str(pipeline), "--epochs", "1",
                            "--lr", "0.01", "--out", str(tmp_path / "cli"), "-o", "eval.segments=3"])
    assert r.exit_code == 0, r.output
    ck = torch.load(tmp_path / "cli/temporal/last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["stream_config"]["lr"] == 0.01 and ck["config"]["eval"]["segments"] == 3
    r = runner.invoke(cli, ["evaluate", "--stream", "temporal", "--pipeline", str(pipeline), "--out",
                            str(tmp_path / "cli"), "--part", "val"])
    assert r.exit_code == 0, r.output
    assert "temporal val: 4 videos" in r.output and (tmp_path / "cli/temporal/scores_val.npz").is_file()


def test_kill_between_last_and_best_is_repaired_and_temps_cleaned(tinted, tmp_path, monkeypatch):
    """last.pt is the commit point, written first: a kill right after it leaves best.pt and
    log.jsonl one epoch behind; scoring or resuming brings them up to date from last.pt, and the
    .tmp file of a killed save is removed."""
    from trainer import checkpoint as C

    _, store, splits = tinted
    cfg = toy_config(tmp_path, store, splits, epochs=2, lr=0.01)
    order = []
    real = C.save_atomic
    monkeypatch.setattr(C, "save_atomic", lambda path, save: (order.append(path.name), real(path, save))[1])
    cfg1 = validate({**cfg, "train": {**cfg["train"], "epochs": 1}})
    main(cfg1, "spatial")
    monkeypatch.undo()
    assert order == ["last.pt", "best.pt"]  # the commit point first
    run = tmp_path / "run" / "spatial"
    last = torch.load(run / "last.pt", weights_only=True)
    # Epoch 2 improved, its last.pt landed, then the job was killed: best.pt and the log are stale.
    last2 = dict(last, epoch=2, best_epoch=2, best_acc=1.0, log=last["log"] + [dict(last["log"][0], epoch=2)])
    torch.save(last2, run / "last.pt")
    (run / ".tmp.deadbeef0000.last.pt").write_bytes(b"half a checkpoint")  # a kill mid-save leaves this
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == 1
    best = C.load_best(tmp_path / "run", "spatial")  # what scoring reads: repaired first
    assert best["epoch"] == 2 and best["val_acc"] == 1.0
    assert all(torch.equal(best["model"][k], last2["model"][k]) for k in best["model"])
    assert [r["epoch"] for r in C.read_log(run / "log.jsonl")] == [1, 2]
    cfg["train"]["resume"] = True
    summary = main(cfg, "spatial")  # nothing left to train; starting cleans the leftover
    assert [r["epoch"] for r in summary["log"]] == [1, 2]
    assert not list(run.glob(".tmp.*"))


@pytest.mark.parametrize("best_by,expected", [("val_acc", 2), ("val_loss", 3)])
def test_best_epoch_by_validation_accuracy_or_loss(tmp_path, best_by, expected):
    """Streams that cannot separate some classes sit at the same validation accuracy epoch after
    epoch: by accuracy the first of the tied epochs (here a confidently wrong one) stays best.pt;
    train.best_by = "val_loss" keeps the epoch with the lowest validation loss."""
    from trainer import checkpoint as C

    log = [{"epoch": 1, "train_acc": 0.3, "val_acc": 0.25, "val_loss": 2.9},
           {"epoch": 2, "train_acc": 0.4, "val_acc": 0.5, "val_loss": 1.9},   # tied accuracy, overconfident
           {"epoch": 3, "train_acc": 0.4, "val_acc": 0.5, "val_loss": 0.70},  # tied accuracy, calibrated
           {"epoch": 4, "train_acc": 0.5, "val_acc": 0.5, "val_loss": 0.70},  # a tie on loss: the earlier stays
           {"epoch": 5, "train_acc": 0.5, "val_acc": 0.4375, "val_loss": 0.71}]
    best, records = (None, None), []
    for epoch, record in enumerate(log):
        state = lambda e=epoch: {"model": {"w": torch.full((2,), float(e))}, "optimizer": {}, "scheduler": {}}
        best = C.commit_epoch(tmp_path, epoch, dict(record), best, True, records, 1, 0, state, {"stream": "x"},
                              best_by)
    assert best[1] == expected
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == expected and torch.equal(saved["model"]["w"], torch.full((2,), float(expected - 1)))
    assert saved["val_acc"] == log[expected - 1]["val_acc"]
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["best_by"] == best_by and last["best_epoch"] == expected


def test_resume_with_another_best_by_is_refused(tinted, tmp_path):
    _, store, splits = tinted
    main(toy_config(tmp_path, store, splits, epochs=1), "spatial")
    from core.schema import ConfigError

    with pytest.raises(ConfigError, match="best epoch by val_acc; this run asks for streams.spatial.best_by = val_loss"):
        main(toy_config(tmp_path, store, splits, epochs=2, resume=True, best_by="val_loss"), "spatial")


def test_resume_from_a_truncated_checkpoint_says_so(tinted, tmp_path):
    _, store, splits = tinted
    cfg = toy_config(tmp_path, store, splits, epochs=1, resume=True)
    run = tmp_path / "run" / "spatial"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    from core.schema import ConfigError

    with pytest.raises(ConfigError, match="truncated or not one of this trainer's checkpoints.*--resume"):
        main(cfg, "spatial")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="afile is a file; choose another --out"):
        main(validate({**toy_config(tmp_path, store, splits, epochs=1), "out": str(blocker / "runs")}), "spatial")


def test_crop_larger_than_the_frames_is_refused(tinted, tmp_path):
    _, store, splits = tinted
    from core.schema import ConfigError

    with pytest.raises(ConfigError, match="crop_size 64 is larger than the stored frames \\(48x40\\)"):
        main(toy_config(tmp_path, store, splits, epochs=1, crop_size=64), "spatial")


def test_status_lines_go_to_a_log_file_when_not_on_a_terminal(tinted, tmp_path, monkeypatch):
    _, store, splits = tinted
    pipeline = write_pipeline(tmp_path / "p.toml", toy_raw(tmp_path, store, splits, epochs=1))
    monkeypatch.setenv("TWOSTREAM_PROGRESS_SECONDS", "0")
    r = CliRunner().invoke(cli, ["train", "--stream", "spatial", "--pipeline", str(pipeline)])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("spatial epoch 1: ") and "steps (" in x]
    assert lines and "ETA" in lines[-1] and "steps/s" in lines[-1], r.output
    assert "\r" not in r.output  # no progress bar redraws in a file
