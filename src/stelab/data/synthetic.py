"""Generated datasets: the [Y19] Gaussian teacher and the [S20] 2-D toy.

Protocols: docs/papers/yin2019.md and docs/papers/psa2020.md.

Both are drawn from one ``torch.Generator`` seeded with ``seed``, in a documented
order, so the same arguments give the same tensors bit for bit on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from stelab.data.base import Request, Split, Splits, check_count, check_dtype, generator
from stelab.errors import ConfigError

# --- [Y19] teacher ----------------------------------------------------------------------


def _vector(name: str, value: Any, size_name: str, size: int) -> torch.Tensor:
    """``value`` as a float64 vector of length ``size``, else a ConfigError."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().clone().reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{name} must be a vector of {size} numbers, got {value!r}") from e
    if t.numel() != size:
        raise ConfigError(
            f"{name} must have {size_name}={size} entries, got {t.numel()} ({value!r})"
        )
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return t


def teacher_labels(z: torch.Tensor, v_star: torch.Tensor, w_star: torch.Tensor) -> torch.Tensor:
    """``y* = v*ᵀ 1{Z w* > 0}`` for a batch ``z`` (N, m, n), computed in float64."""
    act = (z.to(torch.float64) @ w_star.to(torch.float64) > 0).to(torch.float64)
    return act @ v_star.to(torch.float64)


def load_teacher(
    req: Request,
    *,
    m: int = 10,
    n: int = 20,
    v_star: Any = None,
    w_star: Any = None,
    n_train: int = 10000,
    n_test: int = 1000,
    dtype: Any = torch.float32,
) -> Splits:
    """Gaussian teacher data of [Y19]: ``Z ∈ R^{m×n}`` i.i.d. N(0,1), ``y = v*ᵀ1{Zw*>0}``.

    See docs/papers/yin2019.md.

    Args:
        m: rows ("patches") per input; the length of ``v*``. Default 10.
        n: columns; the length of ``w*``. Default 20.
        v_star: the teacher's second layer (m numbers); default drawn N(0, I_m).
        w_star: the teacher's filter (n numbers, rescaled to unit norm; the labels do
            not depend on its norm); default drawn N(0, I_n) and normalised.
        n_train, n_test: sizes of the training and test sets (``val_size`` of
            :func:`stelab.data.load`, default 1000, sizes the validation set).
        dtype: ``torch.float32`` (default) or ``torch.float64`` for x and y.

    Draw order from ``Generator().manual_seed(seed)``: ``v*`` (m), ``w*`` (n) — drawn
    even when given, so the data stream does not depend on it —, then the test,
    validation and training inputs. ``limit`` keeps the first rows of the training
    set (drawn last, in full), so no split changes with it. Labels are computed in float64 from the
    stored inputs. ``Splits.meta`` holds ``v_star``, ``w_star`` (float64), ``m``, ``n``;
    ``num_classes`` is None (regression targets).
    """
    m = check_count("m", m, minimum=1)
    n = check_count("n", n, minimum=1)
    n_train = check_count("n_train", n_train, minimum=1)
    n_test = check_count("n_test", n_test, minimum=0)
    n_val = 1000 if req.val_size is None else req.val_size
    dtype = check_dtype("dtype", dtype)
    g = generator(req.seed)
    v_draw = torch.randn(m, generator=g, dtype=torch.float64)
    w_draw = torch.randn(n, generator=g, dtype=torch.float64)
    v = v_draw if v_star is None else _vector("v_star", v_star, "m", m)
    w = w_draw if w_star is None else _vector("w_star", w_star, "n", n)
    norm = w.norm()
    if norm == 0:
        raise ConfigError("w_star must be a nonzero vector, got all zeros")
    w = w / norm

    def draw(count: int) -> Split:
        z = torch.randn(count, m, n, generator=g, dtype=dtype)
        return Split(z, teacher_labels(z, v, w).to(dtype))

    test = draw(n_test)
    val = draw(n_val)
    train = draw(n_train)
    if req.limit is not None and req.limit < n_train:
        # torch.randn(k) is not a prefix of torch.randn(N): draw all, then cut
        train = Split(train.x[: req.limit].clone(), train.y[: req.limit].clone())
    return Splits(
        name=req.name,
        train=train,
        val=val,
        test=test,
        num_classes=None,
        input_shape=(m, n),
        source=f"generated: [Y19] Gaussian teacher, m={m}, n={n}, seed={req.seed}",
        meta={"v_star": v, "w_star": w, "m": m, "n": n},
    )


# --- [S20] toy data -------------------------------------------------------------------------


