"""Strict configuration models loaded from YAML.

Every config in the project derives from `StrictModel`: unknown keys are an
error (a typo in a YAML file must never be silently ignored), and values are
validated on assignment too. A key named twice in one YAML mapping is an
error as well, not "the last copy wins": an old block left further down a
long policy file would otherwise silently replace the one the operator reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ModelT = TypeVar("ModelT", bound="StrictModel")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message says how to fix it."""


class _RepeatedKey(Exception):
    """A YAML mapping names `key` again on `line` (1-based), first named on `first_line`."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader (still safe: no arbitrary objects) that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A merge (`<<: *base`) may legitimately be overridden by the mapping's own keys.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_lines.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own construct_mapping reports it
                continue
            if first_line != key_node.start_mark.line + 1:
                raise _RepeatedKey(key, first_line, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


class StrictModel(BaseModel):
    """Base for every config: `extra="forbid"`, frozen field set, validated assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def load_config(path: str | Path, model: type[ModelT], *, overrides: Mapping[str, Any] | None = None) -> ModelT:
    """Load `path` (YAML) into `model`, raising `ConfigError` with the file name on any problem.

    `overrides` are top-level values set by the caller (e.g. a command's
    `--out`); they replace the file's. Relative paths inside the file are left
    as written; callers that need them resolved use `resolve_relative(path, value)`.
    """
    path = Path(path)
    try:
        # Inside the try: is_file() itself raises on some paths (a name too long).
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc}); check the path and "
                          "its permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8") from exc
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _RepeatedKey as exc:
        raise ConfigError(f"{path}:{exc.line}: key {exc.key!r} is repeated (first on line {exc.first_line}); "
                          "keep one: YAML would silently use the last") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    raw = {**raw, **(overrides or {})}
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid {model.__name__}: {problems}") from exc


def resolve_relative(config_path: str | Path, value: str | Path) -> Path:
    """Resolve `value` relative to the directory holding `config_path` (absolute paths pass through)."""
    value = Path(value)
    return value if value.is_absolute() else (Path(config_path).parent / value).resolve()
