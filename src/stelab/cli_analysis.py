"""``stelab gradcheck``: how accurate are gradient estimators on a given net?

SBNs (the zoo's toy, mlp, conv8) get the [S20] fidelity report; deterministic
quantized nets (the zoo's lenet5, vgg11, resnet20, convnet, or ``MODULE:FACTORY``)
get the descent test and the bias against the stochastic relaxation. The nets, data
and losses are built from the options in :mod:`stelab.cli_problems`; this module runs
the analysis and prints (and with ``--out`` writes) its tables and figures.

Registered on the main app by :func:`register` (called from :mod:`stelab.cli`).
Heavy modules are imported inside the command so ``stelab --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_problems import (
    DET_MODELS,
    SBN_MODELS,
    det_problem,
    parse_floats,
    parse_ints,
    sbn_problem,
)

__all__ = ["register"]


def _run_det(
    net: Any, x: Any, y: Any, desc: str, estimators: str | None, opts: dict[str, Any]
) -> None:
    import time

    from .analysis.det_plots import plot_bias, plot_descent, plot_descent_change
    from .analysis.deterministic import DEFAULT_ETAS, deterministic_fidelity
    from .errors import ConfigError

    out = opts.pop("out")
    etas = opts.pop("etas") or list(DEFAULT_ETAS)
    typer.echo(f"gradcheck: {desc}")
    t0 = time.perf_counter()
    try:
        with _working("descent test and bias against the stochastic relaxation"):
            rep = deterministic_fidelity(
                net, x, y, estimators or "ste,relu,clipped_relu", etas=etas, **opts
            )
    except RuntimeError as e:  # a model that does not accept the data
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"--model does not run on this data: {msg}") from None
    typer.echo(f"estimators on the {rep.where} quantizers: {', '.join(rep.estimators)}")
    groups = ["all"] + (list(rep.layers) if opts.get("per_layer") else [])
    for g in groups:
        typer.echo("")
        typer.echo(rep.descent_table(g))
    typer.echo("")
    typer.echo(rep.bias_table())
    typer.echo("")
    typer.echo(
        "P: fraction of batches whose loss went down after the step -eta*g; held-out: the same "
        "step on a disjoint batch. bias: ||g_est - g_ref||/||g_ref|| less the reference's noise "
        "floor (floor: its standard error); cos: cosine to the reference."
    )
    if out is not None:
        from .io import write_json

        out.mkdir(parents=True, exist_ok=True)
        plot_descent(rep, out / "descent.png", title=desc)
        plot_descent_change(rep, out / "descent_change.png", title=desc)
        plot_bias(rep, out / "bias.png", title=desc)
        write_json(out / "results.json", {"problem": desc, **rep.to_dict()})
        typer.echo(f"wrote {out}/descent.png, descent_change.png, bias.png, results.json")
    typer.echo(f"({time.perf_counter() - t0:.1f} s)")


@contextlib.contextmanager
def _working(what: str) -> Iterator[None]:
    """A spinner with the elapsed time on a terminal while ``what`` runs; nothing
    otherwise (the command has printed what it is doing)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(f"{what} ..."):
        yield


