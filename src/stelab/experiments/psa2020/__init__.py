"""[S20] Shekhovtsov, Yanush, Flach, Path Sample-Analytic Gradient Estimators for
Stochastic Binary Networks (NeurIPS 2020): the reproduction's parts."""

from ..spine import Paper

PAPER = Paper(
    key="psa2020",
    title="[S20] Shekhovtsov, Yanush, Flach, Path Sample-Analytic Gradient Estimators "
    "for Stochastic Binary Networks (NeurIPS 2020)",
    parts={
        "gradeval": "stelab.experiments.psa2020.gradeval",
        "training": "stelab.experiments.psa2020.training",
    },
)
