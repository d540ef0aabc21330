"""Strict configuration models loaded from YAML.

Every config in the project derives from `StrictModel`: unknown keys are an
error (a typo in a YAML file must never be silently ignored), and values are
validated on assignment too.
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
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
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
