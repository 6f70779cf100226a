"""``stelab reproduce``: run each paper's reproduction parts and write one report.

Papers are packages of :mod:`stelab.experiments` listed in :data:`PAPER_PACKAGES`;
each names its parts (:class:`stelab.experiments.spine.Paper`). A part is a module
with ``run(out_dir, *, quick, seed, progress)`` that writes its figures,
``results.json`` and ``report.md`` into ``out_dir`` and returns a
:class:`~stelab.experiments.spine.PartResult` (``spine.skipped(...)`` when it cannot
run here: data missing, not in quick mode). Parts added with :func:`register_part`
may instead return a dict with at least ``{"claims": [...]}`` (or ``"skipped"``).
Parts are resumable: a finished part leaves ``done.json`` (written
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

import importlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, unknown
from ..io import atomic_write_text, write_json
from .display import Display
from .spine import Paper, PartResult
from .verdicts import verdict_rows

# One line per paper: a package of stelab.experiments whose ``__init__`` defines
# ``PAPER = spine.Paper(...)`` (see docs/adding-a-paper.md).
PAPER_PACKAGES: tuple[str, ...] = ("yin2019", "psa2020", "disguise2024")


def _load_papers() -> dict[str, dict[str, Any]]:
    papers: dict[str, dict[str, Any]] = {}
    for pkg in PAPER_PACKAGES:
        paper: Paper = importlib.import_module(f"stelab.experiments.{pkg}").PAPER
        papers[paper.key] = {"title": paper.title, "parts": dict(paper.parts)}
    return papers


PAPERS: dict[str, dict[str, Any]] = _load_papers()


def register_paper(paper: Paper | str) -> None:
    """Add a paper to ``stelab reproduce``: a :class:`~stelab.experiments.spine.Paper`, or
    the dotted name of a package whose ``__init__`` defines ``PAPER`` (how a paper outside
    stelab registers itself, e.g. from a module loaded with ``--import``)."""
    if isinstance(paper, str):
        paper = importlib.import_module(paper).PAPER
    if not isinstance(paper, Paper):
        raise ConfigError(f"paper must be a stelab.experiments.spine.Paper, got {paper!r}")
    if not paper.parts:
        raise ConfigError(f"paper {paper.key!r} has no parts")
    PAPERS[paper.key] = {"title": paper.title, "parts": dict(paper.parts)}


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
    verbose: bool = False,
    quiet: bool = False,
) -> Path:
    """Run the parts of ``papers`` (``["all"]`` for every paper) into ``out``.

    Returns the path of ``report.md``. Finished parts (same ``quick`` and
    ``seed``) are reused unless ``rerun``.

    What it says: ``log`` gets one line when a part starts and one when it ends
    (or is reused, skipped, or runs again, and why). With ``progress`` on a terminal
    (stderr) the start lines give way to live bars instead: all parts (with an
    ETA), the running part, and its current training run (epoch k of n, with an
    ETA), fed by the ``stelab.train`` log. ``verbose`` lets the parts print their
    own per-epoch lines and bars (and turns the live bars off); ``quiet`` says
    nothing but errors. Each training run's full per-epoch log is its run folder's
    ``train.log`` either way.
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
    say: Callable[[str], Any] = (lambda s: None) if quiet else log
    with Display(len(parts), bars=progress and not verbose and not quiet, log=say) as show:
        for i, (paper, part, mod) in enumerate(parts):
            name = f"{paper}/{part}"
            d = out / paper / part
            done = d / "done.json"
            if done.exists() and not done.is_file():
                raise ConfigError(
                    f"{str(done)!r} is not a file; stelab keeps its record of the finished "
                    "part there: move it away"
                )
            if done.exists() and not rerun:
                prev, why = check_finished(d, mode)
                if prev is not None:
                    results[(paper, part)] = prev
                    show.end(name, f"{name}: reused finished part ({_verdicts(prev)})")
                    continue
                say(f"{name}: running again: {why}")
            if done.exists():
                done.unlink()  # stale: a run interrupted from here on must not look finished
            show.start(name, i)
            t0 = time.perf_counter()
            module = importlib.import_module(mod if "." in mod else f"stelab.experiments.{mod}")
            r = module.run(d, quick=quick, seed=seed, progress=verbose)
            if isinstance(r, PartResult):
                r = r.to_dict()
            if r.get("skipped"):
                results[(paper, part)] = {"claims": [], "skipped": str(r["skipped"])}
                show.end(name, f"{name}: skipped ({r['skipped']})")
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
            show.end(name, f"{name}: {_verdicts(r)} ({r['seconds']:.0f} s)")
    md = _report_md(papers, parts, results, out, mode)
    path = atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", _report_html(papers, parts, results, out, mode))
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
        skipped = [
            (part, results[(p, part)]["skipped"])
            for p, part in mine
            if results[(p, part)].get("skipped")
        ]
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


