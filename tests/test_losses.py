import pytest
import torch

from sr3_lightning.diffusion import denoising_loss, q_sample, sample_noise_level
from tests.reference import tiny_io, tiny_schedule, tiny_unet


def test_q_sample_equals_reference():
    io = tiny_io()
    x_t = q_sample(io["loss_hr"], io["loss_sqrt_gamma"].view(-1), io["loss_noise"])
    torch.testing.assert_close(x_t, io["loss_x_noisy"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_reproduces_reference_sum(kind):
    io = tiny_io()
    with torch.no_grad():
        per_sample = denoising_loss(
            tiny_unet(), io["loss_hr"], io["loss_sr"], io["loss_sqrt_gamma"].view(-1), io["loss_noise"], kind
        )
    b, c, h, w = io["loss_hr"].shape
    assert per_sample.shape == (b,)
    # our batch loss is mean over samples of mean over pixels = the reference's sum / (b*c*h*w)
    torch.testing.assert_close(per_sample.mean() * b * c * h * w, io[f"loss_sum_{kind}"], rtol=1e-5, atol=0)


def test_noise_level_is_drawn_inside_the_step_interval():
    sched = tiny_schedule()
    gen = torch.Generator().manual_seed(0)
    t, g = sample_noise_level(sched, 512, t_min=10, t_max=20, per_sample=True, generator=gen)
    assert t.min() >= 10 and t.max() <= 20 and len(t.unique()) > 1
    hi, lo = sched.sqrt_alphas_cumprod_prev[t - 1].float(), sched.sqrt_alphas_cumprod_prev[t].float()
    assert ((g <= hi) & (g >= lo)).all()


def test_batch_mode_draws_one_step_per_batch():
    t, _ = sample_noise_level(tiny_schedule(), 8, generator=torch.Generator().manual_seed(1))
    assert len(t.unique()) == 1


@pytest.mark.parametrize(
    ("t_min", "t_max", "message"),
    [
        (0, 50, r"t starts at 1; use \(1, 50\)"),
        (60, 50, "t_min must not exceed t_max"),
        (1, 101, "t_max <= 100"),
    ],
)
def test_bad_timestep_range_is_rejected_with_the_fix(t_min, t_max, message):
    with pytest.raises(ValueError, match=message):
        sample_noise_level(tiny_schedule(), 2, t_min=t_min, t_max=t_max)
