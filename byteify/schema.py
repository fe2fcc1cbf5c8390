"""User-written settings: strict pydantic models, YAML files, ``key=value`` overrides and the
one-line messages a bad key or value gets.  Recipes (``byteify train``) and conversion presets
(``byteify convert --preset/--set``) both go through here.

An unknown key names its path and the closest valid key at the same level
(``unknown key 'stages.0.stpes'; did you mean 'stages.0.steps'?``).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ByteifyError


class Strict(BaseModel):
    """Base of every settings model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def load_yaml_mapping(path: Path) -> dict:
    """A YAML file whose top level is a mapping (one-line ByteifyError otherwise)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ByteifyError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ByteifyError(f"{path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, items: list[str], where: str) -> dict:
    """Apply ``key=value`` items to ``data`` in place: dots walk mappings, integers index lists
    (``stages.0.steps=10``); values are parsed as YAML (``[a, b]``, ``{k: v}``, ``1e-3``, ``null``)."""
    for item in items:
        if "=" not in item:
            raise ByteifyError(f"{where}: override '{item}': expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ByteifyError(f"{where}: override '{item}': the value is not valid YAML") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                try:
                    idx = int(part)
                    node[idx]
                except (ValueError, IndexError):
                    raise ByteifyError(f"{where}: override '{key}': '{part}' is not a valid index into a list of {len(node)}") from None
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ByteifyError(f"{where}: override '{key}': '{part}' is a value, not a section")
    return data


def _submodel(annotation):
    """The pydantic model inside an annotation (``Model``, ``Model | None``, ``list[Model]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _closest_key(model: type[BaseModel], loc: tuple) -> str | None:
    """For an unknown key at ``loc``, the closest valid key at the same level (full path)."""
    node = model
    for part in loc[:-1]:
        if isinstance(part, int) or node is None:
            continue
        field = node.model_fields.get(part)
        node = _submodel(field.annotation) if field else None
    if node is None:
        return None
    close = difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=1, cutoff=0.5)
    return ".".join([str(p) for p in loc[:-1]] + [close[0]]) if close else None


def validation_message(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    """One line naming the first bad key path, with the closest valid key for unknown ones."""
    err = exc.errors()[0]
    path = ".".join(str(p) for p in err["loc"])
    if err["type"] == "value_error":
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {path + ': ' if path else ''}{msg}"
    if err["type"] == "extra_forbidden":
        close = _closest_key(model, tuple(err["loc"]))
        hint = f"; did you mean '{close}'?" if close else ""
        return f"{where}: unknown key '{path}'{hint}"
    return f"{where}: '{path}': {err['msg']} (got {err.get('input')!r})"


M = typing.TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict, where: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ByteifyError(validation_message(exc, model, where)) from None
