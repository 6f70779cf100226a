"""User code in stelab: import modules that register estimators, quantizers and models.

``stelab --import mymod ...`` (repeatable, anywhere on the command line) and the
environment variable ``STELAB_IMPORT`` (module names separated by ``os.pathsep``)
import user modules before a command runs, so their ``@stelab.register_estimator``
and ``stelab.models.register`` calls take effect. ``MODULE:NAME`` strings name a
Python object (a model factory, a function parameter of an estimator). The current
directory is searched first, as ``python -m`` does.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import ConfigError

__all__ = ["ENV", "import_modules", "import_from_env", "export_to_env", "resolve", "parse_value"]

#: the environment variable read by :func:`import_from_env`
ENV = "STELAB_IMPORT"


def _cwd_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def import_modules(names: list[str] | tuple[str, ...], source: str = "--import") -> list[Any]:
    """Import each module name (dotted, e.g. ``mypkg.estimators``); a ConfigError naming
    ``source`` and the module if an import fails (with the first line of its error)."""
    _cwd_on_path()
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"{source} must name a Python module (dotted identifiers, e.g. mypkg.ests), "
                f"got {name!r}"
            )
        try:
            out.append(importlib.import_module(name))
        except Exception as e:  # the user's module may raise anything while importing
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"{source} {name!r}: cannot import it: {type(e).__name__}: {first}"
            ) from None
    return out


def import_from_env() -> list[Any]:
    """Import the modules listed in ``STELAB_IMPORT`` (``os.pathsep``-separated)."""
    value = os.environ.get(ENV, "")
    return import_modules([v for v in value.split(os.pathsep) if v.strip()], source=ENV)


def export_to_env(names: list[str] | tuple[str, ...]) -> None:
    """Add module names to ``STELAB_IMPORT`` so processes started from this one (data-parallel
    training workers) can import the same user code with :func:`import_from_env`."""
    have = [v for v in os.environ.get(ENV, "").split(os.pathsep) if v.strip()]
    new = have + [n.strip() for n in names if n.strip() and n.strip() not in have]
    if new != have:
        os.environ[ENV] = os.pathsep.join(new)


def resolve(spec: str, what: str = "object") -> Any:
    """The object named by ``"MODULE:NAME"`` (``NAME`` may be dotted: ``mod:Class.make``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ConfigError(f"{what} must be MODULE:NAME (e.g. mymod:build), got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if not mod_name.strip() or not attr.strip():
        raise ConfigError(f"{what} must be MODULE:NAME (e.g. mymod:build), got {spec!r}")
    (mod,) = import_modules([mod_name], source=what)
    obj: Any = mod
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def parse_value(text: str) -> Any:
    """A command-line parameter value: ``true``/``false``, an int, a float, ``none``,
    ``MODULE:NAME`` (the Python object it names), else the string itself (a name)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.count(":") == 1 and all(
        p.replace(".", "").replace("_", "").isalnum() for p in text.split(":")
    ):
        return resolve(text, "parameter value")
    return text
