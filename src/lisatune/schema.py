"""The base of every config section and the one way a bad setting is reported: a single line.

Every YAML file lisatune reads goes through `read_yaml` (line numbers in errors, duplicate keys refused), and
every pydantic validation error through `format_error`, so a run config, a study file, a method's options and
the engine's LisaConfig all say what is wrong the same way.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import math
import re
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterable, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, FiniteFloat, ValidationError

from .errors import LisaError


# pydantic names the member of a union in an error's location ("resume.bool", "p.list[float][0]"): not a field
_UNION_TAG = re.compile(r"(str|int|float|bool|none|bytes|literal\[.*\]|[\w-]+\[.*\])")


def _loc(parts) -> str:
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in parts).lstrip(".")


def _model_in(ann) -> type[BaseModel] | None:
    """The options model an annotation holds: X, list[X], X | None, dict[str, X]."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    return next((m for m in map(_model_in, get_args(ann)) if m is not None), None)


def section_of(model: type[BaseModel], parts) -> type[BaseModel]:
    """The nested options model that the location `parts` (field names; list indices skipped) points into."""
    for part in parts:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = _model_in(field.annotation) if field else None
        if field is not None and inner is None:
            return model
        model = inner or model
    return model


@functools.lru_cache(maxsize=None)
def _source(cls: type) -> list[str]:
    try:
        return inspect.getsourcelines(cls)[0]
    except (OSError, TypeError):  # no source shipped: no help beyond the descriptions
        return []


def field_help(model: type[BaseModel], name: str) -> str:
    """One line of help for an option: its description, else the comment that declares it in its class (the one
    trailing its line, or the comment lines just above it); the first sentence. The comments stay the one source."""
    field = model.model_fields[name]
    text = field.description or ""
    owner = next((c for c in model.__mro__ if name in c.__dict__.get("__annotations__", {})), model)
    lines = _source(owner)
    at = next((i for i, ln in enumerate(lines) if re.match(rf"\s+{re.escape(name)}\s*:", ln)), None)
    if not text and at is not None:
        trailing = re.search(r"\s#\s+(.*)$", lines[at])
        above = []
        for ln in reversed(lines[:at]):
            if not ln.strip().startswith("#"):
                break
            above.insert(0, ln.strip().lstrip("#").strip())
        text = trailing.group(1).strip() if trailing else " ".join(above)
    first = re.split(r"(?<!e\.g)(?<!i\.e)\. (?=[A-Z])", text, maxsplit=1)[0]
    return first.removesuffix(".")


