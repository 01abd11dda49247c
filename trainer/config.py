"""Pipeline configuration: a TOML file (pipelines/<name>.toml) plus command-line overrides.

Overrides are `section.key=value` strings; the value is parsed as TOML when it can be
(numbers, booleans, quoted strings, arrays) and taken as a bare string otherwise, so
`train.lr=0.01`, `data.store=data/x` and `eval.crops="ten"` all work.
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A pipeline file or override that cannot be used; the message says which and why."""


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_key(cfg: dict, dotted: str, value: Any, what: str = "") -> None:
    """Set cfg[a][b]... = value for a dotted key "a.b...", creating sections as needed.

    `what` names the setting in error messages (default: the dotted key).
    """
    what = what or dotted
    keys = [k.strip() for k in dotted.split(".") if k.strip()]
    if not keys:
        raise ConfigError(f"override {what!r} names no key")
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


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a pipeline TOML file and apply overrides; the file's folder is kept as `_path`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist (see pipelines/*.toml for the named ones)")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"pipeline file {path} is not valid TOML: {e}") from e
    for o in overrides:
        apply_override(cfg, o)
    cfg["_path"] = str(path)
    return cfg