def _command(paper: str, mode: dict[str, Any]) -> str:
    """The command line that reproduces ``paper`` in ``mode``."""
    cmd = f"stelab reproduce {paper}"
    if mode.get("quick"):
        cmd += " --quick"
    if mode.get("seed"):
        cmd += f" --seed {mode['seed']}"
    return cmd


def _claim_rows(
    papers: list[str],
    parts: list[tuple[str, str, str]],
    results: dict[tuple[str, str], dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per claim (a skipped part or a paper without parts is one grey row), with
    the one-line reason: the claim's optional ``summary``, else its evidence's first
    sentence."""
    from ..report_html import one_line

    rows = []
    for paper in papers:
        mine = [part for p, part, _ in parts if p == paper]
        if not mine:
            rows.append(
                {
                    "paper": paper,
                    "part": None,
                    "claim": None,
                    "verdict": "skipped",
                    "reason": "no reproduction part of this paper is available yet",
                }
            )
        for part in mine:
            r = results[(paper, part)]
            if r.get("skipped"):
                rows.append(
                    {
                        "paper": paper,
                        "part": part,
                        "claim": None,
                        "verdict": "skipped",
                        "reason": one_line(str(r["skipped"]), 200),
                    }
                )
                continue
            for c in r.get("claims", []):
                reason = c.get("summary") or c.get("evidence", "")
                rows.append(
                    {
                        "paper": paper,
                        "part": part,
                        "claim": c,
                        "verdict": str(c.get("verdict", "?")),
                        "reason": one_line(str(reason), 120),
                    }
                )
    return rows


def _report_html(
    papers: list[str],
    parts: list[tuple[str, str, str]],
    results: dict[tuple[str, str], dict[str, Any]],
    out: Path,
    mode: dict[str, Any],
) -> str:
    """The HTML report: a one-screen summary grid (papers × claims, coloured verdicts,
    one-line reasons, links to each claim's evidence, its part's figures and the command),
    then per paper its claims with the evidence (long evidence folded) and each part's
    own report with its figures embedded."""
    from ..report_html import (
        Anchors,
        badge,
        embed_images,
        esc,
        fold,
        one_line,
        page,
        render_markdown,
    )

    anchor = Anchors()
    anchor("summary")
    paper_id = {p: anchor("paper", p) for p in papers}
    part_id = {(p, part): anchor("part", p, part) for p, part, _ in parts}
    fig_id = {(p, part): anchor("figures", p, part) for p, part, _ in parts}
    rows = _claim_rows(papers, parts, results)
    for row in rows:
        c = row["claim"]
        if c is not None:
            row["id"] = anchor("claim", row["paper"], row["part"], c.get("id", ""))
    n_figs = {}
    for p, part, _ in parts:
        files = results[(p, part)].get("files") or []
        n_figs[(p, part)] = sum(1 for f in files if f != "report.md")

    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    order = ["reproduced", "partly", "not", "skipped"]
    kinds = [v for v in order if v in counts] + sorted(set(counts) - set(order))
    h = [
        "<h1>stelab reproduction report</h1>",
        f'<p class="muted">{"Quick" if mode["quick"] else "Full"} mode, seed {mode["seed"]}. '
        "Each claim of a paper gets a verdict (reproduced, partly, not; skipped when its part "
        "could not run here) with its evidence.</p>",
        '<section id="summary"><h2>Summary</h2>',
        '<p class="counts">'
        + "".join(f"<span>{badge(v)} × {counts[v]}</span>" for v in kinds)
        + "</p>",
        '<table class="grid"><thead><tr><th>paper</th><th>part</th><th>claim</th>'
        "<th>verdict</th><th>why</th><th>details</th></tr></thead><tbody>",
    ]
    for paper in papers:
        mine = [row for row in rows if row["paper"] == paper]
        for i, row in enumerate(mine):
            cells = []
            if i == 0:
                cells.append(
                    f'<td class="paper" rowspan="{len(mine)}"><a href="#{paper_id[paper]}">'
                    f'{esc(paper)}</a><br><code class="cmd">{esc(_command(paper, mode))}</code>'
                    "</td>"
                )
            part, c = row["part"], row["claim"]
            key = (paper, part)
            cells.append(
                f'<td><a href="#{part_id[key]}">{esc(part)}</a></td>' if part else "<td>–</td>"
            )
            if c is not None:
                text = str(c.get("text", ""))
                cells.append(
                    f'<td class="claim" title="{esc(" ".join(text.split()))}">'
                    f"({esc(c.get('id', ''))}) {esc(one_line(text, 90))}</td>"
                )
            else:
                cells.append('<td class="claim">–</td>')
            cells.append(f'<td class="verdict">{badge(row["verdict"])}</td>')
            cells.append(f'<td class="why">{esc(row["reason"])}</td>')
            links = []
            if c is not None:
                links.append(f'<a href="#{row["id"]}">evidence</a>')
            if part and n_figs.get(key):
                links.append(f'<a href="#{fig_id[key]}">figures ({n_figs[key]})</a>')
            cells.append(f'<td class="links">{"<br>".join(links)}</td>')
            h.append(
                f'<tr class="row v-{esc(row["verdict"])}" data-verdict="{esc(row["verdict"])}">'
                + "".join(cells)
                + "</tr>"
            )
    h.append("</tbody></table></section>")

    for paper in papers:
        h.append(f'<section id="{paper_id[paper]}"><h2>{esc(PAPERS[paper]["title"])}</h2>')
        h.append(f"<p>Reproduce with <code>{esc(_command(paper, mode))}</code>.</p>")
        mine = [part for p, part, _ in parts if p == paper]
        if not mine:
            h.append("<p>No reproduction part of this paper is available yet.</p></section>")
            continue
        for part in mine:
            key = (paper, part)
            r = results[key]
            h.append(f'<section id="{part_id[key]}"><h3>{esc(paper)} / {esc(part)}</h3>')
            if r.get("skipped"):
                h.append(f"<p>{badge('skipped')} {esc(r['skipped'])}</p></section>")
                continue
            secs = r.get("seconds")
            if isinstance(secs, (int, float)):
                h.append(f'<p class="muted">Ran in {secs:.0f} s.</p>')
            h.append(
                "<table><thead><tr><th>claim</th><th>verdict</th><th>evidence</th></tr>"
                "</thead><tbody>"
            )
            for row in rows:
                c = row["claim"]
                if row["paper"] != paper or row["part"] != part or c is None:
                    continue
                h.append(
                    f'<tr id="{row["id"]}"><td>({esc(c.get("id", ""))}) {esc(c.get("text", ""))}'
                    f"</td><td>{badge(row['verdict'])}</td>"
                    f"<td>{fold(str(c.get('evidence', '')))}</td></tr>"
                )
            h.append("</tbody></table>")
            sub = out / paper / part / "report.md"
            h.append(f'<div id="{fig_id[key]}">')
            if sub.is_file():
                body = render_markdown(sub.read_text(encoding="utf-8", errors="replace"), 3)
                h.append(
                    f"<details open><summary>The part's report: tables and figures</summary>"
                    f"{embed_images(body, sub.parent)}</details>"
                )
            else:
                h.append(f"<p><em>{esc(part)}: the part wrote no report.md.</em></p>")
            h.append("</div></section>")
        h.append("</section>")
    return page("stelab reproduction report", "\n".join(h))
