"""Reading TOML (tomllib, or tomli on Python 3.10) and writing configs back to it."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, StelabTypeError
from .schema import SECTIONS, TrainConfig

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested data (None values left out): TOML-, JSON- and
    ``torch.load(weights_only=True)``-safe."""

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    out: dict[str, Any] = {}
    if cfg.name:
        out["name"] = cfg.name
    for sec in SECTIONS:
        out[sec] = clean(dataclasses.asdict(getattr(cfg, sec)))
    return out


_BARE = re.compile(r"^[A-Za-z0-9_\-]+$")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def toml_string(s: str) -> str:
    r"""``s`` as a TOML basic string: ``"`` and ``\`` escaped, and every control character
    TOML forbids raw (U+0000–U+001F, U+007F) written as ``\b \t \n \f \r`` or
    ``\uXXXX``; everything else (including characters outside the BMP) as itself."""

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _ESCAPES.get(c) or f"\\u{ord(c):04X}"

    return '"' + _NEEDS_ESCAPE.sub(esc, s) + '"'


def _key(k: str) -> str:
    return k if _BARE.match(k) else toml_string(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise StelabTypeError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML text; ``parse_config(tomllib.loads(dump_config(c))) == c``."""
    return dump_dict(config_to_dict(cfg))


def dump_dict(d: Mapping[str, Any]) -> str:
    lines = ["# stelab experiment config (resolved: every key with its value)"]
    if "name" in d:
        lines.append(f"name = {_value(d['name'])}")
    for sec in SECTIONS:
        body = d[sec]
        lines.append("")
        lines.append(f"[{sec}]")
        tables = []
        for k, v in body.items():
            if isinstance(v, Mapping):
                tables.append((k, v))
            else:
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in tables:
            if not v:
                continue
            lines.append("")
            lines.append(f"[{sec}.{_key(k)}]")
            for kk, vv in v.items():
                lines.append(f"{_key(str(kk))} = {_value(vv)}")
    return "\n".join(lines) + "\n"


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two :func:`config_to_dict` dicts."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif x != y:
            out[prefix] = (x, y)

    walk(a, b, "")
    return out


def require_toml() -> Any:
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(
            "reading TOML configs needs Python >= 3.11 (tomllib) or the 'tomli' package "
            "(pip install tomli)"
        )
    return _toml
