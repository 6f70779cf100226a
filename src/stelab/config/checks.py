"""Value checks shared by the config sections: each names the key, the value and what
is allowed."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, StelabError, StelabTypeError, closest
from .schema import INT_MAX, MAX_DEPTH


def type_error(where: str, value: Any, expected: str) -> StelabTypeError:
    return StelabTypeError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")


def as_int(where: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise type_error(where, v, "an integer")
    top = INT_MAX if hi is None else hi
    if (lo is not None and v < lo) or v > top:
        if lo is None:
            rng = f"<= {top}"
        elif hi is None and v < lo:
            rng = f">= {lo}"
        else:
            rng = f"in [{lo}, {top}]"
        raise ConfigError(f"{where} must be an integer {rng}, got {v!r}")
    return int(v)


def as_float(
    where: str,
    v: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise type_error(where, v, "a number")
    x = float(v)
    bad = not math.isfinite(x)
    if lo is not None:
        bad = bad or (x <= lo if lo_open else x < lo)
    if hi is not None:
        bad = bad or (x >= hi if hi_open else x > hi)
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ConfigError(f"{where} must be a finite number {' and '.join(parts)}, got {v!r}")
    return x


def as_bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise type_error(where, v, "true or false")
    return v


def as_str(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise type_error(where, v, "a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{where} must be valid Unicode text (no lone surrogates), got {v!r}"
        ) from None
    return v


def plain(where: str, v: Any, depth: int = 0) -> Any:
    """Check a free-form value (estimator parameters, a weights table): strings, numbers,
    booleans, arrays and tables only, at most :data:`MAX_DEPTH` levels deep, so that it can
    be written to config.toml (and a checkpoint) and read back unchanged."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, str):
        return as_str(where, v)
    if isinstance(v, bool) or isinstance(v, float):
        return v
    if isinstance(v, int):
        return as_int(where, v, -INT_MAX - 1)
    if isinstance(v, (list, tuple)):
        return [plain(f"{where}[{i}]", x, depth + 1) for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {
            as_str(f"{where} (key)", k): plain(f"{where}.{k}", x, depth + 1) for k, x in v.items()
        }
    raise type_error(where, v, "a string, number, boolean, array or table")


def choice(where: str, v: Any, options: Sequence[str], kind: str = "value") -> str:
    s = as_str(where, v)
    if s not in options:
        hint = closest(s, options)
        raise ConfigError(
            f"{where}: unknown {kind} {s!r}; allowed: {', '.join(options)}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    return s


def with_where(where: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; prefix the message of a stelab error it raises with ``where``."""
    try:
        return fn()
    except StelabError as e:
        raise type(e)(f"{where}: {e}") from None


def check_keys(section: str, raw: Mapping[str, Any], cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in valid:
            hint = closest(str(k), valid)
            raise ConfigError(
                f"unknown key {k!r} in section [{section}]; valid keys: {', '.join(valid)}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
