"""The non-finite guard: a bad step leaves weights and Adam moments exactly as they were, on the fused
(device-side) path and on the host path alike, and the run stops after `patience` bad steps in a row."""

import logging

import pytest
import torch
from lightning.pytorch import Callback

from sr3_lightning.module import SR3Module
from sr3_lightning.nonfinite import NonFiniteGuard, all_finite, skips_on_device
from tests.loop import fit_on_tiny_batch
from tests.reference import TINY

NAN = float("nan")


def adam(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.Adam]:
    p = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    return p, torch.optim.Adam([p], lr=0.1, fused=fused)


def run(fused: bool, grads: list[list[float]], patience: int = 3) -> tuple[list, NonFiniteGuard]:
    """Steps with the given gradients; returns the weights after each step and the guard."""
    p, opt = adam(fused)
    guard = NonFiniteGuard(patience)
    weights = []
    for step, g in enumerate(grads):
        p.grad = torch.tensor(g)
        guard.step(opt, [p.grad], step, [f"img_{step}"])
        opt.step()
        opt.zero_grad()
        weights.append(p.detach().clone())
    return weights, guard


@pytest.mark.parametrize("fused", [True, False])
def test_a_bad_step_changes_nothing_and_good_steps_match_an_unguarded_run(fused):
    good = [0.5, -1.0, 2.0, 0.1, 0.0, -0.3]
    bad = [0.5, NAN, 2.0, 0.1, float("inf"), -0.3]
    weights, guard = run(fused, [good, bad, good, good])
    assert torch.equal(weights[1], weights[0])  # the NaN step did not move the weights
    clean, _ = run(fused, [good, good, good])
    assert torch.equal(weights[3], clean[2])  # nor Adam's moments and step count: as if it never happened
    assert guard.skipped.item() == 1


def test_fused_adam_takes_the_device_path():
    assert skips_on_device(adam(fused=True)[1]) and not skips_on_device(adam(fused=False)[1])
    assert not all_finite([torch.ones(2), torch.tensor([1.0, NAN])]).item()
    assert all_finite([torch.full((3,), 3e38)]).item()  # large but finite gradients are not "non-finite"
    assert not all_finite([torch.ones(2), torch.tensor([-float("inf")], dtype=torch.bfloat16)]).item()
    grads = [torch.tensor([1.5, -3e38]), torch.tensor([0.25], dtype=torch.float16)]
    before = [g.clone() for g in grads]
    assert all_finite(grads).item() and all(torch.equal(g, b) for g, b in zip(grads, before))


@pytest.mark.parametrize("fused", [True, False])
def test_patience_consecutive_bad_steps_stop_the_run_naming_the_step_and_batch(fused, caplog):
    good, bad = [1.0] * 6, [NAN] * 6
    _, guard = run(fused, [good, bad, good, bad], patience=2)  # never two in a row
    with caplog.at_level(logging.WARNING):
        guard.check()
    assert "2 step(s) skipped" in caplog.text and "the last at step 3" in caplog.text
    stop = r"2 consecutive steps .* at step 2 on batch keys \['img_2'\]"
    with pytest.raises(FloatingPointError, match=stop):
        _, guard = run(fused, [good, bad, bad, good], patience=2)
        guard.check()  # the fused path reads its counters only here (each logging step)


def test_patience_must_be_positive():
    with pytest.raises(ValueError, match="nonfinite_patience=0"):
        NonFiniteGuard(0)


def test_skipped_steps_leave_the_weights_and_their_ema_as_they_were(tmp_path):
    """lr=1e30: step 1 blows the weights up to ~1e31 (finite), so every later step has NaN gradients."""
    model = SR3Module(unet=TINY, num_timesteps=100, ema_decay=0.5, nonfinite_patience=100)
    model.optimizer_factory = lambda params: torch.optim.Adam(params, lr=1e30)
    after_first: dict[str, torch.Tensor] = {}

    class AfterFirstStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                after_first.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    fit_on_tiny_batch(model, tmp_path, 4, log_every_n_steps=0, callbacks=[AfterFirstStep()])
    assert model._guard.skipped.item() == 3
    for key, value in model.state_dict().items():
        assert torch.equal(value, after_first[key]), key  # UNet and EMA alike
