"""The cluster simulator: a discrete-event model of disaggregated serving (SUN, QSUN,
conventional) driven only by step-time tables (measured by ``sunjax bench steps`` or the
labelled H200 roofline table).

    sunjax simulate run --table h200 --policy sun --tasks 8 --decode-instances 8 --alpha 1
    sunjax simulate validate --out DIR      # the model against the real engine on this CPU
    sunjax simulate report --out reports/cluster
"""

from apps.simulate.cli import main
from apps.simulate.model import ClusterConfig, SimRequest, Simulation, simulate, synthetic
from apps.simulate.tables import Curve, Grid, Roofline, StepTable, roofline_h200

__all__ = [
    "ClusterConfig",
    "Curve",
    "Grid",
    "Roofline",
    "SimRequest",
    "Simulation",
    "StepTable",
    "main",
    "roofline_h200",
    "simulate",
    "synthetic",
]
