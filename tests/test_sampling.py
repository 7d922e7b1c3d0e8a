import pytest
import torch

from sr3_lightning.diffusion import (
    conditional_denoiser,
    respace,
    sample_ddim,
    sample_ddpm,
    sample_from_image,
)
from sr3_lightning.diffusion.sampling import p_mean_variance
from tests.reference import tiny_io, tiny_schedule, tiny_unet


@pytest.mark.parametrize("t", [0, 1, 50, 99])
def test_single_reverse_step_matches_reference(t):
    io = tiny_io()
    sched = tiny_schedule()
    x_t = io[f"pmv_x_t{t}"]
    assert torch.equal(sched.noise_level(t, 2), io[f"pmv_noise_level_t{t}"].view(-1))
    with torch.no_grad():
        mean, log_var = p_mean_variance(conditional_denoiser(tiny_unet(), io["pmv_cond"]), sched, x_t, t)
    torch.testing.assert_close(mean, io[f"pmv_mean_t{t}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(log_var, io[f"pmv_logvar_t{t}"], atol=1e-5, rtol=0)


def test_replayed_100_step_chain_matches_reference():
    io = tiny_io()
    noises = io["chain_noises"]  # row 0: x_T; row k: the noise added at step 100 - k
    kept = list(range(99, -1, -11))  # the reference records every 11th step: 99, 88, ..., 0
    result = sample_ddpm(
        conditional_denoiser(tiny_unet(), io["chain_cond"]),
        noises[:1],
        tiny_schedule(),
        noise_fn=lambda i, x: noises[100 - i].unsqueeze(0),
        record=kept,
    )
    assert result.nfe == 100 and result.recorded_steps == kept
    torch.testing.assert_close(torch.cat(result.intermediates), io["chain_out"][1:], atol=1e-4, rtol=0)


def test_default_rng_order_is_the_reference_one():
    io = tiny_io()
    assert bool(io["chain_matches_seed123_unpatched"])
    denoise = conditional_denoiser(tiny_unet(), io["chain_cond"])  # built first: its init draws from the RNG
    torch.manual_seed(123)
    x_T = torch.randn(1, 3, 32, 32)
    result = sample_ddpm(denoise, x_T, tiny_schedule())
    torch.testing.assert_close(result.images, io["chain_out"][-1:], atol=1e-4, rtol=0)


def test_respaced_ddpm_and_ddim_run_k_network_calls_on_a_batch():
    io = tiny_io()
    cond = io["pmv_cond"]
    denoise = conditional_denoiser(tiny_unet(), cond)
    sub = respace(tiny_schedule(), 10)
    x_T = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_ddpm, sample_ddim):
        result = sampler(denoise, x_T, sub, generator=torch.Generator().manual_seed(0))
        assert result.nfe == 10 and result.images.shape == cond.shape
        assert result.images.abs().max() <= 1.0 + 1e-5


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    io = tiny_io()
    denoise = conditional_denoiser(tiny_unet(), io["pmv_cond"])
    sub = respace(tiny_schedule(), 8)
    x_T = torch.randn(io["pmv_cond"].shape, generator=torch.Generator().manual_seed(3))
    a = sample_ddim(denoise, x_T, sub, generator=torch.Generator().manual_seed(1)).images
    b = sample_ddim(denoise, x_T, sub, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(a, b)
    c = sample_ddim(denoise, x_T, sub, eta=1.0, generator=torch.Generator().manual_seed(1)).images
    d = sample_ddim(denoise, x_T, sub, eta=1.0, generator=torch.Generator().manual_seed(2)).images
    assert not torch.equal(c, d)


def test_ddim_with_eta1_on_the_full_schedule_is_ancestral_ddpm():
    """With eta=1 on an unrespaced schedule, DDIM's step is the DDPM posterior step: same mean and sigma^2
    equal to the posterior variance, so both samplers fed the same noise reach the same images."""
    io = tiny_io()
    denoise = conditional_denoiser(tiny_unet(), io["pmv_cond"])
    sched = tiny_schedule()
    noises = torch.randn(
        sched.num_timesteps + 1, *io["pmv_cond"].shape, generator=torch.Generator().manual_seed(4)
    )
    replay = dict(noise_fn=lambda i, x: noises[i + 1], record=[sched.num_timesteps // 2, 0])
    ddpm = sample_ddpm(denoise, noises[0], sched, **replay)
    ddim = sample_ddim(denoise, noises[0], sched, eta=1.0, **replay)
    assert ddpm.nfe == ddim.nfe == sched.num_timesteps
    torch.testing.assert_close(
        torch.stack(ddim.intermediates), torch.stack(ddpm.intermediates), atol=1e-4, rtol=0
    )
    eta0 = sample_ddim(denoise, noises[0], sched, eta=0.0, **replay)
    assert (eta0.images - ddpm.images).abs().max() > 1e-2


def test_start_from_image_injects_its_steps_noise_and_an_oracle_denoiser_recovers_the_image():
    """With the exact eps of a known x0, every chain returns x0; the first call sees the start step's noise
    level and an x_t whose noise has unit variance (Diff-SR's injection, full and respaced chains)."""
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = []

    def oracle(x_t, sqrt_gamma):
        g = sqrt_gamma.view(-1, 1, 1, 1)
        eps = (x_t - g * x0) / (1 - g**2).sqrt()
        calls.append((sqrt_gamma, eps))
        return eps

    for sched, t_start in ((tiny_schedule(), 60), (respace(tiny_schedule(), 10), 4)):
        for sampler in ("ddpm", "ddim"):
            calls.clear()
            gen = torch.Generator().manual_seed(0)
            out = sample_from_image(oracle, x0, sched, t_start, sampler=sampler, generator=gen)
            assert out.nfe == len(calls) == t_start
            torch.testing.assert_close(calls[0][0], sched.noise_level(t_start - 1, 2))
            assert 0.95 < calls[0][1].std().item() < 1.05
            torch.testing.assert_close(out.images, x0, atol=1e-4, rtol=0)


def test_start_from_image_runs_t_start_steps_and_zero_returns_input():
    io = tiny_io()
    image = io["pmv_cond"]
    denoise = conditional_denoiser(tiny_unet(), image)
    result = sample_from_image(
        denoise, image, tiny_schedule(), 30, generator=torch.Generator().manual_seed(0)
    )
    assert result.nfe == 30 and result.images.shape == image.shape
    unchanged = sample_from_image(denoise, image, tiny_schedule(), 0)
    assert unchanged.nfe == 0 and torch.equal(unchanged.images, image)
    with pytest.raises(ValueError, match="t_start=101"):
        sample_from_image(denoise, image, tiny_schedule(), 101)
