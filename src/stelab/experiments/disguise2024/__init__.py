"""[S24] Schoenbauer et al., Custom Gradient Estimators are Straight-Through Estimators in
Disguise (2024): the reproduction's parts."""

from ..spine import Paper

PAPER = Paper(
    key="disguise2024",
    title="[S24] Schoenbauer et al., Custom Gradient Estimators are Straight-Through "
    "Estimators in Disguise (2024)",
    parts={"trajectories": "stelab.experiments.disguise2024.trajectories"},
)
