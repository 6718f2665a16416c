"""Declared configs, and the memory settings of a reader.

Every config in the project (memory, training, compression, serving, distributed training) is declared the same
way: a frozen pydantic dataclass (``@declared``) whose fields carry their defaults, ranges and choices. Building
one validates it, whether from Python keywords, a YAML mapping (``from_dict``), a copy with changes
(``override``) or command-line flags generated from its fields (``add_flags`` / ``from_flags``); unknown keys
are refused, so a typo in a config never passes silently. A config is never mutated: ``override`` returns a new,
validated one.

The memory settings live in the reader's ``config.json`` under the key ``"gradmem"`` so that a checkpoint
directory stays a valid Hugging Face model directory and carries everything a writer or a server needs to agree on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass as _pydantic_dataclass

C = TypeVar("C")

_CONFIG = ConfigDict(extra="forbid", frozen=True)


class ConfigError(ValueError):
    """A config that does not validate: one line per problem, each naming the field's dotted path."""

    def __init__(self, cls: type, error: ValidationError | str):
        if isinstance(error, ValidationError):
            lines = []
            for item in error.errors(include_url=False):
                where = ".".join(str(part) for part in item["loc"])
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
                    message = "unknown key (a typo?)"
                lines.append((f"{where}: " if where else "") + message + _given(item))
            text = "; ".join(lines)
        else:
            text = error
        super().__init__(f"{cls.__name__}: {text}")


def _given(item: Mapping[str, Any]) -> str:
    if item.get("type") in ("value_error", "unexpected_keyword_argument", "missing_argument", "missing"):
        return ""
    return f" (got {item.get('input')!r})"


def declared(cls: type[C]) -> type[C]:
    """Turn a dataclass-style class body into a validated, frozen config (the one way configs are declared)."""
    return _pydantic_dataclass(cls, config=_CONFIG)


def from_dict(cls: type[C], data: Mapping[str, Any] | None) -> C:
    """Build ``cls`` from a mapping (nested sections as mappings), validating everything at once."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(cls, f"expected a mapping, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(cls, exc) from None


def from_yaml(cls: type[C], path) -> C:
    """``cls`` from a YAML file, read with ``yaml.safe_load`` (no tag constructs an object); YAML that does not
    parse, or is not a mapping, is a ValueError naming the file."""
    with open(path) as f:
        data = _safe_yaml(f, str(path))
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: a config is a YAML mapping of sections, not a {type(data).__name__}")
    return from_dict(cls, data or {})


def json_object(raw: bytes, where: str) -> dict[str, Any]:
    """The JSON object in ``raw``, or one ValueError naming ``where``: bytes that are not UTF-8, not JSON (nested
    too deeply included) or JSON of another type. The one reading of the JSON documents the tools are handed (a
    reader's config.json, a store's manifest.json and served.json)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{where} is not a JSON document ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not a JSON object (a JSON {type(value).__name__})")
    return value