def _draw_psa(g: torch.Generator, n_per_class: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``n_per_class`` points of class +1, then of class -1 (by rejection)."""
    half_pi = math.pi / 2
    u = torch.rand(n_per_class, 2, generator=g, dtype=dtype)
    pos = torch.stack([(u[:, 0] * 2 - 1) * half_pi, u[:, 1]], dim=1)
    kept: list[torch.Tensor] = []
    count = 0
    while count < n_per_class:
        u = torch.rand(n_per_class, 2, generator=g, dtype=dtype)
        cand = torch.stack([(u[:, 0] * 2 - 1) * half_pi, u[:, 1] * 2 - 1], dim=1)
        cand = cand[cand[:, 1] < torch.cos(cand[:, 0])]
        kept.append(cand)
        count += cand.shape[0]
    neg = torch.cat(kept)[:n_per_class]
    return pos, neg


def load_psa_toy(
    req: Request,
    *,
    n_per_class: int = 100,
    n_val_per_class: int = 0,
    n_test_per_class: int = 0,
    labels: str = "pm1",
    dtype: Any = torch.float32,
) -> Splits:
    """The 2-D two-class data of [S20]'s gradient-accuracy protocol (docs/papers/psa2020.md).

    Class +1: ``x ~ U(-π/2, π/2)``, ``y ~ U(0, 1)``. Class -1: ``x ~ U(-π/2, π/2)``,
    ``y ~ U(-1, 1)`` kept only if ``y < cos x`` (rejection). Default 100 + 100 points,
    seed 1 (the spec's); the spec uses float64 (``dtype=torch.float64``).

    Draw order from ``Generator().manual_seed(seed)``, all in ``dtype``: class +1 as
    ``u = rand(n, 2)``, ``x = π(u₀ - ½)``, ``y = u₁``; then class -1 in rounds of
    ``u = rand(n, 2)``, ``x = π(u₀ - ½)``, ``y = 2u₁ - 1``, keeping accepted points in
    order until n are kept; then the same for the validation and the test points.
    Rows are all class +1 points, then all class -1 points.

    Args:
        n_per_class: training points per class (default 100).
        n_val_per_class, n_test_per_class: extra points per class drawn after the
            training set for val/test (default 0: empty splits).
            ``limit=k`` keeps the first ⌈k/2⌉ class +1 and ⌊k/2⌋ class -1 points.
        labels: ``"pm1"`` (default) float targets ±1 of ``dtype``, for the logistic
            loss ``log(1 + exp(-η t))``; ``"01"`` int64 class indices (class -1 → 0,
            class +1 → 1).
        dtype: ``torch.float32`` (default) or ``torch.float64``.
    """
    n_per_class = check_count("n_per_class", n_per_class, minimum=1)
    n_val_per_class = check_count("n_val_per_class", n_val_per_class, minimum=0)
    n_test_per_class = check_count("n_test_per_class", n_test_per_class, minimum=0)
    dtype = check_dtype("dtype", dtype)
    if labels not in ("pm1", "01"):
        raise ConfigError(f"labels must be 'pm1' or '01', got {labels!r}")
    if req.val_size not in (None, 0):
        raise ConfigError(
            f"val_size is not used by psa-toy (got {req.val_size!r}); pass n_val_per_class= instead"
        )
    g = generator(req.seed)

    def split(count: int) -> Split:
        if count == 0:
            y_dtype = dtype if labels == "pm1" else torch.int64
            return Split(torch.empty(0, 2, dtype=dtype), torch.empty(0, dtype=y_dtype))
        pos, neg = _draw_psa(g, count, dtype)
        x = torch.cat([pos, neg])
        if labels == "pm1":
            y = torch.cat([torch.ones(count, dtype=dtype), -torch.ones(count, dtype=dtype)])
        else:
            y = torch.cat(
                [torch.ones(count, dtype=torch.int64), torch.zeros(count, dtype=torch.int64)]
            )
        return Split(x, y)

    train = split(n_per_class)
    val = split(n_val_per_class)
    test = split(n_test_per_class)
    if req.limit is not None and req.limit < len(train):
        # keep both classes: the first ceil(limit/2) of class +1, floor(limit/2) of class -1
        keep = torch.cat(
            [torch.arange((req.limit + 1) // 2), n_per_class + torch.arange(req.limit // 2)]
        )
        train = Split(train.x[keep], train.y[keep])
    return Splits(
        name=req.name,
        train=train,
        val=val,
        test=test,
        num_classes=2,
        input_shape=(2,),
        source=f"generated: [S20] 2-D toy data, {n_per_class} points per class, seed={req.seed}",
        meta={"labels": labels, "n_per_class": n_per_class},
    )