def register(app: typer.Typer) -> None:
    """Add the ``gradcheck`` command to ``app``."""

    @app.command()
    def gradcheck(
        model: Annotated[
            str,
            typer.Option(
                help="SBN: toy (the [S20] 2-5-5-5-1 net on psa-toy), mlp or conv8. "
                "Deterministic quantized net: lenet5, vgg11, resnet20, convnet (see --bits), "
                "or MODULE:FACTORY, a callable returning the model, (model, (x, y)) or "
                "(model, x, y) (load user modules with --import)."
            ),
        ] = "toy",
        estimators: Annotated[
            str | None,
            typer.Option(
                help="Comma-separated estimators. SBN: psa, dst, hard_st, arm, reinforce, "
                "reinforce_loo, concrete:tau=0.1, gumbel_st, tanh_mf, det:STE / sample:STE "
                "(default psa,dst,arm,reinforce). Deterministic net: quantizer estimators "
                "(ste, relu, clipped_relu, dsq:k=3, ewgs, registered ones; default "
                "ste,relu,clipped_relu)."
            ),
        ] = None,
        draws: Annotated[int, typer.Option(help="SBN: one-sample estimates per estimator.")] = 2000,
        sample_sizes: Annotated[
            str | None,
            typer.Option(
                help="SBN: sample sizes M, e.g. 1,10,100 (default 1..9,10..90,... up to draws)."
            ),
        ] = None,
        reference: Annotated[
            str, typer.Option(help="auto (exact when enumerable), exact or mc.")
        ] = "auto",
        reference_samples: Annotated[
            int | None,
            typer.Option(
                help="Draws of the Monte-Carlo reference (default 20000 SBN, 1000 deterministic)."
            ),
        ] = None,
        data: Annotated[
            str | None,
            typer.Option(help="Dataset (default psa-toy for toy, digits otherwise)."),
        ] = None,
        hidden: Annotated[
            str | None, typer.Option(help="Hidden widths of toy/mlp, e.g. 8,8 (mlp default).")
        ] = None,
        channels: Annotated[
            str | None, typer.Option(help="conv8 widths, e.g. 8,16 (default).")
        ] = None,
        examples: Annotated[
            int | None,
            typer.Option(help="Training examples used (default: 200 for SBNs, all otherwise)."),
        ] = None,
        checkpoint: Annotated[
            Path | None, typer.Option(help="Load the model's weights from this state dict (.pt).")
        ] = None,
        bits: Annotated[int, typer.Option(help="Zoo deterministic nets: activation bits.")] = 2,
        weight_bits: Annotated[
            int | None, typer.Option(help="Zoo deterministic nets: weight bits (uniform).")
        ] = None,
        etas: Annotated[
            str | None,
            typer.Option(help="Descent test step sizes, e.g. 0.001,0.01,0.1 (default 1e-4..1)."),
        ] = None,
        batches: Annotated[int, typer.Option(help="Descent test: batches.")] = 20,
        batch_size: Annotated[int, typer.Option(help="Descent test: batch size.")] = 64,
        where: Annotated[
            str,
            typer.Option(
                help="Quantizers that get each estimator: auto (activations if any), "
                "activations, weights or all."
            ),
        ] = "auto",
        per_layer: Annotated[
            bool, typer.Option(help="Descent test also per layer (a step on one layer).")
        ] = False,
        noise_scale: Annotated[
            float, typer.Option(help="Relaxation: logistic noise scale of sign/heaviside.")
        ] = 1.0,
        bias_examples: Annotated[
            int | None,
            typer.Option(
                help="Bias check: examples of the reference batch (default --batch-size); "
                "more examples lower the Monte-Carlo noise floor when they do not interact."
            ),
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the init and of every draw.")] = 0,
        dtype: Annotated[
            str | None,
            typer.Option(help="float64 or float32 (default float64 SBN, float32 otherwise)."),
        ] = None,
        timing: Annotated[bool, typer.Option(help="SBN: measure seconds per draw.")] = True,
        out: Annotated[
            Path | None,
            typer.Option(
                help="Write the figures and results.json here (SBN: rmse, cosine, budget; "
                "deterministic: descent, descent_change, bias)."
            ),
        ] = None,
    ) -> None:
        """Gradient fidelity per layer and estimator. SBNs: relative RMSE, cosine, bias,
        variance, SNR and cost against the exact (or Monte-Carlo) gradient. Deterministic
        quantized nets: the descent test (does a step along each estimator's gradient
        lower the quantized loss?) and the bias against the stochastic relaxation."""

        from .errors import ConfigError, check_int

        if examples is not None and examples < 1:
            raise ConfigError(f"--examples must be an integer >= 1, got {examples}")
        if reference not in ("auto", "exact", "mc"):
            raise ConfigError(f"--reference must be auto, exact or mc, got {reference!r}")
        if out is not None and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
        if model not in SBN_MODELS:
            if model not in DET_MODELS and ":" not in model:
                from .errors import unknown

                raise unknown(
                    "gradcheck model (or MODULE:FACTORY)", model, (*SBN_MODELS, *DET_MODELS)
                )
            from .sbn import SBN

            net, x, y, desc = det_problem(
                model, data, examples, bits, weight_bits, checkpoint, seed, dtype
            )
            if not isinstance(net, SBN):
                _run_det(
                    net,
                    x,
                    y,
                    desc,
                    estimators,
                    {
                        "out": out,
                        "etas": parse_floats("--etas", etas),
                        "batches": check_int("--batches", batches, 1, 10**6),
                        "batch_size": check_int("--batch-size", batch_size, 1, 10**8),
                        "where": where,
                        "per_layer": per_layer,
                        "reference": reference,
                        "reference_samples": 1000
                        if reference_samples is None
                        else check_int("--reference-samples", reference_samples, 2, 2**31),
                        "noise_scale": noise_scale,
                        "bias_examples": bias_examples,
                        "generator": seed,
                    },
                )
                return
            _run_sbn(
                net, x, y, None, desc, estimators, draws, sample_sizes, reference,
                reference_samples, seed, timing, out,
            )  # fmt: skip
            return
        net, x, y, loss_fn, desc = sbn_problem(
            model,
            data,
            parse_ints("--hidden", hidden),
            parse_ints("--channels", channels),
            200 if examples is None else examples,
            checkpoint,
            seed,
            dtype or "float64",
        )
        _run_sbn(
            net, x, y, loss_fn, desc, estimators, draws, sample_sizes, reference,
            reference_samples, seed, timing, out,
        )  # fmt: skip


def _run_sbn(
    net: Any,
    x: Any,
    y: Any,
    loss_fn: Any,
    desc: str,
    estimators: str | None,
    draws: int,
    sample_sizes: str | None,
    reference: str,
    reference_samples: int | None,
    seed: int,
    timing: bool,
    out: Path | None,
) -> None:
    import time

    from .analysis import check_sample_sizes, enumerable, gradient_fidelity, parse_estimators
    from .analysis.plots import plot_budget, plot_cosine, plot_rmse
    from .errors import ConfigError, check_int

    draws = check_int("--draws", draws, 1, 2**31)
    sizes = parse_ints("--sample-sizes", sample_sizes, lo=1) if sample_sizes is not None else None
    sizes = check_sample_sizes(sizes, draws)
    specs = parse_estimators(estimators or "psa,dst,arm,reinforce")
    if loss_fn is None:
        import torch.nn.functional as F

        from . import sbn

        out_features = getattr(net.output, "out_features", 2)
        if out_features == 1:
            loss_fn = sbn.logistic_loss
        else:

            def loss_fn(eta: Any, t: Any) -> Any:
                return F.cross_entropy(eta, t, reduction="none")

    if reference == "exact":
        ok, why = enumerable(net)
        if not ok:
            raise ConfigError(
                f"{why.split('. Use ')[0]}; use --reference mc (Monte-Carlo reference, "
                f"--reference-samples N)"
            )
    typer.echo(f"gradcheck: {desc}; {draws} draws per estimator")
    t0 = time.perf_counter()
    rep = gradient_fidelity(
        net,
        x,
        y,
        loss_fn,
        specs,
        draws=draws,
        sample_sizes=sizes,
        reference=reference,
        reference_samples=reference_samples,
        generator=seed,
        timing=timing,
        # a bar on a terminal; otherwise one line per estimator as it finishes
        progress=True if sys.stderr.isatty() else (lambda line: typer.echo(f"  {line}")),
    )
    for key in rep.layers:
        typer.echo("")
        typer.echo(rep.table(key))
    typer.echo("")
    typer.echo(
        "RMSE@M: relative RMSE of the M-sample average; bias: debiased ||E g - g||/||g||; "
        "floor: its noise level; bias z ~ N(0,1) if unbiased; rel.var: tr Cov / ||g||^2."
    )
    if out is not None:
        from .io import write_json

        out.mkdir(parents=True, exist_ok=True)
        hid = [k for k in rep.layers if k != "output"]
        plot_rmse(rep, out / "rmse.png", title=desc)
        plot_cosine(rep, out / "cosine.png", layers=hid, title=desc)
        if timing:
            plot_budget(rep, out / "budget.png", layers=hid, title=desc)
        write_json(out / "results.json", {"problem": desc, **rep.to_dict()})
        typer.echo(
            f"wrote {out}/rmse.png, cosine.png"
            + (", budget.png" if timing else "")
            + ", results.json"
        )
    typer.echo(f"({time.perf_counter() - t0:.1f} s)")
