"""Pipeline files (pipelines/<name>.toml): what each section holds, loading, overrides, validation.

The composition root: every package's section schemas meet here, above flowprep and trainer.
A pipeline is read and validated once (`load_pipeline`, `validate`) into a `core.schema.Pipeline`
that the commands pass down; importing this module does no work.

A pipeline file holds only what differs from the schemas' defaults; every section is checked
when the file is read, so a typo anywhere (`fusion.svm_C`, `eval.crop`, `data.val_fracton`) or a
wrong type (`data.split = "one"`) stops every command, naming the key and what is allowed.

Sections and where their schema lives:
    name, out        the run's name and folder (default runs/<name>)     TOP below
    [data]           videos, store, split files                          core/data.py
    [extract]        flowprep extract                                    flowprep/extract_options.py
    [synth]          flowprep synth                                      flowprep/synth.py
    [train]          training settings shared by every stream            trainer/config.py
    [streams.NAME]   one stream: `input` and the [train] keys it changes  trainer/config.py
    [datasets.NAME]  a dataset of a multi-task stream (store, splits)    trainer/config.py
    [eval]           the test protocol                                   trainer/config.py
    [fusion]         late fusion                                         trainer/config.py
    [joint]          train-fusion --joint: the [train] keys it changes   trainer/config.py
    [ablate]         python -m twostream ablate                          trainer/config.py
Older files' [spatial] and [temporal] sections are read as [streams.spatial] / [streams.temporal].

Overrides are `section.key=value` strings; the value is parsed as TOML when it can be (numbers,
booleans, quoted strings, arrays) and taken as a bare string otherwise, so `train.lr=0.01`,
`data.store=data/x` and `eval.crops="ten"` all work.
"""
from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from core.data import DATA, DATASET
from core.schema import ConfigError, Key, Pipeline, Section
from flowprep.extract_options import EXTRACT
from flowprep.synth import SYNTH
from trainer.config import ABLATE, EVAL, FUSION, JOINT, STREAM, TRAIN
from trainer.streams import DEFAULT_STREAMS

TOP = Section("", {
    "name": Key("", "The pipeline's name."),
    "out": Key("", "Run folder: checkpoints, scores and reports [default: runs/<name>]."),
})
SECTIONS: dict[str, Section] = {"data": DATA, "extract": EXTRACT, "synth": SYNTH, "train": TRAIN, "eval": EVAL,
                                "fusion": FUSION, "ablate": ABLATE}


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(cfg: dict, dotted: str, value: Any, what: str = "") -> None:
    """Set cfg[a][b]... = value for a dotted key "a.b...", creating sections as needed.

    `spatial.KEY` / `temporal.KEY` (older pipelines' stream sections) set streams.spatial / temporal.
    """
    what = what or dotted
    keys = [k.strip() for k in dotted.split(".") if k.strip()]
    if not keys:
        raise ConfigError(f"override {what!r} names no key")
    if keys[0] in DEFAULT_STREAMS and len(keys) > 1:
        keys = ["streams", *keys]
    node = cfg
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {what!r}: {k!r} is a value, not a section")
    node[keys[-1]] = value


def apply_override(cfg: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    dotted, text = override.split("=", 1)
    set_key(cfg, dotted, parse_value(text.strip()), override)


def _legacy_streams(raw: dict, where: str) -> dict:
    """Move [spatial] / [temporal] into [streams.*] (refusing both spellings of one stream)."""
    raw = dict(raw)
    streams = dict(raw.get("streams", {}))
    for name in DEFAULT_STREAMS:
        if name in raw:
            if name in streams:
                raise ConfigError(f"{where}: both [{name}] and [streams.{name}]; keep one")
            streams[name] = raw.pop(name)
    if streams:
        raw["streams"] = streams
    return raw


def validate(raw: dict, where: str = "") -> Pipeline:
    """A checked pipeline: every section present and filled with its defaults; [streams.NAME]
    holds only what each stream sets itself (see trainer.config.stream_settings)."""
    where = where or str(raw.get("_path", ""))
    raw = _legacy_streams(raw, where)
    known = [*TOP.keys, *SECTIONS, "streams", "datasets", "joint"]
    unknown = [k for k in raw if k not in known and not k.startswith("_")]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, n=1)) else k
                 for k in unknown]
        raise ConfigError(f"{where}: unknown section or key {', '.join(hints)}; known: {', '.join(known)}")
    tables = [k for k in SECTIONS if k in raw and not isinstance(raw[k], dict)]
    if tables:
        raise ConfigError(f"{where}: {', '.join(tables)} must be a [section], not a value")
    cfg = TOP.validate({k: raw[k] for k in TOP.keys if k in raw}, where)
    if not cfg["out"]:
        cfg["out"] = f"runs/{cfg['name'] or 'default'}"
    for name, section in SECTIONS.items():
        cfg[name] = section.validate(raw.get(name), where)
    cfg["streams"] = {}
    for name, values in raw.get("streams", {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: streams.{name} must be a [streams.{name}] section")
        if name not in DEFAULT_STREAMS and "input" not in values:
            raise ConfigError(f"{where}: [streams.{name}] needs an input (one of {', '.join(STREAM.keys['input'].choices)})")
        section = Section(f"streams.{name}", STREAM.keys)
        cfg["streams"][name] = section.validate(values, where, partial=True)
    cfg["joint"] = JOINT.validate(raw.get("joint"), where, partial=True)
    cfg["datasets"] = {}
    for name, values in raw.get("datasets", {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: datasets.{name} must be a [datasets.{name}] section")
        cfg["datasets"][name] = Section(f"datasets.{name}", DATASET.keys).validate(values, where)
    if "_path" in raw:
        cfg["_path"] = raw["_path"]
    return Pipeline(cfg)


def read_pipeline(path: str | Path) -> dict:
    """The raw contents of a pipeline file (older stream sections moved), not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist (see pipelines/*.toml for the named ones)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"pipeline file {path} is not valid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"pipeline file {path} cannot be read: {e.strerror}") from e
    raw = _legacy_streams(raw, str(path))
    raw["_path"] = str(path)
    return raw


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                  values: dict[str, Any] | None = None, raw: dict | None = None) -> Pipeline:
    """Read a pipeline file (or take `raw`, as read_pipeline gives it), set `values`
    ({"section.key": value}, e.g. from command-line options), then the `section.key=value`
    overrides (applied last, so they win), and validate."""
    raw = read_pipeline(path) if raw is None else raw
    for dotted, value in (values or {}).items():
        set_key(raw, dotted, value)
    for o in overrides:
        apply_override(raw, o)
    return validate(raw, str(path))


def describe(section: Section) -> str:
    """The section's keys with type, default and help, for `show-config` and the docs."""
    lines = [f"[{section.name}]" + (f"  # {section.doc}" if section.doc else "")]
    for k, key in section.keys.items():
        lines.append(f"{k} = {key.describe_default() or '(unset)'}    # {key.help}")
    return "\n".join(lines)
