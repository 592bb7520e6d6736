"""Typed dataclass configs, checked as they are built: a key no section has, a value of the wrong type or one
out of range is one line naming the field (``schedule.total_steps``), what it must be and what was given, before
any worker starts. Without this a typo (``data.batchsize``) read as a Python signature error, and a wrong value
(``--set seed=x``, ``--set schedule.log_every_steps=0``) reached the workers and failed there, or never.

YAML 1.1 (PyYAML) reads ``3e-4`` as a string; a float field given such a string takes the number, as ``--set``
does. Nothing else is converted: an int stays an int in a float field (run fingerprints hash the values as given).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from typing import Any, Mapping

__all__ = ["check_keys", "check_fields", "check_bounds", "float_fields", "float_from_text"]

_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def check_keys(cls: type, raw: Mapping[str, Any], section: str) -> None:
    """Raise for a key of ``raw`` that ``cls`` has no field for, with the closest field and the known ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {_dotted(section, close[0])!r}?)" if close else ""
            where = f"{section}: " if section else ""
            known = f"; known: {', '.join(names)}" if not close or len(names) <= 20 else ""   # a long list: the hint
            raise ValueError(f"{where}unknown key {key!r}{hint}{known}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _conform(value: Any, tp: Any) -> tuple[bool, Any]:
    """(does ``value`` fit ``tp``, the value to keep): YAML's float strings become floats, nothing else changes."""
    if tp is Any:
        return True, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for arg in args:
            if arg is not type(None):
                ok, kept = _conform(value, arg)
                if ok:
                    return True, kept
        return False, value
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        value = float_from_text(value)
        return _is_number(value), value
    if tp is str:
        return isinstance(value, (str, os.PathLike)), value      # a pathlib.Path where a path is meant
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            return False, value
        kept = []
        for item, arg in zip(value, args if args[-1:] != (Ellipsis,) else [args[0]] * len(value)):
            ok, item = _conform(item, arg)
            if not ok:
                return False, value
            kept.append(item)
        return True, type(value)(kept)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return False, value
        if args and dataclasses.is_dataclass(args[0]):
            return all(isinstance(v, args[0]) for v in value), value
        return True, value       # element types are the consumer's (class names may be numbers in YAML)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return False, value
        if len(args) == 2 and args[1] is float:
            kept = {}
            for k, v in value.items():
                ok, v = _conform(v, float)
                if not ok:
                    return False, value
                kept[k] = v
            return True, kept
        return True, value
    return True, value


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or null" if type(None) in args else "")
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {'numbers' if all(a is float for a in args) else 'values'}"
    if origin is dict and len(args) == 2 and args[1] is float:
        return "a mapping of names to numbers"
    named = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", tuple: "a list"}
    return named.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_fields(obj: Any, section: str) -> None:
    """Check every field of dataclass ``obj`` against its annotation (not recursing: each section checks its
    own); a YAML float string in a float field is replaced by its number."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, kept = _conform(value, hints[f.name])
        if not ok:
            shown = f"{value!r}" if not isinstance(value, str) else f"{value!r} (a string)"
            raise ValueError(f"{_dotted(section, f.name)} must be {_describe(hints[f.name])}; got {shown}")
        if kept is not value:
            setattr(obj, f.name, kept)


def check_bounds(obj: Any, section: str, bounds: Mapping[str, tuple[float | None, float | None]]) -> None:
    """``bounds``: field name -> (least, most), either None for open; None values (optional fields) pass."""
    for name, (lo, hi) in bounds.items():
        value = getattr(obj, name)
        if value is None:
            continue
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            want = (f"between {lo} and {hi}" if lo is not None and hi is not None
                    else f">= {lo}" if lo is not None else f"<= {hi}")
            raise ValueError(f"{_dotted(section, name)} must be {want}; got {value!r}")


@functools.lru_cache(maxsize=None)
def float_fields(cls: type) -> tuple[str, ...]:
    """The fields of dataclass ``cls`` annotated ``float`` (for a config that checks its numbers itself)."""
    hints = _hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if hints[f.name] is float)


def float_from_text(value: Any) -> Any:
    """``value`` as a float when it is a string in float syntax (``"3e-4"``), else unchanged."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value
