"""The ``stelab`` command line: a thin shell over the public API.

Errors a user can fix (bad names, numbers, files) print one line on stderr and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__


def _hide_flag_types(params: list[Any]) -> list[Any]:
    """Flags take no value: show no ``<bool>`` type for them in the help."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _hide_flag_types(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _hide_flag_types(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    help="stelab: gradient estimators for quantized and binary neural networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"stelab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    import_: Annotated[
        list[str] | None,
        typer.Option(
            "--import",
            help="Import this Python module first (repeatable; also STELAB_IMPORT, "
            "os.pathsep-separated), so the estimators, quantizers and models it registers "
            "are known to every command. May also follow the command name.",
        ),
    ] = None,
) -> None:
    """stelab: gradient estimators for quantized and binary neural networks."""
    from .plugins import export_to_env, import_from_env, import_modules

    import_from_env()
    import_modules(list(import_ or []))
    export_to_env(list(import_ or []))  # for worker processes (they read STELAB_IMPORT)


@app.command()
def estimators(
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw each forward function with its surrogate derivative to this PNG."),
    ] = None,
) -> None:
    """List every estimator with its formula, parameters and the quantizers it serves."""
    from rich.console import Console
    from rich.table import Table

    from .estimators import describe
    from .plots import check_plot_path, new_folder

    if plot is not None:
        check_plot_path(plot)
        created = new_folder(plot)
    rows = describe()
    table = Table(title="stelab estimators: backward rule q̂'(x)", show_lines=False)
    for col in ("name", "q̂'(x)", "parameters", "serves", "default for", "reference"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        default = ", ".join(r["default_for"]) or "-"
        table.add_row(
            r["name"], r["formula"], params, ", ".join(r["serves"]), default, r["reference"]
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    from .estimators import DEFAULTS

    console.print("Default estimator of each quantizer (estimator=None), and why:")
    for kind, (name, why) in DEFAULTS.items():
        console.print(f"  {kind}: {name} - {why}", highlight=False)
    if plot is not None:
        from .plots import plot_estimators

        path = plot_estimators(plot)
        if created is not None:
            typer.echo(f"created folder {created}")
        typer.echo(f"wrote {path}")


# the range of train.seed (stelab.config.SEED_MAX: numpy takes 32-bit seeds); a literal
# here keeps `stelab --help` from importing the config module
_SEED_MAX = 2**32 - 1


@app.command()
def summary(
    model: Annotated[str, typer.Argument(help="Zoo model: lenet5, vgg11, resnet20, convnet.")],
    input_shape: Annotated[
        str, typer.Option(help="Input shape C,H,W (no batch), e.g. 1,28,28.")
    ] = "1,28,28",
    bits: Annotated[
        int | None,
        typer.Option(min=1, max=16, help="Activation bits (omit for float activations)."),
    ] = None,
    estimator: Annotated[str, typer.Option(help="Activation estimator.")] = "clipped_relu",
    weight_bits: Annotated[
        int | None,
        typer.Option(min=2, max=16, help="Quantize weights to this many bits (uniform, LSQ init)."),
    ] = None,
    num_classes: Annotated[int, typer.Option(min=1, help="Number of output classes.")] = 10,
) -> None:
    """Per-layer table of a zoo model: bits, estimator, memory, MACs, compression, and the
    size of its ONNX export next to the float32 size."""
    from . import estimators as _e
    from . import models
    from .errors import ConfigError, unknown
    from .nn import summary as _summary

    try:
        shape = tuple(int(s) for s in input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"--input-shape must be three positive integers C,H,W, got {input_shape!r}"
        )
    if model not in models.names():  # the name first: it is the likeliest typo
        raise unknown("model", model, models.names())
    _e.get(estimator)  # a bad name is an error even when --bits leaves activations float
    models.check_fits(
        model, num_classes=num_classes, in_shape=shape, labels=("--input-shape", "--num-classes")
    )
    weights = None
    if weight_bits is not None:
        weights = {"fn": "uniform", "bits": weight_bits, "step": "auto"}
    m = models.build(
        model,
        num_classes=num_classes,
        in_shape=shape,
        act={"bits": bits, "estimator": estimator} if bits is not None else None,
        weights=weights,
    )
    typer.echo(str(_summary(m, shape)))
    from .export import exported_size

    es = exported_size(m)
    typer.echo(
        f"ONNX export (stelab export): {es.exported_bytes / 1024:.1f} KiB of tensors "
        f"({es.quantized_weights} weights as integers) vs {es.float_bytes / 1024:.1f} KiB "
        f"float32, {es.compression:.2f}x smaller"
    )


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(min=1, max=10_000, help="Epochs per estimator.")] = 8,
    bits: Annotated[int, typer.Option(min=1, max=16, help="Activation bits.")] = 2,
    estimator: Annotated[
        list[str] | None,
        typer.Option("--estimator", "-e", help="Estimators to compare (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=_SEED_MAX, help="Random seed.")] = 0,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress bar per estimator (default: on when stderr is a terminal).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the result lines.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print a line per epoch as well.")
    ] = False,
) -> None:
    """Train LeNet-5 with quantized activations on the bundled digits, once per estimator."""
    from .experiments import demo as _demo

    _check_quiet_verbose(quiet, verbose)
    ests = estimator or ["ste", "clipped_relu"]
    from . import estimators as _e

    for e in ests:
        _e.get(e)  # fail fast on an unknown name
    if progress is None:
        progress = sys.stderr.isatty()
    if not quiet:
        typer.echo(f"Training LeNet-5 on scikit-learn digits ({epochs} epochs per estimator)...")
    _demo.run(
        ests,
        bits=bits,
        epochs=epochs,
        seed=seed,
        log=typer.echo,
        progress=progress and not quiet,
        verbose=verbose,
    )


