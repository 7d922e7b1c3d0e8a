"""Training callbacks: sample grids and the per-domain forgetting evaluation."""

from sr3_lightning.callbacks.domain_eval import DomainEval
from sr3_lightning.callbacks.sample_grid import SampleGrid

__all__ = ["DomainEval", "SampleGrid"]
