"""[Y19] Yin et al., Understanding Straight-Through Estimator in Training Activation
Quantized Neural Nets (ICLR 2019): the reproduction's parts."""

from ..spine import Paper

PAPER = Paper(
    key="yin2019",
    title="[Y19] Yin et al., Understanding Straight-Through Estimator in Training "
    "Activation Quantized Neural Nets (ICLR 2019)",
    parts={
        "synthetic": "stelab.experiments.yin2019.synthetic",
        "table1": "stelab.experiments.yin2019.table1",
        "instability": "stelab.experiments.yin2019.instability",  # after table1: reuses its cells
        "table1-cifar10": "stelab.experiments.yin2019.table1_cifar",  # full mode, CIFAR-10 only
    },
)
