"""End-to-end: a quantized LeNet-5 learns the bundled digits with each [Y19] STE."""

from __future__ import annotations

import pytest

from stelab.experiments.demo import train_digits


@pytest.mark.parametrize("estimator", ["ste", "relu", "clipped_relu"])
def test_quantized_lenet5_learns_digits(estimator):
    r = train_digits(estimator, bits=2, epochs=3, seed=0)
    # 10 balanced classes: chance is 10%; 3 epochs reach well above 80%
    assert r["test_accuracy"] > 0.8, r


def test_same_seed_same_result():
    a = train_digits("clipped_relu", bits=2, epochs=1, seed=3)
    b = train_digits("clipped_relu", bits=2, epochs=1, seed=3)
    assert a == b
