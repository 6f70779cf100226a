"""The [S24] experiment's network: a small conv net whose weights are all quantized."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import QuantConv2d, QuantLinear
from ...quantizers import Quantizer
from .config import Config

__all__ = ["SmallConvNet", "build", "weight_layers"]


class SmallConvNet(nn.Module):
    """conv3(c1, pad 1) - ReLU - pool2 - conv3(c2, pad 1) - ReLU - pool2 - fc(classes).

    Every weight is quantized by ``make_q(weight)``; biases and activations stay float.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, channels, make_q):
        super().__init__()
        c, h, w = in_shape
        c1, c2 = channels
        self.conv1 = QuantConv2d(c, c1, 3, padding=1)
        self.conv2 = QuantConv2d(c1, c2, 3, padding=1)
        self.fc = QuantLinear(c2 * (h // 4) * (w // 4), num_classes)
        for m in (self.conv1, self.conv2, self.fc):
            m.weight_quantizer = make_q(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def build(cfg: Config, data: Any, est: str, params: dict, seed: int) -> nn.Module:
    """The net with estimator ``est`` on every weight, a fixed step per layer
    Δ = bound · ``cfg.step_fraction`` (bound = PyTorch's default init range), initialised
    from ``seed`` without touching the global RNG, in ``cfg.dtype``."""

    def make_q(weight: torch.Tensor) -> Quantizer:
        bound = 1.0 / math.sqrt(weight[0].numel())  # PyTorch's default init range
        return Quantizer("uniform", est, bits=cfg.bits, step=bound * cfg.step_fraction, **params)

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SmallConvNet(tuple(data.input_shape), data.num_classes, cfg.channels, make_q)
    return net.to(getattr(torch, cfg.dtype))


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose weight is quantized."""
    return [m for m in model.modules() if getattr(m, "weight_quantizer", None) is not None]