def _safe_yaml(source, where: str) -> Any:
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as exc:  # a python/* tag, a syntax error, a tab: one clear line, never an object
        raise ValueError(f"{where}: not YAML this tool reads: {str(exc).splitlines()[0]}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def override(cfg: C, updates: Mapping[str, Any]) -> C:
    """A validated copy of ``cfg`` with dotted keys replaced: ``override(cfg, {"optim.lr": 1e-3})``."""
    data = to_dict(cfg)
    for key, value in updates.items():
        *path, last = key.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                raise ConfigError(type(cfg), f"{key}: {part!r} is not a section")
            node = node[part]
        if last not in node:
            raise ConfigError(type(cfg), f"{key}: unknown key; known here: {sorted(node)}")
        node[last] = value
    return from_dict(type(cfg), data)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``: the value is read as YAML (numbers, null, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE (e.g. optim.lr=3e-4), got {text!r}")
    parsed = _safe_yaml(value, f"--set {key}") if value.strip() else None
    if isinstance(parsed, str):  # YAML 1.1 reads 3e-4 as a string; a number is what was meant
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


# ---------------------------------------------------------------------------------------------- command line
def _scalar(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (), prefix: str = "") -> None:
    """One ``--flag`` per field of ``cls`` (``cpus_per_actor`` -> ``--cpus-per-actor``), help and choices from the
    declaration. Flags left out keep the config's defaults; ``from_flags`` validates the result."""
    group = parser.add_argument_group(f"{cls.__name__} (defaults and checks declared in {cls.__module__})")
    for name, info in cls.__pydantic_fields__.items():
        if name in skip:
            continue
        annotation, nullable = _scalar(info.annotation)
        flag = "--" + (prefix + name).replace("_", "-")
        required = info.is_required()
        default = None if required else (info.default_factory() if info.default_factory else info.default)
        help_text = (info.description or "") + ("" if required or default is None else f" (default: {default})")
        kwargs: dict[str, Any] = {"dest": prefix + name, "default": argparse.SUPPRESS, "help": help_text.strip()}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            kwargs.update(choices=list(typing.get_args(annotation)), required=required)
        elif annotation in (int, float, str):
            kwargs.update(type=_nullable(annotation) if nullable else annotation, required=required,
                          metavar=annotation.__name__.upper())
        else:  # lists, mappings: JSON on the command line
            kwargs.update(type=json.loads, required=required, metavar="JSON")
        group.add_argument(flag, **kwargs)


def _nullable(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def from_flags(cls: type[C], args: argparse.Namespace, prefix: str = "", **fixed: Any) -> C:
    """Build ``cls`` from the flags ``add_flags`` declared (only those given) plus ``fixed`` values."""
    given = {name: getattr(args, prefix + name) for name in cls.__pydantic_fields__ if hasattr(args, prefix + name)}
    return from_dict(cls, {**given, **fixed})


# ---------------------------------------------------------------------------------------------- memory settings
# How a reader turns a context into memory and reads it back (see gradmem/methods.py):
#   gradmem       the paper's method: m vectors written by K SGD steps on the reconstruction loss
#   rmt           forward-only writes: K passes of [M; C; M], the trailing m hidden states become M
#   full_context  upper bound: the READ sees the context itself, [C; Q]
#   no_context    lower bound: the READ sees the query alone, [Q]
METHODS = ("gradmem", "rmt", "full_context", "no_context")


def known_method(value: str) -> str:
    """``value`` if it names a registered method (``gradmem.methods.register`` adds to METHODS), else ValueError."""
    if value not in METHODS:
        raise ValueError(f"unknown method {value!r}; choose one of {METHODS}")
    return value


@declared
class MemoryConfig:
    """Memory and WRITE settings (the paper's defaults)."""

    num_memory: int = Field(8, ge=1, description="m: prefix vectors in input-embedding space")
    mem_proj: bool = Field(False, description="learned d x d preconditioner (identity init) applied before every use of M")
    write_head: bool = Field(True, description="separate vocabulary projection for the write loss (copy of the LM head)")
    write_steps: int = Field(2, ge=0, description="K: SGD steps per WRITE unless the caller says otherwise")
    write_lr: float = Field(0.04, gt=0, description="alpha: inner-loop step size")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="adaptive WRITE: stop a context once its "
                                          "teacher-forced reconstruction accuracy reaches this, write_steps at most "
                                          "(None: always write_steps)")
    min_write_steps: int = Field(0, ge=0, description="adaptive WRITE: steps every context takes before the target "
                                 "is checked (at most write_steps; 0 without a target)")

    @model_validator(mode="after")
    def _adaptive_setting(self) -> "MemoryConfig":
        from gradmem.write import check_write  # the one check of a write setting

        check_write("inference", self.write_steps, self.target_accuracy, self.min_write_steps)
        return self
    max_context_tokens: int = Field(1024, ge=2, description="longest context a WRITE accepts")
    answer_stop: list[str] = Field(default_factory=list, description="extra stop strings for greedy answers (besides EOS)")
    method: str = Field("gradmem", description=f"one of {METHODS}: training, writing and reading dispatch on it")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return known_method(value)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemoryConfig":
        return from_dict(cls, data)