def choices(annotation: Any) -> tuple | None:
    """The values a Literal option takes (optional, or a list of them: each item's), else None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) is list:
        return choices(get_args(annotation)[0])
    members = [choices(a) for a in get_args(annotation) if a is not type(None)]
    return tuple(c for m in members for c in m) if members and all(members) else None


def format_error(e: ValidationError, model: type[BaseModel], where: str, section: bool = False,
                 noun: str = "option", hint: bool = False, sort: bool = True) -> str:
    """One line for a pydantic error: "<where>: <field>: <message> (got <input>)".

    section: `where` is the name of the section the model is (e.g. "lisa"), validated alone; fields then read
    "lisa.interval: ...". An unknown key lists the valid ones (sorted, or in the model's order), and with `hint`
    the closest one, for a typo.
    """
    errors = e.errors()
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])  # a typo is the root cause
    parts = [p for p in err["loc"] if p != "__root__" and not _UNION_TAG.fullmatch(str(p))]
    loc = _loc(parts)
    if err["type"] == "extra_forbidden":
        scope = section_of(model, parts[:-1])
        names = sorted(scope.model_fields) if sort else list(scope.model_fields)
        close = difflib.get_close_matches(str(parts[-1]), names, n=1) if hint and parts else []
        tip = f"did you mean '{close[0]}'? " if close else ""
        return f"{where}: unknown {noun} '{loc}' ({tip}valid: {', '.join(names)})"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: '{loc}' is required"
    if not parts or (err["type"] == "value_error" and section_of(model, parts) is not section_of(model, parts[:-1])):
        # a whole-section check (its message names the fields): the section's contents are not the point
        return f"{where}: {loc + ': ' if parts else ''}{msg}"
    return f"{where}{'.' if section else ': '}{loc}: {msg} (got {err.get('input')!r})"


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):  # pydantic's float accepts true as 1.0: a YAML `lr: true` is a mistake, not 1
        raise ValueError("must be a number, not true/false")
    return v


def is_number(v: Any) -> bool:
    """An int or float, not a bool (which Python counts as an int): what a metric value may be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# A float option: finite (no NaN, no inf), and not a boolean. Ranges go on the field: Field(gt=0) etc.
# Integer options are StrictInt (a boolean, a float or a string is an error, not converted).
Number = Annotated[FiniteFloat, BeforeValidator(_not_bool)]


class Options(BaseModel):
    """A config section: unknown keys are errors, and build() reports one line."""
    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = "options"  # how errors name this section, e.g. "lisa"

    @classmethod
    def build(cls, **options):
        """Validate options, turning pydantic's report into one LisaError line."""
        try:
            return cls(**options)
        except ValidationError as e:
            raise LisaError(format_error(e, cls, cls.section, section=True)) from None


class _TagRefused(yaml.MarkedYAMLError):
    def __init__(self, tag: str, mark):
        super().__init__(problem=f"YAML tag '{tag}' is not allowed (lisatune reads plain values only)",
                         problem_mark=mark)
        self.tag = tag


class YamlTagError(LisaError):
    """A YAML file or --set value with an explicit tag (!!python/object, !!binary, !custom ...): refused."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (not: the last one wins), and
    that an explicit tag (`!!python/object:...`, `!!str`, `!foo`) is refused: values are what they look like."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise _TagRefused(tag.replace("tag:yaml.org,2002:", "!!"), event.start_mark)
        return super().compose_node(parent, index)


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_yaml(text: str, where: str) -> Any:
    """Safe YAML (no tags that build objects), duplicate keys refused; errors are "<where>:<line>: ..."."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: never constructs objects
    except _TagRefused as e:
        raise YamlTagError(f"{where}:{e.problem_mark.line + 1}: {e.problem}") from None
    except RecursionError:
        raise LisaError(f"{where}: not valid YAML (an alias refers to itself)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise LisaError(f"{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None


def no_effect(rules: Iterable[tuple[bool, str, str]]) -> str | None:
    """The one validation step for options given where they do nothing (accepted and ignored, the run would not
    be the one asked for): `rules` are (given where it has no effect, option, why); the first one's message."""
    return next((f"{option} has no effect {why}; leave it out" for given, option, why in rules if given), None)


def os_reason(e: OSError) -> str:
    """An OSError as a short phrase: "No space left on device", "Permission denied", ..."""
    return e.strerror or str(e) or type(e).__name__


def output_dir(path: str | Path, what: str = "--out") -> Path:
    """A directory to write results into, made if needed, or one LisaError line naming it and why not."""
    p = Path(path)
    blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise LisaError(f"{what} '{path}': '{blocker}' is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LisaError(f"{what} '{path}' cannot be created ({os_reason(e)})") from None
    return p


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents, or one LisaError line naming it (missing, a directory, unreadable, binary,
    not UTF-8)."""
    p = Path(path)
    if p.is_dir():
        raise LisaError(f"{what} '{path}' is a directory, not a file")
    if not p.is_file():
        raise LisaError(f"{what} '{path}' does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise LisaError(f"{what} '{path}' cannot be read ({os_reason(e)})") from None
    return decode_text(raw, f"{what} '{path}'")


def decode_text(raw: bytes, name: str) -> str:
    """UTF-8 text, or a LisaError "<name> is a binary file" / "is not UTF-8 text (byte N)"."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise LisaError(f"{name} is a binary file, not text (a NUL byte at byte {nul})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LisaError(f"{name} is not UTF-8 text (byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads text


def read_yaml(path: str | Path, what: str, expected: str | None = None) -> Any:
    """A YAML file (see parse_yaml); with `expected`, it must be a mapping (else: "expected <expected>")."""
    data = parse_yaml(read_text(path, what), str(path))
    if expected is not None:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise LisaError(f"{path}: expected {expected}")
    return data


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config sections as dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- command-line numbers: argparse `type=` functions whose error is one line naming the option -------------
def cli_int(minimum: int) -> Callable[[str], int]:
    """An integer >= minimum (argparse adds the option's name: "argument --batch-size: must be >= 1 (got 0)")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer (got {text!r})") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {v})")
        return v
    parse.__name__ = f"integer >= {minimum}"
    return parse


def cli_column(text: str) -> tuple[str, str]:
    """FIELD=COLUMN, both non-empty ("argument --columns: expected FIELD=COLUMN (got 'x')")."""
    key, sep, value = text.partition("=")
    if not (sep and key and value):
        raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN (got {text!r})")
    return key, value


def cli_positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (got {text!r})") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text})")
    return v


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line ("lisatune eval: error: ... (see --help)"), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
