import numpy as np
import pytest
import torch

from sr3_lightning.diffusion.schedule import BETA_SCHEDULES, BUFFER_NAMES, make_betas, make_schedule, respace
from tests.reference import REF, tiny_gen


def test_linear_2000_equals_reference_buffers():
    ref = torch.load(REF / "schedule_linear_2000.pt", weights_only=True)
    sched = make_schedule()  # defaults: linear, T=2000, 1e-6..1e-2
    for name in BUFFER_NAMES:
        torch.testing.assert_close(sched.buffers()[name], ref[name], rtol=1e-7, atol=0, msg=name)
    torch.testing.assert_close(
        sched.sqrt_alphas_cumprod_prev, ref["sqrt_alphas_cumprod_prev"], rtol=1e-12, atol=0
    )


def test_tiny_schedule_equals_buffers_stored_in_reference_checkpoint():
    gen = tiny_gen()
    sched = make_schedule("linear", 100, 1e-6, 1e-2)
    assert list(sched.buffers()) == list(gen)[:12]
    for name, value in sched.buffers().items():
        assert torch.equal(value, gen[name]), name


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_every_schedule_is_a_valid_beta_sequence(kind):
    betas = make_betas(kind, 50, 1e-4, 2e-2)
    assert betas.shape == (50,) and betas.dtype == np.float64
    assert (betas > 0).all() and (betas <= 1).all()


def test_named_schedules_follow_their_formulas():
    assert np.allclose(make_betas("quad", 3, 1e-4, 1e-2), [1e-4, (0.5 * (1e-2 + 1e-1)) ** 2, 1e-2])
    assert np.allclose(make_betas("jsd", 4), [1 / 4, 1 / 3, 1 / 2, 1])
    warm = make_betas("warmup10", 100, 1e-4, 2e-2)
    assert warm[0] == 1e-4 and (warm[10:] == 2e-2).all()


@pytest.mark.parametrize(
    ("start", "end"), [(1e-6, -1.0), (-1e-6, 1e-2), (1e-6, 1.5), (0.0, 1e-2), (1e-6, 1.0)]
)
def test_betas_outside_0_1_are_refused_naming_the_settings(start, end):
    with pytest.raises(ValueError, match=r"each must lie in \(0, 1\): set beta_start and beta_end"):
        make_schedule("linear", 100, start, end)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown beta schedule 'linaer'.*linear, quad"):
        make_betas("linaer", 10)


def test_respace_keeps_endpoints_count_and_gamma():
    full = make_schedule()
    sub = respace(full, 50)
    assert sub.num_timesteps == 50
    assert sub.timesteps[0] == 0 and sub.timesteps[-1] == 1999
    assert torch.equal(sub.alphas_cumprod, full.alphas_cumprod[sub.timesteps])
    assert torch.equal(sub.sqrt_alphas_cumprod, full.sqrt_alphas_cumprod[sub.timesteps])
    assert respace(full, 2000).timesteps.tolist() == list(range(2000))
    assert respace(full, 1).timesteps.tolist() == [1999]  # one step from pure noise starts at T
    with pytest.raises(ValueError, match="steps=0"):
        respace(full, 0)
