"""``stelab export``: a trained run (or a zoo model) as a quantized ONNX file.

Registered on the main app by :func:`register` (called from :mod:`stelab.cli`).
torch, onnx and onnxruntime are imported inside the command so ``stelab --help``
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]


def _shape(text: str) -> tuple[int, ...]:
    from .errors import ConfigError

    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--input-shape must be C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return shape


def _from_run(source: Path) -> tuple[Any, tuple[int, ...]]:
    """(model with its trained weights, input shape) of a run folder or checkpoint file."""
    from .errors import ConfigError
    from .train.checkpoint import check_state, load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(source)
    if "model_args" not in ckpt:
        raise ConfigError(
            f"{str(source)!r} holds a bare state_dict without the model's config; give a run "
            "folder written by `stelab train` (or its checkpoints/*.pt)"
        )
    model = model_from_checkpoint(ckpt, str(source))
    check_state(model, ckpt["model"], str(source))
    model.load_state_dict(ckpt["model"])
    return model.eval(), tuple(int(s) for s in ckpt["model_args"]["in_shape"])


def register(app: typer.Typer) -> None:
    """Add the export command to ``app``."""

    @app.command()
    def export(
        run: Annotated[
            Path | None,
            typer.Argument(
                help="Run folder written by `stelab train` (its checkpoints/last.pt), or one "
                "of its checkpoint files. Omit with --model."
            ),
        ] = None,
        model: Annotated[
            str | None,
            typer.Option(help="Export a freshly built zoo model instead: lenet5, resnet20, ..."),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(help="ONNX file to write (default: RUN/model.onnx, or MODEL.onnx)."),
        ] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing output file.")
        ] = False,
        input_shape: Annotated[
            str | None, typer.Option(help="--model only: input shape C,H,W (default 1,28,28).")
        ] = None,
        bits: Annotated[
            int | None, typer.Option(help="--model only: activation bits (omit: float ReLU).")
        ] = None,
        estimator: Annotated[
            str | None, typer.Option(help="--model only: activation estimator.")
        ] = None,
        weight_bits: Annotated[
            int | None,
            typer.Option(help="--model only: uniform weights with this many bits (LSQ init)."),
        ] = None,
        num_classes: Annotated[
            int | None, typer.Option(help="--model only: number of classes (default 10).")
        ] = None,
        verify: Annotated[
            bool,
            typer.Option(
                "--verify/--no-verify",
                help="Run the file in onnxruntime and compare with stelab's forward.",
            ),
        ] = True,
        seed: Annotated[int, typer.Option(help="Seed of the example/verification inputs.")] = 0,
    ) -> None:
        r"""Write a quantized ONNX model: integer weights, QuantizeLinear/DequantizeLinear.

        Needs the optional extra: pip install stelab\[export].
        """
        from .errors import ConfigError

        zoo_opts = {
            "--input-shape": input_shape,
            "--bits": bits,
            "--estimator": estimator,
            "--weight-bits": weight_bits,
            "--num-classes": num_classes,
        }
        if (run is None) == (model is None):
            raise ConfigError(
                "give either a run folder (RUN) or --model NAME, got "
                + ("both" if run is not None else "neither")
            )
        if run is not None:
            given = [k for k, v in zoo_opts.items() if v is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} only apply with --model; a run folder's config fixes "
                    "the model"
                )
        if out is not None and out.suffix.lower() != ".onnx":
            raise ConfigError(f"--out must be a .onnx file, got {str(out)!r}")

        from . import export as _export

        _export.require("onnx", "onnxscript", *(("onnxruntime",) if verify else ()))

        import torch

        if run is not None:
            m, shape = _from_run(run)
            target = out or ((run if run.is_dir() else run.parent) / "model.onnx")
        else:
            from . import estimators as _est
            from . import models

            shape = _shape(input_shape or "1,28,28")
            torch.manual_seed(seed)  # the fresh model's weights
            est = estimator or "clipped_relu"
            _est.get(est)
            weights = None
            if weight_bits is not None:
                weights = {"fn": "uniform", "bits": weight_bits, "step": "auto"}
            m = models.build(
                model,
                num_classes=10 if num_classes is None else num_classes,
                in_shape=shape,
                act={"bits": bits, "estimator": est} if bits is not None else None,
                weights=weights,
            ).eval()
            target = out or Path(f"{model}.onnx")
        if target.exists() and not overwrite:
            raise ConfigError(f"{str(target)!r} exists; pass --overwrite to replace it")

        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((8, *shape), generator=gen)
        path = _export.export(m, x[:1], target, overwrite=overwrite)
        ops = _export.count_ops(path)
        size = _export.exported_size(m)
        typer.echo(
            f"wrote {path}: {ops.get('QuantizeLinear', 0)} QuantizeLinear, "
            f"{ops.get('DequantizeLinear', 0)} DequantizeLinear; {size.quantized_weights} "
            f"integer weight tensors; tensors {_kib(size.exported_bytes)} "
            f"(float32 {_kib(size.float_bytes)}, {size.compression:.2f}x smaller)"
        )
        if verify:
            with torch.no_grad():
                ref = m(x)
            err = (_export.run_onnx(path, x) - ref).abs().amax(tuple(range(1, ref.dim())))
            typer.echo(
                f"onnxruntime vs stelab on 8 random inputs: max |difference| = "
                f"{err.max().item():.3g} ({int((err <= 1e-5).sum())} of 8 equal to 1e-5)"
            )
            if err.max().item() > 1e-5:
                typer.echo(
                    "  (onnxruntime adds in another order than torch: a pre-activation on a "
                    "quantizer's jump, such as an exact 0 in a freshly initialised network "
                    "for [Y19]'s act, can land on the other side; see stelab.export)"
                )


def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"
