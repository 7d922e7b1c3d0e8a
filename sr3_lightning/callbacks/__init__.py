"""Training callbacks: sample grids, the per-domain forgetting evaluation, the final-step checkpoint and
the step-counting progress bar."""

from sr3_lightning.callbacks.domain_eval import DomainEval
from sr3_lightning.callbacks.final_checkpoint import FinalCheckpoint
from sr3_lightning.callbacks.sample_grid import SampleGrid
from sr3_lightning.callbacks.step_progress import StepProgressBar

__all__ = ["DomainEval", "FinalCheckpoint", "SampleGrid", "StepProgressBar"]
