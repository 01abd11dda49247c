"""Pipeline files and overrides: every section checked against its one schema, so a typo or a
wrong type stops the command with the key, the value and what is allowed, instead of being
ignored or turning into a silently wrong run."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from twostream.trainer_cli import main as trainer_cli
from trainer.config import stream_settings
from core.splits import read_split
from twostream.pipeline import SECTIONS, load_pipeline, validate
from core.schema import ConfigError


@pytest.mark.parametrize("section", [*SECTIONS, "streams.temporal", "streams.extra", "datasets.hmdb", "joint"])
def test_a_typo_in_any_section_is_rejected_with_the_nearest_key(section):
    key, nearest = {"data": ("val_fracton", "val_fraction"), "extract": ("jpeg_qualty", "jpeg_quality"),
                    "synth": ("frame", "frames"), "train": ("lr_step", "lr_steps"), "eval": ("crop", "crops"),
                    "fusion": ("svm_C", "svm_c"), "ablate": ("length", "lengths")}.get(section.split(".")[0],
                                                                                   ("epoch", "epochs"))
    head, _, name = section.partition(".")
    raw = {head: {name: {key: 1}} if name else {key: 1}}
    if section == "streams.extra":
        raw["streams"]["extra"]["input"] = "flow"
    if section == "datasets.hmdb":
        key, nearest = "split_fromat", "split_format"
        raw = {"datasets": {"hmdb": {key: "hmdb51"}}}
    with pytest.raises(ConfigError) as e:
        validate(raw, "p.toml")
    msg = str(e.value)
    assert f"unknown key {section}.{key}" in msg and nearest in msg and "p.toml" in msg, msg


@pytest.mark.parametrize("dotted,value,words", [
    ("data.split", "one", "data.split (--split) = \"one\": expected an integer"),
    ("train.lr", "fast", "train.lr (--lr) = \"fast\": expected a number"),
    ("train.batch_size", 0, "train.batch_size (--batch-size) = 0: expected a value >= 1"),
    ("train.lr_steps", 5, "train.lr_steps = 5: expected a list of integers"),
    ("fusion.svm_c", "big", "fusion.svm_c (--svm-c) = \"big\": expected a number"),
    ("eval.segments", 0, "eval.segments (--segments) = 0: expected a value >= 1"),
    ("data.skip_missing", "false", "expected true or false (write true or false without quotes)"),
    ("train.resume", "no", "train.resume = \"no\": expected true, false, or a checkpoint path"),
    ("eval.crops", "five", "expected one of 'center', 'ten'"),
    ("data.val_fraction", 1.0, "expected a value <= 0.9"),
    ("extract.size", "340by256", "expected a size WIDTHxHEIGHT"),
    ("streams.bidir.flow_length", 5, "flow_length must be even"),
])
def test_wrong_types_and_ranges_name_the_key_the_value_and_what_is_allowed(dotted, value, words):
    head, *rest = dotted.split(".")
    raw: dict = {}
    node = raw.setdefault(head, {})
    for k in rest[:-1]:
        node = node.setdefault(k, {})
    node[rest[-1]] = value
    if head == "streams":
        raw["streams"]["bidir"]["input"] = "flow_bidir"
    with pytest.raises(ConfigError, match=None) as e:
        cfg = validate(raw)
        stream_settings(cfg, "bidir")  # stream sections are checked whole when a stream is resolved
    assert words in str(e.value), str(e.value)


def test_unknown_section_and_stream_without_input(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section or key fuson \(did you mean fusion\?\)"):
        validate({"fuson": {"methods": ["svm"]}})
    with pytest.raises(ConfigError, match=r"\[streams.bidir\] needs an input"):
        validate({"streams": {"bidir": {"flow_length": 10}}})
    with pytest.raises(ConfigError, match=r"both \[spatial\] and \[streams.spatial\]"):
        validate({"spatial": {"lr": 0.1}, "streams": {"spatial": {"lr": 0.2}}})


def test_files_hold_only_what_differs_and_old_stream_sections_still_work(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('name = "x"\n[train]\nlr = 0.01\n[temporal]\nflow_length = 5\n[streams.bidir]\ninput = "flow_bidir"\n')
    cfg = load_pipeline(p, ["spatial.epochs=3"])
    assert cfg["out"] == "runs/x" and cfg["eval"]["segments"] == 25  # defaults filled in
    t = stream_settings(cfg, "temporal")
    assert (t["input"], t["flow_length"], t["lr"]) == ("flow", 5, 0.01)
    assert stream_settings(cfg, "spatial")["epochs"] == 3 and stream_settings(cfg, "rgb")["name"] == "spatial"
    assert stream_settings(cfg, "bidir")["input"] == "flow_bidir"
    with pytest.raises(ConfigError, match="unknown stream 'bidi'"):
        stream_settings(cfg, "bidi")


def test_cli_options_are_checked_by_the_same_schema(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('name = "x"\n[data]\nstore = "nowhere"\n')
    r = CliRunner().invoke(trainer_cli, ["train", "--stream", "flow", "--pipeline", str(p), "-b", "0"])
    assert r.exit_code == 2 and "train.batch_size" not in r.output  # the option sets the stream's own key
    assert "streams.temporal.batch_size (--batch-size) = 0: expected a value >= 1" in r.output, r.output
    r = CliRunner().invoke(trainer_cli, ["train", "-h"])
    assert r.exit_code == 0 and "[default: 32]" in r.output and "--output-dir" in r.output


def test_a_class_without_training_videos_is_warned_about(tmp_path, caplog):
    (tmp_path / "train.txt").write_text("a/v1.avi a\na/v2.avi a\n")
    (tmp_path / "test.txt").write_text("a/v3.avi a\nb/v4.avi b\n")
    split = read_split("list", tmp_path, 1, 0.0)
    assert split.class_names == ["a", "b"]
    assert "no training videos for 1 of 2 classes: b" in caplog.text
