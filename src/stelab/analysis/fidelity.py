"""Gradient fidelity of SBN estimators: error, cosine, bias, variance and SNR against the truth.

For one layer (weights and bias together, flattened) let ``g`` be the reference
gradient of the expected loss and ``g_1, ..., g_D`` independent one-draw estimates
(each the full-batch estimate with fresh noise per example, [S20] §5). Averaging
consecutive groups of M draws, ``gbar_i = (1/M) sum_{d in group i} g_d``, gives
``G_M = floor(D / M)`` M-sample estimates, and ([S20] Fig. 3 / docs/papers/psa2020.md):

    relative RMSE(M)  = sqrt( (1/G_M) sum_i ||gbar_i - g||^2 ) / ||g||
    cosine(M)         = mean_i <gbar_i, g> / (||gbar_i|| ||g||),  with its 15% and 85% quantiles
    bias              = ||mean_d g_d - g|| / ||g||   (all D draws; "debiased" below)
    variance          = tr Cov(g_1) = E||g_1 - E g_1||^2,  rel_variance = variance / ||g||^2
    SNR               = ||mean_d g_d|| / sqrt(variance)           (one draw; M draws: x sqrt(M))

so that ``RMSE(M)^2 ~ bias^2 + rel_variance / M``. The plain bias estimate is
inflated by noise: for an unbiased estimator ``E||mean - g||^2 = variance / D
(+ sum se_ref^2 for a Monte-Carlo reference)``, the *bias floor*. We report

    bias_raw   = ||mean - g|| / ||g||,
    bias_floor = sqrt(variance / D + sum se_ref^2) / ||g||,
    bias       = sqrt(max(0, ||mean - g||^2 - floor^2)) / ||g||          (debiased)
    bias_z     = (||mean - g||^2 - floor^2) / sd,  sd^2 = 2 tr(Cov^2) / D^2 + 2 sum se_ref^4

(a Gaussian approximation; ``bias_z`` is about N(0, 1) for an unbiased estimator and
large for a biased one; ``tr(Cov^2)`` uses the full covariance for layers with up to
``gram_max`` parameters, its diagonal beyond). A deterministic estimator (``tanh_mf``,
``det:*``) has variance 0, RMSE(M) = bias for every M and ``bias_z = inf`` when its
bias is nonzero against an exact reference.

A coupled estimator (``reinforce_loo``: M samples share a baseline) is run once per
group for each M instead; its variance is ``M_min Var(gbar at M_min)``.

Cost: seconds per draw (``samples=M`` in one call, divided by M), forward-pass
equivalents (:func:`~stelab.analysis.specs.forward_equivalents`) and the
*compute-adjusted* error ``RMSE(M = budget / seconds_per_draw)`` (log-log
interpolation over the M grid): the error each estimator reaches in the same time.

Reference: [S20] Shekhovtsov, Yanush, Flach, NeurIPS 2020, arXiv:2006.03143, §5.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, check_int
from ..sbn import SBN, exact_gradient, mc_reference
from ..sbn.estimators import LossFn
from ..sbn.exact import DEFAULT_MAX_STATES, check_enumerable
from ..sbn.noise import as_generator
from .draws import DrawEngine, flatten_layers, layer_keys, layer_label, layer_params, time_per_draw
from .fidelity_report import EstimatorFidelity, FidelityReport, LayerFidelity, Reference
from .fidelity_stats import GroupMeans, Moments, bias_stats, layer_result
from .specs import EstimatorSpec, forward_equivalents, parse_estimators

__all__ = [
    "PAPER_SAMPLE_SIZES",
    "Reference",
    "LayerFidelity",
    "EstimatorFidelity",
    "FidelityReport",
    "reference_gradient",
    "check_sample_sizes",
    "gradient_fidelity",
    "enumerable",
]

#: M in {1..9, 10..90, 100..900, 1000..9000} (docs/papers/psa2020.md)
PAPER_SAMPLE_SIZES: tuple[int, ...] = tuple(d * 10**e for e in range(4) for d in range(1, 10))


# --------------------------------------------------------------------------- reference


def enumerable(model: SBN, max_states: int = DEFAULT_MAX_STATES) -> tuple[bool, str]:
    """``(True, "")`` if :func:`stelab.sbn.exact_gradient` can enumerate ``model``, else
    ``(False, why)`` with the message naming the state count."""
    try:
        check_enumerable(model, max_states)
    except ConfigError as e:
        return False, str(e)
    return True, ""


def reference_gradient(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    kind: str = "auto",
    *,
    samples: int | None = None,
    generator: torch.Generator | int | None = None,
    estimator: str = "reinforce_loo",
    max_states: int = DEFAULT_MAX_STATES,
) -> Reference:
    """The reference gradient ``g`` of ``E_Z[mean_n loss_fn(eta_n, y_n)]`` per layer.

    ``kind``: ``"exact"`` (enumeration; a ConfigError naming the state count and the
    Monte-Carlo alternative if the net is too large), ``"mc"``
    (:func:`stelab.sbn.mc_reference` with ``estimator`` and ``samples`` draws per
    example, default 20,000) or ``"auto"`` (exact when enumerable, else mc).
    """
    if kind not in ("auto", "exact", "mc"):
        raise ConfigError(f"reference must be 'auto', 'exact' or 'mc', got {kind!r}")
    layers = layer_params(model)
    t0 = time.perf_counter()
    if kind == "auto":
        kind = "exact" if enumerable(model, max_states)[0] else "mc"
    if kind == "exact":
        ok, why = enumerable(model, max_states)
        if not ok:
            raise ConfigError(why)
        ref = exact_gradient(model, x, y, loss_fn, max_states=max_states)
        return Reference(
            "exact",
            float(ref.value),
            flatten_layers(ref.grads, layers),
            seconds=time.perf_counter() - t0,
        )
    n = 20_000 if samples is None else check_int("reference samples", samples, 2, 2**40)
    groups = min(100, n // 2)
    mc = mc_reference(model, x, y, loss_fn, n, generator, estimator=estimator, groups=groups)
    return Reference(
        "mc",
        float(mc.value),
        flatten_layers(mc.grads, layers),
        flatten_layers(mc.grads_se, layers),
        mc.samples,
        mc.estimator,
        time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- entry point


def check_sample_sizes(sample_sizes: Sequence[int] | None, draws: int) -> list[int]:
    """The sorted distinct sample sizes M (default: :data:`PAPER_SAMPLE_SIZES` up to
    ``draws``); a ConfigError for M < 1 or M > draws."""
    if sample_sizes is None:
        return [m for m in PAPER_SAMPLE_SIZES if m <= draws]
    if isinstance(sample_sizes, (int, str)) or not hasattr(sample_sizes, "__iter__"):
        raise ConfigError(f"sample_sizes must be a list of integers >= 1, got {sample_sizes!r}")
    out = set()
    for m in sample_sizes:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"sample size M must be an integer >= 1, got {m!r}")
        if m > draws:
            raise ConfigError(
                f"sample size M={m} exceeds draws={draws}: averaging groups of M draws needs "
                f"at least M draws; raise draws or drop M={m}"
            )
        out.add(int(m))
    if not out:
        raise ConfigError("sample_sizes is empty; give at least one M >= 1")
    return sorted(out)


def _subseed(base: int, label: str) -> int:
    return (base * 1_000_003 + zlib.crc32(label.encode())) % (2**63)


def gradient_fidelity(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    estimators: Sequence[Any] | str = ("psa", "dst", "arm", "reinforce"),
    *,
    draws: int = 2000,
    sample_sizes: Sequence[int] | None = None,
    reference: str | Reference = "auto",
    reference_samples: int | None = None,
    generator: torch.Generator | int | None = 0,
    coupled_draws: int | None = None,
    timing: bool = True,
    timing_samples: int = 64,
    gram_max: int = 2048,
    row_budget: int | None = None,
    progress: bool | Callable[[str], Any] = False,
) -> FidelityReport:
    """Measure how well each estimator approximates the gradient of the expected loss.

    Args:
        model: an :class:`~stelab.sbn.SBN` (its ``.grad`` is not touched).
        x, y, loss_fn: the data and a per-example loss ``loss_fn(eta, y) -> (N,)``;
            the objective is ``E_Z[mean_n loss_fn(eta_n, y_n)]``.
        estimators: specs (``"psa"``, ``"concrete:tau=0.1"``, ``"det:ste"``, ...; see
            :mod:`stelab.analysis.specs`) as a list or a comma-separated string.
        draws: D, one-draw estimates per estimator (each a full-batch estimate).
        sample_sizes: the M grid (default: :data:`PAPER_SAMPLE_SIZES` up to ``draws``).
        reference: ``"auto"``, ``"exact"``, ``"mc"`` or a :class:`Reference`.
        reference_samples: draws of the Monte-Carlo reference (default 20,000).
        generator: seed or generator; each estimator gets its own stream (derived from
            the seed and its label), so adding an estimator does not change the others.
        coupled_draws: cap on the draws spent per M on a coupled estimator
            (``reinforce_loo``, run once per group and M): ``groups(M) =
            min(D, coupled_draws) // M``, and M with fewer than 2 groups is skipped
            (default: D, the full protocol).
        timing: measure seconds per draw (``timing_samples`` samples per call).
        gram_max: layers with at most this many parameters use the full covariance
            in ``bias_z``.
        row_budget: rows (copies x samples x examples) per batched call.
        progress: True for a tqdm bar, or a callable receiving one line per estimator.

    Returns:
        A :class:`FidelityReport`.
    """
    if not isinstance(model, SBN):
        raise StelabTypeError(f"model must be an SBN, got {type(model).__name__}")
    draws = check_int("draws", draws, 1, 2**31)
    sizes = check_sample_sizes(sample_sizes, draws)
    specs: list[EstimatorSpec] = parse_estimators(
        estimators if isinstance(estimators, str) else list(estimators)
    )
    for s in specs:
        s.estimator.check(model, s.estimator.min_samples)
    if coupled_draws is not None:
        coupled_draws = check_int("coupled_draws", coupled_draws, 1, 2**31)
    gram_max = check_int("gram_max", gram_max, 0, 2**16)
    g0 = as_generator(generator, x.device)
    base = (
        int(torch.randint(0, 2**62, (), generator=g0))
        if g0 is not None
        else int(torch.randint(0, 2**62, ()))
    )
    keys = layer_keys(model)
    ref = (
        reference
        if isinstance(reference, Reference)
        else reference_gradient(
            model,
            x,
            y,
            loss_fn,
            reference,
            samples=reference_samples,
            generator=torch.Generator(device=x.device).manual_seed(_subseed(base, "reference")),
        )
    )
    layers = layer_params(model)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc="gradient fidelity", leave=False)
    results: dict[str, EstimatorFidelity] = {}
    try:
        for spec in specs:
            t0 = time.perf_counter()
            gen = torch.Generator(device=x.device).manual_seed(_subseed(base, spec.label))
            kw = {} if row_budget is None else {"row_budget": row_budget}
            eng = DrawEngine(model, x, y, loss_fn, spec.estimator, gen, **kw)
            ef = _run_one(spec, eng, ref, keys, layers, draws, sizes, coupled_draws, gram_max)
            if timing:
                ef.seconds_per_draw = time_per_draw(
                    model, x, y, loss_fn, spec.estimator, samples=timing_samples, generator=gen
                )
            ef.forward_equivalents = forward_equivalents(spec.estimator, model)
            ef.wall_seconds = time.perf_counter() - t0
            results[spec.label] = ef
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(f"{spec.label}: {ef.engine}, {ef.wall_seconds:.1f} s")
    finally:
        if bar is not None:
            bar.close()
    return FidelityReport(keys, ref, results, draws, sizes, int(x.shape[0]))


def _run_one(
    spec: EstimatorSpec,
    eng: DrawEngine,
    ref: Reference,
    keys: list[str],
    layers: dict[str, Any],
    draws: int,
    sizes: list[int],
    coupled_draws: int | None,
    gram_max: int,
) -> EstimatorFidelity:
    est = spec.estimator
    refs = {k: ref.grads[k] for k in keys}
    ses = ref.se
    out = EstimatorFidelity(spec.label, est.name, "stochastic", eng.engine, draws, None, None, 0.0)
    if eng.deterministic:
        out.kind = "deterministic"
        const = eng.constant()
        for k in keys:
            g, r = const[k].double(), refs[k].double()
            rn = float(r.norm())
            err = float((g - r).norm()) / rn if rn > 0 else math.nan
            den = float(g.norm()) * rn
            cos = float(g @ r) / den if den > 0 else 0.0
            bias, raw, floor, z = bias_stats(g, r, 0.0, 0.0, 1, None if ses is None else ses[k])
            n = len(sizes)
            out.layers[k] = LayerFidelity(
                k,
                layer_label(k),
                g.numel(),
                rn,
                list(sizes),
                [draws // m for m in sizes],
                [err] * n,
                [0.0] * n,
                [cos] * n,
                [cos] * n,
                [cos] * n,
                bias,
                raw,
                floor,
                z,
                0.0,
                0.0,
                math.inf,
            )
        return out
    dt = torch.float64
    dev = next(iter(refs.values())).device
    refs64 = {k: v.to(dt) for k, v in refs.items()}
    if eng.coupled:
        out.kind = "coupled"
        ms = [m for m in sizes if m >= est.min_samples]
        if not ms:
            raise ConfigError(
                f"estimator {spec.label!r} needs M >= {est.min_samples}; the sample sizes "
                f"{sizes} have none"
            )
        streams = {k: {} for k in keys}
        moments = {k: Moments(refs[k].numel(), gram_max, dt, dev) for k in keys}
        budget = draws if coupled_draws is None else min(draws, coupled_draws)
        ms = [m for m in ms if budget // m >= 2 or m == ms[0]]
        m0, used = ms[0], 0
        for m in ms:
            n_groups = max(1, budget // m)
            for k in keys:
                streams[k][m] = GroupMeans(1, refs64[k])
            for chunk in eng.groups(m, n_groups):
                for k in keys:
                    c = chunk[k].to(dt)
                    streams[k][m].add(c)
                    if m == m0:
                        moments[k].add(c)
            used += n_groups * m
        out.draws = used
        for k in keys:  # each streamed row is already a group mean: one "group" per row
            out.layers[k] = layer_result(
                k, streams[k], sizes, refs64[k], moments[k], m0, None if ses is None else ses[k]
            )
        out.engine = eng.engine
        if eng.fallback_reason:
            out.note = f"loop fallback: {eng.fallback_reason}"
        return out
    streams = {k: {m: GroupMeans(m, refs64[k]) for m in sizes} for k in keys}
    moments = {k: Moments(refs[k].numel(), gram_max, dt, dev) for k in keys}
    for chunk in eng.draws(draws):
        for k in keys:
            c = chunk[k].to(dt)
            moments[k].add(c)
            for st in streams[k].values():
                st.add(c)
    for k in keys:
        out.layers[k] = layer_result(
            k, streams[k], sizes, refs64[k], moments[k], 1, None if ses is None else ses[k]
        )
    out.engine = eng.engine
    if eng.fallback_reason:
        out.note = f"loop fallback: {eng.fallback_reason}"
    return out
