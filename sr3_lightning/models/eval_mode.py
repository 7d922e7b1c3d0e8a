"""Evaluation mode for a while: sampling and metrics run the network in eval mode mid-training."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode and restore its earlier mode after, even on an error, so an evaluation
    inside ``fit`` never leaves the model training in eval mode (or an evaluated model in train mode)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
