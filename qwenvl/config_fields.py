"""Typed, range-checked reads of the JSON objects of a checkpoint's config files.

``Fields(raw, where)`` wraps one JSON object (``where``: the file, shown in errors); each read names the
field's type and range, and a value that does not fit raises a one-line ``ModelFileError`` naming the
file and the field (``config.json: vision_config.depth: expected an integer from 1 to 4096, got -1``).
A missing or ``null`` field takes its default; a required one has none. Integral floats (``1536.0``) are
read as integers; booleans are never numbers.

The bounds below are sanity limits that stop absurd sizes (``2**63`` layers) before anything is built or
allocated; whether the sizes fit the weights is checked against the tensors' shapes afterwards
(``weights.checkpoint.check_weight_shapes``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .errors import ModelFileError

REQUIRED: Any = object()

# Sanity bounds (inclusive upper limits) for the sizes a config gives.
MAX_WIDTH = 1 << 20  # hidden / intermediate sizes, head dims
MAX_VOCAB = 1 << 24
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_CONTEXT = 1 << 24
MAX_PATCH = 1 << 10  # patch, temporal patch, merge sizes, channels
MAX_PIXELS = 1 << 34  # image pixel budgets


class Fields:
    """One JSON object of a config file, read field by field with type and range checks."""

    def __init__(self, raw: Any, where: str, prefix: str = ""):
        if not isinstance(raw, dict):
            what = f"{prefix.rstrip('.')}: " if prefix else ""
            raise ModelFileError(f"{where}: {what}expected a JSON object, got {_show(raw)}")
        self.raw = raw
        self.where = where
        self.prefix = prefix

    # -- access ---------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether the field is present and not null."""
        return self.raw.get(key) is not None

    def value(self, key: str, default: Any = REQUIRED) -> Any:
        """The raw value; ``default`` when missing or null (an error when required)."""
        value = self.raw.get(key)
        if value is None:
            if default is REQUIRED:
                raise ModelFileError(f"{self.where}: missing field '{self.prefix}{key}'")
            return default
        return value

    def section(self, key: str, required: bool = False) -> Fields | None:
        """A nested object (None when missing or null and not required)."""
        value = self.value(key, REQUIRED if required else None)
        return None if value is None else Fields(value, self.where, f"{self.prefix}{key}.")

    def fail(self, key: str, expected: str, value: Any) -> ModelFileError:
        return ModelFileError(f"{self.where}: {self.prefix}{key}: expected {expected}, got {_show(value)}")

    # -- typed reads ----------------------------------------------------------------------------
    def integer(self, key: str, default: Any = REQUIRED, *, low: int = 1, high: int = MAX_WIDTH) -> int:
        value = self.value(key, default)
        if value is default and default is not REQUIRED:
            return value
        number = as_integer(value)
        if number is None or not low <= number <= high:
            raise self.fail(key, f"an integer from {low} to {high}", value)
        return number

    def number(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        low: float | None = None,
        high: float | None = None,
        above: float | None = None,
    ) -> float:
        """A finite number within [low, high] (and > ``above`` when given)."""
        value = self.value(key, default)
        if value is default and default is not REQUIRED:
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        ok = ok and (above is None or value > above)
        if not ok:
            raise self.fail(key, "a finite number" + _range_text(low, high, above), value)
        return float(value)

    def flag(self, key: str, default: Any = REQUIRED) -> bool:
        value = self.value(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def text(self, key: str, default: Any = REQUIRED, *, choices: Sequence[str] | None = None) -> str:
        value = self.value(key, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(repr(c) for c in choices)}" if choices is not None else "a string"
            raise self.fail(key, expected, value)
        return value

    def integers(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        low: int = 0,
        high: int = MAX_WIDTH,
        length: int | None = None,
        max_length: int = 4096,
    ) -> tuple[int, ...]:
        """A list of integers in [low, high] (``length`` of them when given)."""
        value = self.value(key, default)
        if value is default and default is not REQUIRED:
            return value if value is None else tuple(value)
        numbers = [as_integer(v) for v in value] if isinstance(value, list) and len(value) <= max_length else None
        if (
            numbers is None
            or any(n is None or not low <= n <= high for n in numbers)
            or (length is not None and len(numbers) != length)
        ):
            count = f"{length} " if length is not None else ""
            raise self.fail(key, f"a list of {count}integers from {low} to {high}", value)
        return tuple(numbers)  # type: ignore[arg-type]

    def numbers(
        self, key: str, default: Any = REQUIRED, *, length: int, low: float | None = None, above: float | None = None
    ) -> tuple[float, ...]:
        """A list of ``length`` finite numbers, each >= low (and > above when given)."""
        value = self.value(key, default)
        if value is default and default is not REQUIRED:
            return value if value is None else tuple(value)
        ok = isinstance(value, list) and len(value) == length
        ok = ok and all(
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (low is None or v >= low)
            and (above is None or v > above)
            for v in value
        )
        if not ok:
            raise self.fail(key, f"a list of {length} finite numbers" + _range_text(low, None, above), value)
        return tuple(float(v) for v in value)


def as_integer(value: Any) -> int | None:
    """An int, or an integral finite float, as int; None for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def check_range(where: str, name: str, value: Any, low: int, high: int) -> None:
    """For configs built from other sources (GGUF metadata): an integer in [low, high], else one line."""
    number = as_integer(value)
    if number is None or not low <= number <= high:
        raise ModelFileError(f"{where}: {name}: expected an integer from {low} to {high}, got {_show(value)}")


def _range_text(low: float | None, high: float | None, above: float | None) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if low is not None:
        parts.append(f">= {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return f" {' and '.join(parts)}" if parts else ""


def _show(value: Any) -> str:
    """The value as JSON writes it (``null``, ``true``, ``[96]``), cut at 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["Fields", "REQUIRED", "as_integer", "check_range"]
