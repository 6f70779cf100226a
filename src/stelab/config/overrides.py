"""Config files and ``--set KEY=VALUE`` overrides: :func:`load_config`."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StelabError
from .schema import MAX_DEPTH, TrainConfig
from .sections import parse_config
from .tomlio import require_toml


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` → ``(["optim", "lr"], 0.01)``.

    The value is read as a TOML literal (``4``, ``0.1``, ``true``, ``[20, 40]``,
    ``"text"``, ``{fn = "sign"}``); anything that is not one is taken as a bare
    string (``data.name=digits``, ``model.weights=sign:ste``).
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"--set needs KEY=VALUE with a dotted key (e.g. optim.lr=0.01), got {text!r}"
        )
    key, _, value = text.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z0-9_\-]+", p) for p in parts):
        raise ConfigError(f"--set key must be dotted names like optim.lr, got {key.strip()!r}")
    value = value.strip()
    toml = require_toml()
    try:
        parsed = toml.loads(f"v = {value}")["v"]
    except toml.TOMLDecodeError:
        parsed = value
    except RecursionError:
        raise ConfigError(
            f"--set {key.strip()}: the value is nested too deeply to read "
            f"(more than {MAX_DEPTH} levels are not allowed)"
        ) from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with every ``KEY=VALUE`` of ``overrides`` set (:func:`parse_override`)."""
    out = copy.deepcopy(dict(raw))  # TOML values: may hold dates, which JSON cannot copy
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {text}: {'.'.join(parts[: i + 1])} is a value, not a table"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config (or start from the defaults when ``path`` is None), apply
    ``--set`` style ``overrides`` and validate.

    Errors name the file, the section and key, the bad value and what is allowed.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist or is not a file")
        toml = require_toml()
        try:
            raw = toml.loads(p.read_text(encoding="utf-8"))
        except toml.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason})") from None
        except RecursionError:
            raise ConfigError(
                f"{p}: not valid TOML for stelab: arrays or tables nested too deeply "
                f"(more than {MAX_DEPTH} levels are allowed in a config)"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if overrides:
        raw = apply_overrides(raw, list(overrides))
    try:
        return parse_config(raw)
    except StelabError as e:
        shown = " ".join(overrides).encode("utf-8", "backslashreplace").decode("utf-8")
        where = source + (" with --set " + shown if overrides else "")
        raise type(e)(f"{where}: {e}") from None
