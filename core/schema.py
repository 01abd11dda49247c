"""Configuration schemas: each pipeline section defined once, as keys with a type, a range, a
default and a help text.

The same definition serves every reader of a section: `Section.validate` fills defaults and
rejects unknown keys (with the nearest known one), wrong types (`lr = "fast"`, a quoted
`"false"`) and out-of-range values (`batch_size = 0`), naming the key, the value and what is
allowed; `Section.options` makes the click options of the command that sets those keys, with
the same help and the default shown; `Options` gives validated values as attributes. So a key
is added, renamed or documented in one place.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import click


class ConfigError(ValueError):
    """A pipeline file, override or option that cannot be used; the message says which and why."""


class Invalid(Exception):
    """Raised by a value type for a value it does not accept; the message says what it expects."""


# ---------------------------------------------------------------- value types
# A type is a function: value -> converted value, raising Invalid(what it expects).

def integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Invalid("an integer")
    return v


def number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Invalid("a number")
    return float(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        hint = " (write true or false without quotes)" if isinstance(v, str) else ""
        raise Invalid("true or false" + hint)
    return v


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise Invalid("a string (in quotes)")
    return v


def size(v: Any) -> tuple[int, int]:
    """'340x256' or [340, 256] -> (340, 256)."""
    if isinstance(v, str):
        try:
            w, h = (int(x) for x in v.lower().split("x"))
        except ValueError:
            raise Invalid("a size WIDTHxHEIGHT, e.g. \"340x256\"") from None
    elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        w, h = v
    else:
        raise Invalid("a size WIDTHxHEIGHT, e.g. \"340x256\"")
    if w < 8 or h < 8:
        raise Invalid("a size of at least 8x8")
    return int(w), int(h)


def list_of(item: Callable[[Any], Any], what: str) -> Callable[[Any], list]:
    def convert(v: Any) -> list:
        if not isinstance(v, (list, tuple)):
            raise Invalid(f"a list of {what}, e.g. [..]")
        try:
            return [item(x) for x in v]
        except Invalid:
            raise Invalid(f"a list of {what}") from None
    convert.__name__ = f"list of {what}"
    return convert


def names(v: Any) -> list[str]:
    """A list of names, or one comma-separated string (as typed on a command line)."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return list_of(string, "strings")(v)


def optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`kind`, or None (absent; TOML has no null, so a pipeline file leaves such a key out)."""
    def convert(v: Any) -> Any:
        return None if v is None else kind(v)
    convert.__name__ = f"optional {getattr(kind, '__name__', 'value')}"
    convert.inner = kind
    return convert


int_list = list_of(integer, "integers")
number_list = list_of(number, "numbers")


# ---------------------------------------------------------------- keys and sections

@dataclass(frozen=True)
class Key:
    """One setting: default, help, type (see above), and the values allowed.

    `flags`: the command-line spellings (first one is the main name; "" derives --the-key-name;
    None: not on the command line). `min`/`max` are inclusive, `above` exclusive.
    """

    default: Any
    help: str
    type: Callable[[Any], Any] = string
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    above: float | None = None
    flags: tuple[str, ...] | None = ()
    metavar: str | None = None

    def check(self, value: Any) -> Any:
        """The converted value, or Invalid saying what is allowed."""
        v = self.type(value)
        items = v if isinstance(v, list) else [v]
        for x in items:
            if x is None:
                continue
            if self.choices and x not in self.choices:
                raise Invalid("one of " + ", ".join(repr(c) for c in self.choices))
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                if self.min is not None and x < self.min:
                    raise Invalid(f"a value >= {self.min:g}")
                if self.max is not None and x > self.max:
                    raise Invalid(f"a value <= {self.max:g}")
                if self.above is not None and x <= self.above:
                    raise Invalid(f"a value > {self.above:g}")
        return v

    def describe_default(self) -> str:
        d = self.default
        if d is None or d == "" or d == []:
            return ""
        if isinstance(d, bool):
            return "true" if d else "false"
        if isinstance(d, tuple) and getattr(self.type, "inner", self.type) is size:
            return f"{d[0]}x{d[1]}"
        if isinstance(d, list):
            return ",".join(str(x) for x in d)
        return str(d)


@dataclass
class Section:
    """A named group of keys, e.g. [extract]; `check(values)` adds rules across keys (and may
    return the values completed, e.g. a default that depends on another key)."""

    name: str
    keys: dict[str, Key]
    check: Callable[[dict], None] | None = None
    doc: str = ""

    def defaults(self) -> dict:
        return {k: key.default for k, key in self.keys.items()}

    def validate(self, values: dict | None, where: str = "", partial: bool = False) -> dict:
        """Values converted and checked, with defaults filled in (only the given ones if `partial`).

        Raises ConfigError naming every bad key, its value and what is allowed.
        """
        values = dict(values or {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}[{self.name}] must be a table of keys")
        problems = []
        for k in values:
            if k not in self.keys:
                near = difflib.get_close_matches(k, self.keys, n=1)
                hint = f"; did you mean {self.qual(near[0])}?" if near else ""
                problems.append(f"unknown key {self.qual(k)}{hint} (known: {', '.join(sorted(self.keys))})")
        out = {} if partial else self.defaults()
        for k, v in values.items():
            if k not in self.keys:
                continue
            try:
                out[k] = self.keys[k].check(v)
            except Invalid as e:
                problems.append(f"{self.qual(k)} = {_show(v)}: expected {e}")
        if problems:
            raise ConfigError(_where(where) + "; ".join(problems))
        if self.check is not None and not partial:
            try:
                out = self.check(out) or out
            except ConfigError as e:
                raise ConfigError(_where(where) + str(e)) from None
        return out

    def qual(self, key: str) -> str:
        """`section.key`, with its command-line option where there is one."""
        dotted = f"{self.name}.{key}" if self.name else key
        flag = self.flag(key)
        return f"{dotted} ({flag})" if flag else dotted

    def flag(self, key: str) -> str | None:
        flags = self.keys[key].flags if key in self.keys else None
        if flags is None:
            return None
        return flags[0] if flags else "--" + key.replace("_", "-")

    def options(self, *names: str, exclude: Iterable[str] = ()) -> Callable:
        """click options for `names` (default: every key with flags), defaulting to None so a
        caller can tell given from not given; help shows the schema's default."""
        chosen = names or [k for k in self.keys if self.keys[k].flags is not None and k not in set(exclude)]

        def decorate(f):
            for k in reversed(chosen):
                f = self._option(k)(f)
            return f
        return decorate

    def _option(self, k: str) -> Callable:
        key = self.keys[k]
        flags = list(key.flags or ["--" + k.replace("_", "-")])
        inner = getattr(key.type, "inner", key.type)
        default = key.describe_default()
        text = key.help + (f" [default: {default}]" if default else "")
        if inner is boolean:
            first = flags[0]
            flags[0] = f"{first}/--no-{first[2:]}"
            return click.option(*flags, k, default=None, help=text)
        kw: dict = {"default": None, "help": text, "metavar": key.metavar}
        if key.choices:
            kw["type"] = click.Choice([str(c) for c in key.choices])
        elif inner is integer:
            kw["type"] = int
        elif inner is number:
            kw["type"] = float
        return click.option(*flags, k, **kw)


def given(kwargs: dict) -> dict:
    """The options a user actually gave (click leaves the others None)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _show(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _where(where: str) -> str:
    return f"{where}: " if where else ""


class Options:
    """Validated values of a section as read-only attributes (picklable, comparable).

    Subclasses set SECTION; `Options(**values)` raises ConfigError for anything bad.
    """

    SECTION: ClassVar[Section]

    def __init__(self, **values: Any):
        self.__dict__.update(self.SECTION.validate(values, type(self).__name__))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only; use .replace({name}=...)")

    def replace(self, **changes: Any):
        return type(self)(**{**self.__dict__, **changes})

    def asdict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self.__dict__.items())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__))


def _rebuild(cls, values):
    obj = cls.__new__(cls)
    obj.__dict__.update(values)
    return obj


class Pipeline(dict):
    """A validated pipeline: every section present, filled with its defaults and checked
    (made only by twostream.pipeline.validate). Library entry points take one, so a pipeline is
    read and validated once, where it enters (a command line, a test), and passed down."""


def require_pipeline(cfg: dict, what: str) -> Pipeline:
    """`cfg` itself when it is a validated pipeline; TypeError (a caller's bug) otherwise."""
    if not isinstance(cfg, Pipeline):
        raise TypeError(f"{what} takes a validated pipeline: pass twostream.pipeline.validate(cfg) or "
                        "twostream.pipeline.load_pipeline(path), not a plain dict")
    return cfg
