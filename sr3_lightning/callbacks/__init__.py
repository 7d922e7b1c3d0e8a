"""Training callbacks: sample grids, the per-domain forgetting evaluation, the final-step checkpoint."""

from sr3_lightning.callbacks.domain_eval import DomainEval
from sr3_lightning.callbacks.final_checkpoint import FinalCheckpoint
from sr3_lightning.callbacks.sample_grid import SampleGrid

__all__ = ["DomainEval", "FinalCheckpoint", "SampleGrid"]
