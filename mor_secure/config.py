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


def _first_repeated_key(document: yaml.Node | None) -> tuple[str, int, int] | None:
    """(key, first line, repeat line) of the first key named twice in one mapping of `document`, or None.

    On the composed nodes, before any construction: what a merge (`<<: *base`)
    brings in is not a repeat (the mapping's own keys may override it), but a
    second `<<` is, and an anchored mapping is checked once as written,
    however often it is aliased.
    Keys are compared as written with their resolved tag (`1` and `"1"` differ).
    """
    pending, visited = [document], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue
                line, written = key.start_mark.line + 1, (key.tag, key.value)
                if written in first_lines:
                    return key.value, first_lines[written], line
                first_lines[written] = line
            pending.extend(reversed([child for pair in node.value for child in pair]))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend(reversed(node.value))
    return None


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
    # yaml.safe_load's two steps, parsed once: the repeats are looked for between composing and constructing,
    # which flattens merges into the nodes.
    loader = yaml.SafeLoader(text)
    try:
        document = loader.get_single_node()
        repeated = _first_repeated_key(document)
        raw = None if document is None or repeated is not None else loader.construct_document(document)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigError(f"{path}: nested too deeply to read as YAML; a config is a few levels deep") from None
    finally:
        loader.dispose()
    if repeated is not None:
        key, first, line = repeated
        fix = ("merge several mappings with one `<<: [*a, *b]` (the earlier wins where they share a key)"
               if key == "<<" else "keep one: YAML would silently use the last")
        raise ConfigError(f"{path}:{line}: key {key!r} is repeated (first on line {first}); {fix}")
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
