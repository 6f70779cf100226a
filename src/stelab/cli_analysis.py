"""``stelab gradcheck``: how accurate are SBN gradient estimators on a given net?

Registered on the main app by :func:`register` (called from :mod:`stelab.cli`).
Heavy modules are imported inside the command so ``stelab --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]

_MODELS = ("toy", "mlp", "conv8")


def _ints(option: str, text: str | None, lo: int = 1) -> list[int] | None:
    from .errors import ConfigError

    if text is None:
        return None
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            v = int(tok)
        except ValueError:
            raise ConfigError(
                f"{option} must be comma-separated integers >= {lo}, got {text!r}"
            ) from None
        if v < lo:
            raise ConfigError(f"{option} must be integers >= {lo}, got {v} in {text!r}")
        out.append(v)
    if not out:
        raise ConfigError(f"{option} is empty")
    return out


def _problem(
    model: str,
    data: str | None,
    hidden: list[int] | None,
    channels: list[int] | None,
    examples: int,
    checkpoint: Path | None,
    seed: int,
    dtype: str,
) -> tuple[Any, Any, Any, Any, str]:
    """(model, x, y, loss_fn, description) for the gradcheck command."""
    import torch
    import torch.nn.functional as F

    from . import data as _data
    from . import sbn
    from .errors import ConfigError, unknown

    if model not in _MODELS:
        raise unknown("gradcheck model", model, _MODELS)
    if dtype not in ("float64", "float32"):
        raise ConfigError(f"--dtype must be 'float64' or 'float32', got {dtype!r}")
    dt = torch.float64 if dtype == "float64" else torch.float32
    name = data or ("psa-toy" if model == "toy" else "digits")
    if model == "toy" and name != "psa-toy":
        raise ConfigError(
            f"--model toy runs on --data psa-toy, got --data {name!r}; use --model mlp"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "psa-toy":
            ds = _data.load("psa-toy", dtype=dt)
            x, y = ds.train
            loss_fn = sbn.logistic_loss
            out_features, in_shape = 1, (2,)
        else:
            ds = _data.load(name, limit=examples, progress=False)
            x, y = ds.train
            x = x[:examples].to(dt)
            y = y[:examples]
            out_features, in_shape = int(ds.num_classes or 2), tuple(ds.input_shape)

            def loss_fn(eta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(eta, t, reduction="none")

        if model == "toy":
            net = sbn.sbn_mlp(2, tuple(hidden or (5, 5, 5)), 1, dtype=dt)
        elif model == "mlp":
            feats = 1
            for s in in_shape:
                feats *= s
            net = sbn.sbn_mlp(feats, tuple(hidden or (8, 8)), out_features, dtype=dt)
        else:
            if len(in_shape) != 3:
                raise ConfigError(
                    f"--model conv8 needs image data, got {name!r} of shape {in_shape}"
                )
            ch = channels or [8, 16]
            if len(ch) != 2:
                raise ConfigError(f"--channels must be two integers (e.g. 8,16), got {ch}")
            pad = 1 if min(in_shape[1:]) < 24 else 0
            net = sbn.sbn_conv8(in_shape[0], in_shape[1:], out_features, tuple(ch), pad, dtype=dt)
        if checkpoint is not None:
            if not checkpoint.is_file():
                raise ConfigError(f"--checkpoint {str(checkpoint)!r} does not exist")
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            try:
                net.load_state_dict(state)
            except (RuntimeError, KeyError) as e:
                msg = " ".join(str(e).split())[:300]
                raise ConfigError(
                    f"--checkpoint {str(checkpoint)!r} does not fit --model {model}: {msg}"
                ) from None
            net.to(dt)
        elif model != "toy":
            sbn.data_init(net, x, generator=seed)
    widths = [
        layer.out_features if hasattr(layer, "out_features") else layer.out_channels
        for layer in net.hidden
    ]
    desc = f"--model {model} (hidden widths {widths}) on {name}, {x.shape[0]} examples, {dtype}"
    return net, x, y, loss_fn, desc


def register(app: typer.Typer) -> None:
    """Add the ``gradcheck`` command to ``app``."""

    @app.command()
    def gradcheck(
        model: Annotated[
            str, typer.Option(help="toy (the [S20] 2-5-5-5-1 net on psa-toy), mlp or conv8.")
        ] = "toy",
        estimators: Annotated[
            str,
            typer.Option(
                help="Comma-separated estimators: SBN estimators (psa, dst, hard_st, arm, "
                "reinforce, reinforce_loo, concrete:tau=0.1, gumbel_st, tanh_mf), and "
                "det:STE / sample:STE for a sign net with a quantizer STE (det:ste, "
                "det:clipped, det:approx_sign, ...)."
            ),
        ] = "psa,dst,arm,reinforce",
        draws: Annotated[int, typer.Option(help="One-sample estimates per estimator.")] = 2000,
        sample_sizes: Annotated[
            str | None,
            typer.Option(
                help="Sample sizes M, e.g. 1,10,100 (default 1..9,10..90,... up to draws)."
            ),
        ] = None,
        reference: Annotated[
            str, typer.Option(help="auto (exact when enumerable), exact or mc.")
        ] = "auto",
        reference_samples: Annotated[
            int | None, typer.Option(help="Draws of the Monte-Carlo reference (default 20000).")
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
        examples: Annotated[int, typer.Option(help="Training examples used for image data.")] = 200,
        checkpoint: Annotated[
            Path | None, typer.Option(help="Load the SBN's weights from this state dict (.pt).")
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the init and of every draw.")] = 0,
        dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
        timing: Annotated[bool, typer.Option(help="Measure seconds per draw.")] = True,
        out: Annotated[
            Path | None,
            typer.Option(help="Write rmse.png, cosine.png, budget.png and results.json here."),
        ] = None,
    ) -> None:
        """Gradient fidelity of SBN estimators: relative RMSE, cosine, bias, variance, SNR
        and cost per layer against the exact (or Monte-Carlo) gradient."""
        import time

        from .errors import ConfigError, check_int

        draws = check_int("--draws", draws, 1, 2**31)
        sizes = _ints("--sample-sizes", sample_sizes, lo=1) if sample_sizes is not None else None
        if examples < 1:
            raise ConfigError(f"--examples must be an integer >= 1, got {examples}")
        if reference not in ("auto", "exact", "mc"):
            raise ConfigError(f"--reference must be auto, exact or mc, got {reference!r}")
        from .analysis import check_sample_sizes, enumerable, gradient_fidelity, parse_estimators
        from .analysis.plots import plot_budget, plot_cosine, plot_rmse

        sizes = check_sample_sizes(sizes, draws)
        specs = parse_estimators(estimators)
        if out is not None and out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
        net, x, y, loss_fn, desc = _problem(
            model,
            data,
            _ints("--hidden", hidden),
            _ints("--channels", channels),
            examples,
            checkpoint,
            seed,
            dtype,
        )
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
