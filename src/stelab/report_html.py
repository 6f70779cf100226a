"""HTML pieces shared by the reproduction report and ``stelab report``.

Pages are self-contained: inline CSS, no scripts, no external resources; images are
either relative links to files next to the page or embedded as ``data:`` URIs. Long
text is folded with ``<details>``. Verdicts have one colour each:

=============  ==========  =================================
verdict        colour      meaning
=============  ==========  =================================
reproduced     green       the paper's claim holds here
partly         amber       it holds in part
not            red         it does not hold here
skipped        grey        the part could not run here
=============  ==========  =================================
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "VERDICT_COLOURS",
    "Anchors",
    "badge",
    "embed_images",
    "esc",
    "fold",
    "one_line",
    "page",
    "render_markdown",
]

# (text, background) per verdict; anything else is drawn like "skipped"
VERDICT_COLOURS: dict[str, tuple[str, str]] = {
    "reproduced": ("#ffffff", "#1a7f37"),
    "partly": ("#1f1f1f", "#f0b429"),
    "not": ("#ffffff", "#c62828"),
    "skipped": ("#ffffff", "#6b7280"),
}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1180px;margin:1.5em auto;
padding:0 1em;line-height:1.45;color:#1f2328}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #d0d7de;padding:4px 8px;
vertical-align:top}th{background:#f6f8fa;text-align:left}td.num{text-align:right;
font-variant-numeric:tabular-nums}img{max-width:100%}code{background:#f2f4f6;padding:0 .25em;
border-radius:3px}
.badge{display:inline-block;min-width:6.5em;text-align:center;border-radius:4px;padding:1px 6px;
font-weight:600;font-size:.9em}
.grid{font-size:.92em}.grid td.paper{font-weight:600;background:#fafbfc}
.grid td.paper code.cmd{font-weight:400;font-size:.85em;white-space:nowrap}
.grid td.claim{max-width:24em}.grid td.why{max-width:30em}
.grid td.links{white-space:nowrap;font-size:.9em}.grid tr:hover td{background:#f6f8fa}
.counts span{margin-right:.6em}.muted{color:#656d76}
details>summary{cursor:pointer}details.evidence>summary{color:#24292f}
.best{font-weight:700}
"""


def esc(text: object) -> str:
    """``text`` escaped for HTML element content and quoted attributes."""
    return html.escape(str(text), quote=True)


def colours(verdict: str) -> tuple[str, str]:
    """(text colour, background) of ``verdict``: :data:`VERDICT_COLOURS`, grey if unknown."""
    return VERDICT_COLOURS.get(verdict, VERDICT_COLOURS["skipped"])


def badge(verdict: str) -> str:
    """A coloured label with the verdict's name."""
    fg, bg = colours(verdict)
    return (
        f'<span class="badge v-{esc(_slug(verdict))}" style="color:{fg};background:{bg}">'
        f"{esc(verdict)}</span>"
    )


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z(\[])")


def one_line(text: str, limit: int = 160) -> str:
    """The first sentence of ``text`` (whitespace collapsed), cut to ``limit`` characters
    with an ellipsis: the one-line reason shown for a claim."""
    flat = " ".join(str(text).split())
    first = _SENTENCE_END.split(flat, maxsplit=1)[0]
    if len(first) > limit:
        cut = first[: limit - 1]
        first = (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2 :] else cut) + "…"
    return first


def fold(text: str, limit: int = 220) -> str:
    """``text`` as HTML; longer than ``limit`` characters it is folded behind its first line."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return esc(flat)
    return (
        f'<details class="evidence"><summary>{esc(one_line(flat, 120))}</summary>'
        f"<p>{esc(flat)}</p></details>"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-").lower() or "x"


class Anchors:
    """Unique HTML ids made from text (``yin2019/fake (a)`` → ``yin2019-fake-a``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: object) -> str:
        base = "-".join(_slug(str(p)) for p in parts)
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}-{i}"
        self.used.add(name)
        return name


def render_markdown(md: str, demote: int = 0) -> str:
    """CommonMark with tables to HTML; headings moved down by ``demote`` levels (max h6)."""
    from markdown_it import MarkdownIt

    if demote:
        md = re.sub(
            r"^(#{1,6})(?=\s)", lambda m: "#" * min(6, len(m.group(1)) + demote), md, flags=re.M
        )
    return MarkdownIt("commonmark").enable("table").render(md)


_IMG_SRC = re.compile(r'(<img src=")([^"]+)(")')


def embed_images(body: str, root: Path) -> str:
    """Replace local image links in ``body`` (relative to ``root``) by ``data:`` URIs."""

    def embed(m: re.Match[str]) -> str:
        src = html.unescape(m.group(2))
        f = root / src
        if "://" in src or src.startswith("data:") or not f.is_file():
            return m.group(0)
        data = base64.b64encode(f.read_bytes()).decode("ascii")
        mime = "image/svg+xml" if f.suffix.lower() == ".svg" else "image/png"
        return f"{m.group(1)}data:{mime};base64,{data}{m.group(3)}"

    return _IMG_SRC.sub(embed, body)


def image_sources(body: str) -> Iterable[str]:
    """The ``src`` of every ``<img>`` in ``body``."""
    return [html.unescape(m.group(2)) for m in _IMG_SRC.finditer(body)]


def page(title: str, body: str) -> str:
    """A complete HTML document with the shared style."""
    css = " ".join(CSS.split())
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>{css}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
