"""A small mutation-testing runner: do the tests of an area notice a small wrong change?

Each mutant is one AST-level edit of one source file (a flipped comparison, a nudged
constant, a dropped term, ...), applied to a temporary *copy* of ``src/`` (the real tree
is never edited); the area's tests then run against the copy (``PYTHONPATH``). A mutant
is *caught* when the tests fail, *timeout* when they run past the per-mutant limit
(counted separately), *survived* when they pass. A survivor is either an equivalent
mutant (no observable change) or a hole in the tests. See docs/testing.md.

    python scripts/mutate.py --list                          # candidates per area
    python scripts/mutate.py --per-area 12 -j 2 --seed 0 \\
        --report docs/testing.md --json mutants.json         # sample, run, report
    python scripts/mutate.py --area sbn --per-area 20
    python scripts/mutate.py --rerun mutants.json        # survivors and timeouts, again
    python scripts/mutate.py --uncovered                 # candidates no test executes

Operators: ``cmp-negate`` (``<`` -> ``>=``, ``==`` -> ``!=``, ``in`` -> ``not in`` ...),
``cmp-boundary`` (``<`` <-> ``<=``, ``>`` <-> ``>=``), ``const`` (a number times
1 +- 1..5 %, an int +- 1), ``drop-term`` (``a + b`` -> ``a`` or ``b``, ``a - b`` -> ``a``),
``arith-swap`` (``+`` <-> ``-``, ``*`` <-> ``/``), ``unary-drop`` (``-x`` -> ``x``,
``not x`` -> ``x``), ``boolop`` (``and`` <-> ``or``), ``return-none`` (``return e`` ->
``return None``), ``del-stmt`` (a call statement such as a restore or an fsync -> ``pass``).
Docstrings, strings, f-strings, type annotations, ``raise`` statements (error messages),
logging/warning calls and ``__repr__`` are never mutated.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import copy
import difflib
import fnmatch
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# The areas: source globs (optionally ``glob::func-pattern|func-pattern``, fnmatch on the
# qualified function name, e.g. ``Class.method``) -> test globs. Edit here when files move.
# ---------------------------------------------------------------------------------------

AREAS: dict[str, dict[str, list[str]]] = {
    "estimators+quantizers": {
        "sources": ["src/stelab/estimators/*.py", "src/stelab/quantizers/*.py"],
        "tests": [
            "tests/test_estimators.py",
            "tests/test_quantizers.py",
            "tests/test_edges.py",
            "tests/test_cyclic_estimators.py",
            "tests/test_backward_paths.py",
            "tests/test_registry.py",
            "tests/test_parameter_ranges.py",
        ],
    },
    "theory": {
        "sources": ["src/stelab/theory/two_layer/*.py"],
        "tests": ["tests/test_theory_two_layer.py", "tests/test_parameter_ranges.py"],
    },
    "sbn": {
        "sources": [
            "src/stelab/sbn/psa.py",
            "src/stelab/sbn/baselines.py",
            "src/stelab/sbn/exact.py",
            "src/stelab/sbn/kernels.py",
            "src/stelab/sbn/noise.py",
            "src/stelab/sbn/estimators.py::sample_path|replicate|surrogate_loss|bcast",
            "src/stelab/sbn/base.py",
        ],
        "tests": [
            "tests/test_sbn_fixed_draws.py",
            "tests/test_sbn_*.py",
            "tests/test_parameter_ranges.py",
        ],
    },
    "disguise": {
        "sources": [
            "src/stelab/disguise/equivalence.py",
            "src/stelab/disguise/derive.py",
            "src/stelab/disguise/table.py",
            "src/stelab/disguise/convert.py",
        ],
        "tests": ["tests/test_disguise.py", "tests/test_parameter_ranges.py"],
    },
    "resume": {
        "sources": [
            "src/stelab/train/checkpoint.py",
            "src/stelab/io.py",
            "src/stelab/train/state.py",
            "src/stelab/train/loop.py::*resume*|*restore*|*checkpoint*|*state*|*save*",
        ],
        "tests": [
            "tests/test_resume_guarantees.py",
            "tests/test_io.py",
            "tests/test_fit.py",
            "tests/test_runfolder.py",
            "tests/test_train.py",
        ],
    },
    "verdicts": {
        "sources": ["src/stelab/experiments/*/*_claims.py"],
        "tests": [
            "tests/test_yin2019_verdicts.py",
            "tests/test_psa2020_verdicts.py",
            "tests/test_disguise2024_verdicts.py",
        ],
    },
}

_NEGATE = {
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BOUNDARY = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_QUIET_CALLS = {"debug", "info", "warning", "warn", "error", "exception", "log", "print"}


@dataclass
class Mutant:
    """One edit: replace ``path``'s source between two (line, col) positions."""

    area: str
    path: str  # relative to the repository root
    op: str
    line: int
    col: int
    end_line: int
    end_col: int
    new: str
    old_line: str = ""
    new_line: str = ""
    status: str = ""  # caught / timeout / survived
    seconds: float = 0.0
    detail: str = field(default="", repr=False)

    def key(self) -> str:
        return f"{self.path}:{self.line}:{self.col}:{self.op}:{self.new}"