@app.command()
def disguise(
    estimator: Annotated[str, typer.Argument(help="A weight estimator, e.g. cosine, dsq.")],
    step: Annotated[float, typer.Option(help="Quantizer step Δ.")] = 1.0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="Estimator parameter NAME=VALUE: a number, a name or MODULE:NAME (repeatable).",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw q̂', the map M and the STE-equivalent to this file.")
    ] = None,
) -> None:
    """[S24]: the STE equivalent of a cyclical weight estimator (α, the map M).

    Under SGD (with momentum) the estimator equals the STE with learning rate α·η from
    weights M(w₀). Under Adam, [S24] states the plain STE with the same learning rate
    and weights is the equivalent; stelab measured that only with a short
    second-moment window (β₂ = 0.9, small learning rate), not at β₂ = 0.999.
    """
    from .disguise import disguise_report
    from .errors import ConfigError
    from .specs import parse_param

    params: dict[str, object] = {}
    for p in param or []:
        pair = parse_param(p)
        if pair is None:
            raise ConfigError(
                f"--param must be NAME=VALUE (a number, a name or MODULE:NAME), got {p!r}"
            )
        params[pair[0]] = pair[1]
    created = None
    if plot is not None:
        from .plots import check_plot_path, new_folder

        check_plot_path(plot)
        created = new_folder(plot)
    typer.echo(disguise_report(estimator, step, params, plot))
    if created is not None and created.is_dir():
        typer.echo(f"created folder {created}")


@app.command()
def reproduce(
    paper: Annotated[str, typer.Argument(help="yin2019, psa2020, disguise2024 or all.")] = "all",
    quick: Annotated[
        bool, typer.Option(help="Small settings on data that ships with the install.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Output folder for the report.")] = Path("stelab-out"),
    seed: Annotated[int, typer.Option(min=0, max=_SEED_MAX, help="Random seed.")] = 0,
    rerun: Annotated[bool, typer.Option(help="Run finished parts again.")] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Live progress bars (default: on when stderr is a terminal).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only errors and the final line.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every part's per-epoch lines.")
    ] = False,
) -> None:
    """Reproduce the papers' claims and write report.md + report.html (parts resume).

    One line per part as it starts and ends (on a terminal: live bars with ETAs instead
    of the start lines). Each training run's full per-epoch log is in its folder's
    train.log.
    """
    from .experiments.reproduce import reproduce as _reproduce

    _check_quiet_verbose(quiet, verbose)
    if progress is None:
        progress = sys.stderr.isatty()

    path = _reproduce(
        [paper],
        out,
        quick=quick,
        seed=seed,
        progress=progress,
        rerun=rerun,
        log=typer.echo,
        verbose=verbose,
        quiet=quiet,
    )
    typer.echo(f"report: {path} and {path.with_suffix('.html')}")


def _check_quiet_verbose(quiet: bool, verbose: bool) -> None:
    if quiet and verbose:
        from .errors import ConfigError

        raise ConfigError("--quiet and --verbose exclude each other; give one of them")


def _register_more() -> None:
    from . import cli_analysis, cli_export, cli_train

    cli_train.register(app)
    cli_analysis.register(app)
    cli_export.register(app)
    for info in app.registered_commands:  # every command's help without `<bool>` on flags
        if info.cls in (None, TyperCommand):
            info.cls = _Command


_register_more()


def _usage_message(e: Exception) -> str:
    """One line from a Typer usage error; a rejected value is appended (``got ...``)
    when Typer's message leaves it out (its range and parse errors do)."""
    msg = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    errors = getattr(e.__cause__, "errors", None)  # pydantic ValidationError behind it
    if callable(errors):
        try:
            first = errors()[0]
        except (IndexError, TypeError, ValueError):
            first = {}
        if "input" in first and repr(first["input"]) not in msg:
            msg += f", got {first['input']!r}"
    return msg


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    return isinstance(e, RuntimeError) and "can't allocate memory" in str(e)


def _hoist_imports(argv: list[str] | None) -> list[str]:
    """Move every ``--import M`` / ``--import=M`` to the front, so it works after the
    command name too (``stelab estimators --import mymod``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest += args[i:]
            break
        if a == "--import" and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith("--import="):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stelab`` console script.

    Every error a user can fix (bad option, name, number, file) prints one line
    ``stelab: error: ...`` on stderr and exits with code 2 (usage errors keep
    Typer's code 2 as well); no traceback. Running out of memory is exit 2 as
    well. Any other exception is a bug in stelab: one line ``stelab: internal
    error: ...`` and exit code 1; ``STELAB_TRACEBACK=1`` shows its traceback.
    """
    import os

    from typer.exceptions import TyperException

    from .errors import StelabError

    try:
        rv = app(args=_hoist_imports(argv), prog_name="stelab", standalone_mode=False)
    except TyperException as e:  # usage errors: bad option, missing argument
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `stelab`: the help was printed
            return 0
        typer.echo(f"stelab: error: {_usage_message(e)}", err=True)
        return getattr(e, "exit_code", 2) or 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("stelab: interrupted", err=True)
        return 130
    except (StelabError, ValueError, TypeError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        typer.echo(f"stelab: error: {msg}", err=True)
        return 2
    except Exception as e:
        if os.environ.get("STELAB_TRACEBACK"):
            raise
        msg = " ".join(str(e).split())[:500]
        if _is_out_of_memory(e):
            typer.echo(f"stelab: error: not enough memory for this request ({msg})", err=True)
            return 2
        typer.echo(
            f"stelab: internal error: {type(e).__name__}: {msg} (a bug in stelab; please "
            "report it, with the traceback that STELAB_TRACEBACK=1 shows)",
            err=True,
        )
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
