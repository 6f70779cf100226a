"""The one spec grammar: ``"name[:name...][:key=value...]"`` strings and dicts.

Used by :func:`stelab.quantize` (``"uniform:ste:bits=4:step=0.1"``), configs
(``model.weights``), the analysis specs (``"concrete:tau=0.1"``, ``"det:ste"``,
``"dsq:k=3"``) and the CLI. A spec string is colon-separated: first the names
(a quantizer and its estimator, or a mode and an estimator), then ``key=value``
parameters. Values are read by :func:`stelab.plugins.parse_value`: ``true`` /
``false``, ``none``, an int, a float, ``MODULE:NAME`` (a Python object; a piece
without ``=`` after the first parameter continues the previous value, so
``periodic:func=mymod:bump`` keeps its callable), else the text itself.

Only the grammar lives here; names are checked against the registries by their
users (:data:`stelab.quantizers.FORWARDS`, :data:`stelab.estimators.REGISTRY`,
:data:`stelab.sbn.base.ESTIMATORS`). Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, StelabTypeError

__all__ = ["split_spec", "parse_param", "quant_spec", "QUANT_SPEC_HELP"]

#: how a quantizer spec is written (for error messages)
QUANT_SPEC_HELP = "'fn', 'fn:estimator' or 'fn:estimator:key=value' (e.g. 'uniform:ste:bits=4')"


def split_spec(
    spec: str, *, what: str = "estimator", example: str = "concrete:tau=0.1"
) -> tuple[list[str], dict[str, Any]]:
    """``"a:b:k=v:k2=v2"`` -> ``(["a", "b"], {"k": v, "k2": v2})``.

    ``what`` and ``example`` go into the error messages (an empty spec, a piece
    that is not ``KEY=VALUE`` after the first parameter, a key given twice).
    """
    if not isinstance(spec, str):
        raise StelabTypeError(f"a {what} spec must be a string, got {type(spec).__name__}")
    names: list[str] = []
    pieces: list[str] = []
    for piece in spec.strip().split(":"):
        if pieces and "=" not in piece:
            pieces[-1] += ":" + piece  # MODULE:NAME inside a value
        elif pieces or "=" in piece:
            pieces.append(piece)
        else:
            names.append(piece.strip())
    if not names or not names[0]:
        raise ConfigError(f"empty {what} spec {spec!r}; e.g. {example!r}")
    params: dict[str, Any] = {}
    for kv in pieces:
        pair = parse_param(kv)
        if pair is None:
            raise ConfigError(
                f"{what} parameter must be KEY=VALUE, got {kv.strip()!r} in {spec!r} "
                f"(e.g. {example!r})"
            )
        if pair[0] in params:
            raise ConfigError(f"{what} parameter {pair[0]!r} given twice in {spec!r}")
        params[pair[0]] = pair[1]
    return names, params


def parse_param(text: str) -> tuple[str, Any] | None:
    """``"key=value"`` -> ``(key, value)``, the value read by
    :func:`stelab.plugins.parse_value`; None unless both sides are non-empty."""
    from .plugins import parse_value

    k, eq, v = text.partition("=")
    k, v = k.strip(), v.strip()
    if not eq or not k or not v:
        return None
    return k, parse_value(v)


def quant_spec(spec: str | Mapping[str, Any], where: str = "spec") -> dict[str, Any]:
    """A quantizer spec as the dict of :class:`~stelab.quantizers.Quantizer` arguments
    (``fn``, ``estimator``, parameters): ``"sign:approx_sign"`` -> ``{"fn": "sign",
    "estimator": "approx_sign"}``; a dict is copied and must hold ``fn``."""
    if isinstance(spec, str):
        names, params = split_spec(spec, what="quantizer", example="uniform:ste:bits=4")
        if len(names) > 2:
            raise ConfigError(
                f"{where}: quantizer spec {spec!r} has {len(names)} names; write " + QUANT_SPEC_HELP
            )
        out: dict[str, Any] = {"fn": names[0]}
        if len(names) == 2 and names[1]:  # "fn:" is fn with its default estimator
            out["estimator"] = names[1]
        for k in ("fn", "estimator"):
            if k in params:
                raise ConfigError(f"{where}: {k} is given by position in {spec!r}, not as {k}=")
        out.update(params)
        return out
    if isinstance(spec, Mapping):
        out = dict(spec)
        if "fn" not in out:
            raise ConfigError(f"{where} needs a 'fn' key (the quantizer), got {out!r}")
        return out
    raise StelabTypeError(
        f"{where} must be a spec string ({QUANT_SPEC_HELP}) or a dict, got {spec!r} "
        f"({type(spec).__name__})"
    )
