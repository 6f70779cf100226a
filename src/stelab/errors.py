"""The small exception family stelab raises for bad input.

Every error names the parameter, the bad value and what is allowed. They
subclass the builtin exception a Python user would expect (``ValueError`` or
``TypeError``) so ``except ValueError`` keeps working; the CLI catches
``StelabError`` (and plain ``ValueError``/``TypeError``/``OSError``) and prints one line.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any


class StelabError(Exception):
    """Base class of every error stelab raises on purpose."""


class ConfigError(StelabError, ValueError):
    """A parameter, config key or CLI option has a value that is not allowed."""


class StelabTypeError(StelabError, TypeError):
    """A parameter has the wrong type."""


class DataError(StelabError, OSError):
    """A data file is missing, truncated or fails its checksum."""


class StelabWarning(UserWarning):
    """Something stelab did differs from what was probably asked (e.g. layers
    :func:`stelab.quantize` cannot convert and leaves float)."""


def closest(name: str, options: Iterable[str]) -> str | None:
    """The option closest to ``name`` (for 'did you mean' hints), or None."""
    found = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown(kind: str, name: Any, options: Iterable[str]) -> ConfigError:
    """An error for an unknown name, listing the known ones and the closest match."""
    options = sorted(options)
    hint = closest(str(name), options)
    msg = f"unknown {kind} {name!r}; known: {', '.join(options)}"
    if hint:
        msg += f" (did you mean {hint!r}?)"
    return ConfigError(msg)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, or a ConfigError unless it is finite and > 0 (>= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StelabTypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    ok = math.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        allowed = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return v


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], or an error naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def construct(kind: str, name: str, ctor: Callable[..., Any], params: dict[str, Any]) -> Any:
    """``ctor(**params)``, or a ConfigError naming the unexpected parameters of
    ``kind`` ``name`` and the allowed ones (registries share this)."""
    try:
        inspect.signature(ctor).bind(**params)
    except TypeError:
        allowed = [p for p in inspect.signature(ctor).parameters if p != "self"]
        raise ConfigError(
            f"{kind} {name!r} got unexpected parameters {sorted(params)}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        ) from None
    return ctor(**params)
