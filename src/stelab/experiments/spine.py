"""The vocabulary every reproduction part speaks: claims, part results, one cache, one writer.

A *paper* is a package under :mod:`stelab.experiments` (``yin2019/``, ``psa2020/``,
``disguise2024/``) whose ``__init__`` defines ``PAPER = Paper(...)`` naming its parts; the
package is listed once in :data:`stelab.experiments.reproduce.PAPER_PACKAGES`. A *part* is
a module with::

    def run(out_dir: Path, *, quick: bool = False, seed: int = 0,
            progress: bool = True) -> PartResult

that computes its numbers, judges its claims with pure verdict rules (functions of the
numbers only, tested at their thresholds), and hands everything to :func:`write_part`,
which writes ``results.json`` and ``report.md`` atomically. A part that cannot run here
returns :func:`skipped`.

Split a part by concern: the experiment (presets, computing numbers) in one module, its
report (claims with their rules, figures, markdown) in another. See docs/adding-a-paper.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..errors import ConfigError, StelabTypeError, check_int
from ..io import atomic_write_text, write_json

__all__ = [
    "VERDICTS",
    "Claim",
    "Paper",
    "PartResult",
    "cached",
    "jsonable",
    "ladder",
    "part_dir",
    "skipped",
    "write_part",
]

Verdict = Literal["reproduced", "partly", "not"]
VERDICTS: tuple[str, ...] = ("reproduced", "partly", "not")

T = TypeVar("T")


def ladder(*, reproduced: bool, partly: bool) -> str:
    """The three-step verdict: ``reproduced`` if the full condition holds, else ``partly``
    if the weaker one does, else ``not``."""
    return "reproduced" if reproduced else ("partly" if partly else "not")


@dataclass(frozen=True)
class Claim:
    """One claim of a paper and how this run judged it.

    ``checks`` holds the named booleans / numbers the verdict rule used, so a reader of
    ``results.json`` sees why.
    """

    id: str
    text: str
    verdict: str
    evidence: str
    checks: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ConfigError(
                f"claim {self.id!r}: verdict must be one of {', '.join(VERDICTS)}, "
                f"got {self.verdict!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "verdict": self.verdict,
            "evidence": self.evidence,
        }
        if self.checks:
            d["checks"] = jsonable(dict(self.checks))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claim:
        return cls(
            id=str(d.get("id", "")),
            text=str(d.get("text", "")),
            verdict=str(d.get("verdict", "")),
            evidence=str(d.get("evidence", "")),
            checks=dict(d.get("checks") or {}),
        )


@dataclass
class PartResult:
    """What a part's ``run`` returns (and :func:`write_part` wrote).

    ``figures`` are paths of the written figures; ``skipped`` is the reason a part could
    not run here (then ``claims`` is empty and nothing was written).
    """

    name: str
    claims: list[Claim]
    out_dir: Path | None = None
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict ``stelab reproduce`` stores in ``done.json``."""
        d: dict[str, Any] = {
            "name": self.name,
            "claims": [c.to_dict() for c in self.claims],
            "seconds": self.seconds,
            **self.extra,
        }
        if self.skipped is not None:
            d["skipped"] = self.skipped
        if self.out_dir is not None:
            d["figures"] = [str(f) for f in self.figures]
            d["results"] = str(self.out_dir / "results.json")
            d["report"] = str(self.out_dir / "report.md")
        return d


def part_dir(out_dir: Any, seed: Any, *, seed_max: int = 2**32 - 1) -> tuple[Path, int]:
    """The checks every part's ``run`` starts with: ``out_dir`` must be a path (created
    if missing) and ``seed`` an integer in [0, ``seed_max``]; returns both, checked."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise StelabTypeError(f"out_dir must be a path, got {out_dir!r}")
    seed = check_int("seed", seed, 0, seed_max)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, seed


def skipped(name: str, reason: str) -> PartResult:
    """The result of a part that cannot run here (data missing, not in quick mode ...)."""
    return PartResult(name=name, claims=[], skipped=reason)


def jsonable(x: Any) -> Any:
    """``x`` with tensors, numpy values, tuples, paths and dataclass-likes made JSON-able;
    non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist") and callable(x.tolist):  # torch / numpy arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    return str(x)


def write_part(
    out_dir: Path,
    *,
    name: str,
    claims: Sequence[Claim],
    results: Mapping[str, Any],
    report: str,
    figures: Sequence[str | Path] = (),
    started: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> PartResult:
    """Write a part's ``results.json`` (``results`` plus the claims and the wall time) and
    ``report.md``, each atomically, and return its :class:`PartResult`.

    ``figures`` are file names in ``out_dir`` (or paths); ``started`` is the
    ``time.perf_counter()`` at the start of the part.
    """
    out_dir = Path(out_dir)
    seconds = time.perf_counter() - started if started is not None else 0.0
    res = jsonable(dict(results))
    res["claims"] = [c.to_dict() for c in claims]
    res["seconds"] = seconds
    write_json(out_dir / "results.json", res)
    atomic_write_text(out_dir / "report.md", report)
    return PartResult(
        name=name,
        claims=list(claims),
        out_dir=out_dir,
        figures=[
            str(out_dir / Path(f).name) if not Path(f).is_absolute() else str(f) for f in figures
        ],
        seconds=seconds,
        extra=dict(extra or {}),
    )


def cached(
    path: Path,
    key: Mapping[str, Any],
    compute: Callable[[], T],
    *,
    dump: Callable[[T], Any] = jsonable,
    load: Callable[[Any], T] | None = None,
) -> tuple[T, bool]:
    """The one cache of expensive intermediate results: ``(value, reused)``.

    ``path`` is a JSON file holding ``{"key": key, "value": dump(value)}``. If it exists,
    reads, and its key equals ``jsonable(key)``, the stored value is returned (through
    ``load`` if given) with ``reused=True``; otherwise ``compute()`` runs and its result is
    written atomically. A corrupt or foreign file is recomputed, never trusted.
    """
    path = Path(path)
    want = jsonable(dict(key))
    try:
        d = json.loads(path.read_text())
        if isinstance(d, dict) and d.get("key") == want and "value" in d:
            return (load(d["value"]) if load is not None else d["value"]), True
    except (OSError, ValueError):
        pass
    value = compute()
    write_json(path, {"key": want, "value": dump(value)})
    return value, False


@dataclass(frozen=True)
class Paper:
    """A paper's entry in ``stelab reproduce``: ``parts`` maps a part's name to its module
    (a dotted path, imported only when the part runs); parts run in this order."""

    key: str
    title: str
    parts: dict[str, str]
