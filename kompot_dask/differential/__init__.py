"""The documented API: differential abundance and expression, and replicate variance."""

from .abundance import DifferentialAbundance
from .expression import DifferentialExpression
from .sample_variance import SampleVarianceEstimator

__all__ = ["DifferentialAbundance", "DifferentialExpression", "SampleVarianceEstimator"]
