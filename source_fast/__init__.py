"""source_fast: training-data attribution with SOURCE (approximate unrolled differentiation) and
EK-FAC influence functions, with Triton and C++/CUDA kernels for the heavy parts.

    factors = source_fast.fit_factors(model, task, trajectory)
    scores = source_fast.score(model, task, trajectory, factors, train_data, queries, method="source")

Importing it initialises neither CUDA nor Triton.
"""

from ._version import __version__
from .factors import Factors, fit_factors
from .jobs import Job
from .scoring import score, self_score
from .task import Task
from .trajectory import Segment, Trajectory

__all__ = ["Task", "Segment", "Trajectory", "fit_factors", "Factors", "score", "self_score", "Job", "__version__"]
