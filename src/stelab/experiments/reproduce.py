"""``stelab reproduce``: run each paper's reproduction parts and write one report.

Every part is a module in :mod:`stelab.experiments` with
``run(out_dir, *, quick, seed, progress) -> dict`` that writes its figures,
``results.json`` and ``report.md`` into ``out_dir`` and returns at least
``{"claims": [{"id", "text", "verdict", "evidence"}, ...]}``, or
``{"claims": [], "skipped": reason}`` when it cannot run here (data missing, not in
quick mode). Parts are resumable: a finished part leaves ``done.json`` (written
last, atomically: mode, claims, and the files the report needs) and is reused on
the next run with the same mode and seed, but only after checking that
``done.json`` has that shape and that every file it lists (its ``report.md`` and
the figures linked there) still exists; otherwise the part runs again and one line
says why. A skipped part is tried again.

The report (``report.md`` and a self-contained ``report.html`` with the plots
embedded) gives, per paper, a verdict table of every claim and then each
part's own section.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, unknown
from ..io import atomic_write_text, write_json
from .verdicts import verdict_rows

PAPERS: dict[str, dict[str, Any]] = {
    "yin2019": {
        "title": "[Y19] Yin et al., Understanding Straight-Through Estimator in Training "
        "Activation Quantized Neural Nets (ICLR 2019)",
        "parts": {
            "synthetic": "yin2019_synthetic",
            "table1": "yin2019_table1",
            "instability": "yin2019_instability",  # after table1: reuses its cells
            "table1-cifar10": "yin2019_table1_cifar",  # full mode with CIFAR-10 only
        },
    },
    "psa2020": {
        "title": "[S20] Shekhovtsov, Yanush, Flach, Path Sample-Analytic Gradient Estimators "
        "for Stochastic Binary Networks (NeurIPS 2020)",
        "parts": {"gradeval": "psa2020_gradeval", "training": "psa2020_training"},
    },
    "disguise2024": {
        "title": "[S24] Schoenbauer et al., Custom Gradient Estimators are Straight-Through "
        "Estimators in Disguise (2024)",
        "parts": {"trajectories": "disguise2024"},
    },
}


def register_part(paper: str, part: str, module: str) -> None:
    """Add a reproduction part: a module with ``run`` (a bare name is looked up in
    stelab.experiments, a dotted name imported as is)."""
    if paper not in PAPERS:
        raise unknown("paper", paper, PAPERS)
    PAPERS[paper]["parts"][part] = module


def _parts(papers: Sequence[str]) -> list[tuple[str, str, str]]:
    out = []
    for p in papers:
        if p not in PAPERS:
            raise unknown("paper", p, [*PAPERS, "all"])
        out += [(p, part, mod) for part, mod in PAPERS[p]["parts"].items()]
    return out


def reproduce(
    papers: Sequence[str],
    out: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    rerun: bool = False,
    log: Callable[[str], Any] = print,
) -> Path:
    """Run the parts of ``papers`` (``["all"]`` for every paper) into ``out``.

    Returns the path of ``report.md``. Finished parts (same ``quick`` and
    ``seed``) are reused unless ``rerun``.
    """
    papers = list(PAPERS) if list(papers) == ["all"] or not papers else list(papers)
    parts = _parts(papers)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        why = "it is a file" if out.is_file() else e.strerror
        raise ConfigError(f"output folder {str(out)!r} is not writable: {why}") from None
    mode = {"quick": bool(quick), "seed": int(seed)}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for paper, part, mod in parts:
        d = out / paper / part
        done = d / "done.json"
        if done.exists() and not done.is_file():
            raise ConfigError(
                f"{str(done)!r} is not a file; stelab keeps its record of the finished part "
                "there: move it away"
            )
        if done.exists() and not rerun:
            prev, why = check_finished(d, mode)
            if prev is not None:
                results[(paper, part)] = prev
                log(f"{paper}/{part}: reused finished part ({_verdicts(prev)})")
                continue
            log(f"{paper}/{part}: running again: {why}")
        if done.exists():
            done.unlink()  # stale: a run interrupted from here on must not look finished
        t0 = time.perf_counter()
        module = importlib.import_module(mod if "." in mod else f"stelab.experiments.{mod}")
        r = module.run(d, quick=quick, seed=seed, progress=progress)
        if r.get("skipped"):
            results[(paper, part)] = {"claims": [], "skipped": str(r["skipped"])}
            log(f"{paper}/{part}: skipped ({r['skipped']})")
            continue
        r = {
            "mode": mode,
            "seconds": time.perf_counter() - t0,
            "claims": r.get("claims", []),
            "notes": r.get("notes", ""),
            "files": [f for f in _report_files(d) if (d / f).is_file()],
        }
        write_json(done, r)
        results[(paper, part)] = r
        log(f"{paper}/{part}: {_verdicts(r)} ({r['seconds']:.0f} s)")
    md = _report_md(papers, parts, results, out, mode)
    path = atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _html(md, out))
    return path


def _report_files(part_dir: Path) -> list[str]:
    """``report.md`` and the local images it links, relative to ``part_dir``."""
    files = ["report.md"]
    try:
        text = (part_dir / "report.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return files
    for m in _IMG.finditer(text):
        src = m.group(2)
        if "://" not in src and src not in files:
            files.append(src)
    return files


def _fmt_mode(mode: Any) -> str:
    if not isinstance(mode, dict):
        return repr(mode)
    return f"{'quick' if mode.get('quick') else 'full'} mode, seed {mode.get('seed')}"


def check_finished(part_dir: Path, mode: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """``(record, "")`` when the part in ``part_dir`` finished in ``mode`` and can be
    reused, else ``(None, why)``: ``done.json`` unreadable or not of the expected shape
    (an object with ``mode``, a list ``claims`` of objects with ``id``, ``text``,
    ``verdict`` and ``evidence``, and a list ``files``), finished in another mode, or a
    file it lists (or, for a record without ``files``, ``report.md`` and the images
    linked there) missing."""
    done = part_dir / "done.json"
    try:
        rec = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"its done.json is not readable JSON ({' '.join(str(e).split())[:120]})"
    if not isinstance(rec, dict):
        return None, f"its done.json holds a {type(rec).__name__}, not an object"
    if rec.get("mode") != mode:
        return None, (f"it finished in {_fmt_mode(rec.get('mode'))}, this run is {_fmt_mode(mode)}")
    claims = rec.get("claims")
    keys = ("id", "text", "verdict", "evidence")
    if not isinstance(claims, list) or not all(
        isinstance(c, dict) and all(k in c for k in keys) for c in claims
    ):
        return None, "its done.json has no list of claims with id, text, verdict and evidence"
    files = rec.get("files", _report_files(part_dir))
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None, "its done.json has a 'files' entry that is not a list of file names"
    missing = [f for f in files if not (part_dir / f).is_file()]
    if missing:
        what = "report.md" if missing[0] == "report.md" else f"figure {missing[0]}"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return None, f"its {what} is missing{more}"
    return rec, ""


def _verdicts(r: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for c in r.get("claims", []):
        counts[c.get("verdict", "?")] = counts.get(c.get("verdict", "?"), 0) + 1
    if not counts:
        return "no claims"
    return ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))


_IMG = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")


def _report_md(
    papers: list[str],
    parts: list[tuple[str, str, str]],
    results: dict[tuple[str, str], dict[str, Any]],
    out: Path,
    mode: dict[str, Any],
) -> str:
    lines = [
        "# stelab reproduction report",
        "",
        f"Mode: {'quick' if mode['quick'] else 'full'}, seed {mode['seed']}. "
        "Each claim gets a verdict: reproduced, partly, or not, with the evidence.",
        "",
    ]
    for paper in papers:
        lines += [f"## {PAPERS[paper]['title']}", ""]
        mine = [(p, part) for p, part, _ in parts if p == paper]
        if not mine:
            lines += ["No reproduction part of this paper is available yet.", ""]
            continue
        lines += ["| part | claim | verdict | evidence |", "|---|---|---|---|"]
        for key in mine:
            lines += verdict_rows(results[key]["claims"], part=key[1])
        lines.append("")
        skipped = [(part, results[(p, part)]["skipped"]) for p, part in mine
                   if results[(p, part)].get("skipped")]  # fmt: skip
        if skipped:
            lines += [f"Skipped: **{part}**: {why}." for part, why in skipped] + [""]
        for p, part in mine:
            if results[(p, part)].get("skipped"):
                continue
            sub = out / p / part / "report.md"
            if not sub.is_file():
                lines += [f"*{part}: the part wrote no report.md.*", ""]
                continue
            text = sub.read_text(encoding="utf-8", errors="replace")
            # demote headings by two levels and point images at the part's folder
            text = re.sub(r"^(#+)", lambda m: "##" + m.group(1), text, flags=re.M)
            prefix = f"{p}/{part}/"
            text = _IMG.sub(
                lambda m, prefix=prefix: (
                    m.group(1)
                    + (m.group(2) if "://" in m.group(2) else prefix + m.group(2))
                    + m.group(3)
                ),
                text,
            )
            lines += [text.strip(), ""]
    return "\n".join(lines) + "\n"


def _html(md: str, root: Path) -> str:
    """Render ``md`` to a self-contained HTML page (PNGs embedded as data URIs)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(md)

    def embed(m: re.Match[str]) -> str:
        src = m.group(2)
        f = root / src
        if "://" in src or not f.is_file():
            return m.group(0)
        data = base64.b64encode(f.read_bytes()).decode("ascii")
        mime = "image/png" if f.suffix.lower() == ".png" else "image/svg+xml"
        return f"{m.group(1)}data:{mime};base64,{data}{m.group(3)}"

    body = re.sub(r'(<img src=")([^"]+)(")', embed, body)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
        "#ccc;padding:4px 8px;vertical-align:top}img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>stelab reproduction report"
        f"</title><style>{style}</style></head><body>{body}</body></html>\n"
    )
