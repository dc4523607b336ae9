"""Reading codec.json fields: immutable values, checked fields, and integer entropy tables.

Shared by `pipeline.spec` (the fields every artifact has) and each family's `spec.py` (its own).
"""
from __future__ import annotations

import json
from typing import Any, Callable

from pipeline.errors import LatentpackError


class FrozenDict(dict):
    """A dict that refuses changes (and stays picklable, for Beam workers)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a codec spec is immutable")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True))


def freeze(value):
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


class Fields:
    """A codec.json dict and the file it came from: `need` a field of a kind, or one clear error."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def need(self, field: str, kind, check: Callable[[Any], bool] = lambda v: True):
        if field not in self.raw:
            raise LatentpackError(f"{self.where}: missing field {field!r}")
        value = self.raw[field]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
            raise LatentpackError(f"{self.where}: invalid value for {field!r}: {str(value)[:80]!r}")
        return value

    def error(self, why: str) -> LatentpackError:
        return LatentpackError(f"{self.where}: {why}")


def validate_tables(model, count: int, where: str) -> None:
    """Integer tables only: `count` of them, each positive integers summing to 2**precision."""
    def bad(why):
        return LatentpackError(f"{where}: invalid entropy_model: {why}")

    if not isinstance(model, dict) or not isinstance(model.get("precision"), int) or not 8 <= model["precision"] <= 24:
        raise bad("needs an integer 'precision' between 8 and 24")
    offsets, tables = model.get("offsets"), model.get("frequencies")
    if not isinstance(offsets, list) or not isinstance(tables, list) or not len(offsets) == len(tables) == count:
        raise bad(f"needs {count} 'offsets' and 'frequencies' tables")
    for d, (offset, table) in enumerate(zip(offsets, tables)):
        if not isinstance(offset, int) or not isinstance(table, list) or not table or len(table) > 65536:
            raise bad(f"table {d}: malformed")
        if not all(isinstance(f, int) and f >= 1 for f in table) or sum(table) != 1 << model["precision"]:
            raise bad(f"table {d}: frequencies must be positive integers summing to 2**precision")