def apply(source: str, m: Mutant) -> str:
    """``source`` with the mutant's span replaced by ``m.new``."""
    lines = source.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))

    def offset(line: int, col: int) -> int:
        # ast columns are UTF-8 byte offsets
        text = lines[line - 1].encode()[:col].decode()
        return starts[line - 1] + len(text)

    a, b = offset(m.line, m.col), offset(m.end_line, m.end_col)
    return source[:a] + m.new + source[b:]


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                out.add(id(body[0]))
    return out


def _is_quiet_call(node: ast.AST) -> bool:
    """A logging / warning / print call (its arguments are messages)."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in _QUIET_CALLS


class _Collector:
    """Walks a module and proposes mutants, skipping what must not be mutated."""

    def __init__(self, area: str, path: str, source: str, funcs: list[str] | None) -> None:
        self.area, self.path, self.source, self.funcs = area, path, source, funcs
        self.tree = ast.parse(source)
        self.docstrings = _docstring_nodes(self.tree)
        self.out: list[Mutant] = []

    def run(self) -> list[Mutant]:
        self._visit(self.tree, [], self.funcs is None)
        return self.out

    def _add(self, node: ast.AST, op: str, new_node: ast.AST | str) -> None:
        new = new_node if isinstance(new_node, str) else ast.unparse(new_node)
        old = ast.get_source_segment(self.source, node)
        if old is None or new == old:
            return
        if "\n" in new and not isinstance(node, ast.stmt):
            new = f"({new})"
        self.out.append(
            Mutant(
                self.area,
                self.path,
                op,
                node.lineno,
                node.col_offset,
                node.end_lineno,
                node.end_col_offset,
                new,
            )
        )

    def _visit(self, node: ast.AST, scope: list[str], active: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + [node.name]
            if node.name == "__repr__":
                return
            if self.funcs is not None and not isinstance(node, ast.ClassDef):
                qual = ".".join(scope)
                if any(
                    fnmatch.fnmatch(qual, p) or fnmatch.fnmatch(node.name, p) for p in self.funcs
                ):
                    active = True
        if isinstance(node, (ast.Raise, ast.JoinedStr, ast.Assert)) or _is_quiet_call(node):
            return
        if isinstance(node, ast.Expr) and _is_quiet_call(node.value):
            return
        if isinstance(node, ast.Expr) and id(node) in self.docstrings:
            return
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if active:
            self._propose(node)
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            if isinstance(value, list):
                for v in value:
                    if isinstance(v, ast.AST):
                        self._visit(v, scope, active)
            elif isinstance(value, ast.AST):
                self._visit(value, scope, active)

    def _propose(self, node: ast.AST) -> None:
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            t = type(node.ops[0])
            for op, table in (("cmp-negate", _NEGATE), ("cmp-boundary", _BOUNDARY)):
                if t in table:
                    new = copy.deepcopy(node)
                    new.ops = [table[t]()]
                    self._add(node, op, new)
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            v = node.value
            if isinstance(v, int):
                nudged = [v + 1, v - 1] if v not in (0,) else [1]
            else:
                nudged = [v * 1.03, v * 0.97] if v != 0.0 else [0.01]
            for nv in nudged:
                self._add(node, "const", repr(nv))
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.Add, ast.Sub)):
                self._add(node, "drop-term", node.left)
                if isinstance(node.op, ast.Add):
                    self._add(node, "drop-term", node.right)
            if type(node.op) in _ARITH:
                new = copy.deepcopy(node)
                new.op = _ARITH[type(node.op)]()
                self._add(node, "arith-swap", new)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            self._add(node, "unary-drop", node.operand)
        elif isinstance(node, ast.BoolOp):
            new = copy.deepcopy(node)
            new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self._add(node, "boolop", new)
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                self._add(node, "return-none", "return None")
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            self._add(node, "del-stmt", "pass")


def _sources(spec: str) -> list[tuple[str, list[str] | None]]:
    pattern, _, funcs = spec.partition("::")
    paths = sorted(glob.glob(str(ROOT / pattern), recursive=True))
    fl = funcs.split("|") if funcs else None
    return [(str(Path(p).relative_to(ROOT)), fl) for p in paths if p.endswith(".py")]


def _tests(area: str) -> list[str]:
    """The area's test files in table order (list the fast, formula-level files first:
    pytest -x stops at the first failure), each once."""
    out: list[str] = []
    for pat in AREAS[area]["tests"]:
        out += sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / pat)))
    return list(dict.fromkeys(out))


def candidates(area: str) -> list[Mutant]:
    """Every mutant of an area, in a deterministic order."""
    out: list[Mutant] = []
    for spec in AREAS[area]["sources"]:
        for path, funcs in _sources(spec):
            source = (ROOT / path).read_text()
            out += _Collector(area, path, source, funcs).run()
    for m in out:
        _describe(m)
    return out


def _describe(m: Mutant, root: Path = ROOT) -> None:
    """The changed line, before and after (for the report)."""
    source = (root / m.path).read_text()
    before = source.splitlines()
    after = apply(source, m).splitlines()
    diff = [
        d
        for d in difflib.unified_diff(before, after, lineterm="", n=0)
        if d[:1] in "-+" and not d.startswith(("---", "+++"))
    ]
    m.old_line = " ".join(d[1:].strip() for d in diff if d.startswith("-"))
    m.new_line = " ".join(d[1:].strip() for d in diff if d.startswith("+"))


def is_stale(m: Mutant, root: Path = ROOT) -> bool:
    """Whether a mutant read back from an earlier run's JSON no longer fits the source:
    its file is gone, or the line it changes reads differently now (the span would land
    on other text, e.g. after a rename)."""
    path = root / m.path
    if not path.exists():
        return True
    now = Mutant(m.area, m.path, m.op, m.line, m.col, m.end_line, m.end_col, m.new)
    try:
        lines = path.read_text().splitlines()
        if m.end_line > len(lines):
            return True
        _describe(now, root)
    except (IndexError, UnicodeDecodeError):
        return True
    return now.old_line != m.old_line


def _pytest(
    tests: list[str], pythonpath: str, timeout: float, cwd: Path = ROOT
) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return ("survived" if r.returncode == 0 else "caught"), time.monotonic() - t0, tail[0]


def run_mutant(m: Mutant, tests: list[str], timeout: float, root: Path = ROOT) -> Mutant:
    """Copy ``root/src`` to a temporary folder, mutate the copy, run the tests against it
    (from ``root``, with ``PYTHONPATH`` = the copy); ``root`` itself is never written."""
    with tempfile.TemporaryDirectory(prefix="stelab-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(root / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        target = Path(tmp) / m.path
        target.write_text(apply(target.read_text(), m))
        m.status, m.seconds, m.detail = _pytest(tests, str(src), timeout, root)
    return m


def uncovered(
    mutants: list[Mutant], tests: list[str], root: Path = ROOT
) -> tuple[list[Mutant], str]:
    """The mutants on lines the tests never execute (certain survivors), from one run of
    the tests under coverage.py; and the tests' last output line."""
    files = sorted({m.path for m in mutants})
    with tempfile.TemporaryDirectory(prefix="stelab-coverage-") as tmp:
        data, out = Path(tmp) / "cov", Path(tmp) / "cov.json"
        env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
        run = [sys.executable, "-m", "coverage", "run", f"--data-file={data}"]
        run += [f"--include={','.join(files)}", "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        r = subprocess.run(run + tests, cwd=root, env=env, capture_output=True, text=True)
        tail = ((r.stdout + r.stderr).strip().splitlines() or [""])[-1]
        if r.returncode != 0:
            sys.exit(f"the tests under coverage failed ({tail}); is coverage installed?")
        js = [sys.executable, "-m", "coverage", "json", f"--data-file={data}", "-o", str(out)]
        subprocess.run(js, cwd=root, env=env, capture_output=True, check=True)
        report = json.loads(out.read_text())["files"]
    missing = {
        (root / path).resolve().relative_to(root.resolve()).as_posix(): set(f["missing_lines"])
        for path, f in report.items()
    }
    never = [m for m in mutants if m.line in missing.get(m.path, set()) or m.path not in missing]
    return never, tail


def baseline(area: str, tests: list[str]) -> float:
    """Seconds the area's tests take unmutated; exits if they fail."""
    status, sec, tail = _pytest(tests, str(ROOT / "src"), 3600)
    if status != "survived":
        sys.exit(f"area {area!r}: the tests fail without any mutant ({tail}); fix them first")
    return sec


def report_md(results: dict[str, list[Mutant]], args: argparse.Namespace) -> str:
    how = (
        f"--rerun {args.rerun}" if args.rerun else f"--per-area {args.per_area} --seed {args.seed}"
    )
    areas = "".join(f" --area {a}" for a in results)
    lines = [
        f"Run: `python scripts/mutate.py {how} -j {args.jobs}{areas}` "
        f"({time.strftime('%Y-%m-%d')}).",
        "",
        "| area | sampled | caught | timeout | survived | caught % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for area, ms in results.items():
        n = len(ms)
        c = sum(m.status == "caught" for m in ms)
        t = sum(m.status == "timeout" for m in ms)
        s = sum(m.status == "survived" for m in ms)
        pct = f"{100 * (c + t) / n:.0f}" if n else "-"
        lines.append(f"| {area} | {n} | {c} | {t} | {s} | {pct} |")
    surv = [m for ms in results.values() for m in ms if m.status == "survived"]
    lines += ["", f"Survivors ({len(surv)}):", ""]
    if surv:
        lines.append("```diff")
        for m in surv:
            lines += [f"# {m.area} {m.path}:{m.line} {m.op}", f"- {m.old_line}", f"+ {m.new_line}"]
        lines.append("```")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- mutate:begin -->", "<!-- mutate:end -->"


def write_report(path: Path, section: str) -> None:
    """Replace the text between the markers in ``path`` (append the markers if absent)."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--area", action="append", choices=sorted(AREAS), help="repeatable")
    p.add_argument("--per-area", type=int, default=12, help="mutants sampled per area")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=None, help="s per mutant (5x baseline)")
    p.add_argument("--list", action="store_true", help="count candidates and exit")
    p.add_argument(
        "--uncovered",
        action="store_true",
        help="list the candidates on lines the area's tests never run (needs coverage)",
    )
    p.add_argument("--report", type=Path, help="markdown file whose mutate section to rewrite")
    p.add_argument("--json", type=Path, help="write every sampled mutant and its outcome")
    p.add_argument(
        "--rerun",
        type=Path,
        help="a --json file of an earlier run: run its survivors and timeouts again",
    )
    args = p.parse_args(argv)
    if args.per_area < 1 or args.jobs < 1:
        p.error(f"--per-area and -j must be >= 1, got {args.per_area} and {args.jobs}")
    areas = args.area or list(AREAS)
    if args.list:
        for area in areas:
            ms = candidates(area)
            ops: dict[str, int] = {}
            for m in ms:
                ops[m.op] = ops.get(m.op, 0) + 1
            print(f"{area}: {len(ms)} candidates {dict(sorted(ops.items()))}")
        return 0
    if args.uncovered:
        for area in areas:
            ms = candidates(area)
            never, tail = uncovered(ms, _tests(area))
            print(f"{area}: {len(never)} of {len(ms)} candidates on lines no test runs ({tail})")
            for path in sorted({m.path for m in never}):
                lines = sorted({m.line for m in never if m.path == path})
                print(f"  {path}: {', '.join(map(str, lines))}")
        return 0
    rerun: dict[str, list[Mutant]] = {}
    if args.rerun:
        fields = set(Mutant.__dataclass_fields__)
        for d in json.loads(args.rerun.read_text()):
            if d["status"] in ("survived", "timeout") and d["area"] in areas:
                m = Mutant(**{k: v for k, v in d.items() if k in fields})
                m.status, m.seconds, m.detail = "", 0.0, ""
                if is_stale(m):
                    print(
                        f"stale, skipped (the source changed since): {m.path}:{m.line} "
                        f"{m.op}: {m.old_line}",
                        file=sys.stderr,
                    )
                    continue
                rerun.setdefault(m.area, []).append(m)
        areas = [a for a in areas if a in rerun]
    results: dict[str, list[Mutant]] = {}
    for area in areas:
        tests = _tests(area)
        pool = rerun.get(area) or candidates(area)
        if not tests or not pool:
            print(f"{area}: no tests or no candidates, skipped", file=sys.stderr)
            continue
        if area in rerun:
            sample = pool
        else:
            rng = random.Random(f"{args.seed}:{area}")
            sample = rng.sample(pool, min(args.per_area, len(pool)))
        base = baseline(area, tests)
        # 5x: the baseline runs alone, the mutants -j at a time on a shared machine
        timeout = args.timeout or max(120.0, 5.0 * base)
        print(
            f"{area}: {len(sample)} of {len(pool)} mutants, tests {base:.0f} s, "
            f"timeout {timeout:.0f} s",
            flush=True,
        )
        with cf.ThreadPoolExecutor(args.jobs) as ex:
            done = list(ex.map(lambda m, t=tests, to=timeout: run_mutant(m, t, to), sample))
        for m in done:
            print(f"  {m.status:8s} {m.path}:{m.line} {m.op}: {m.new_line}", flush=True)
        results[area] = done
    section = report_md(results, args)
    print(section)
    if args.report:
        write_report(args.report, section)
    if args.json:
        args.json.write_text(
            json.dumps([asdict(m) for ms in results.values() for m in ms], indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
