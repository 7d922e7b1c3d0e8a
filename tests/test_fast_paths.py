"""Each fast path against the fp32 reference path, and the defaults.

Tolerances: fp32 paths (channels_last, unfused/fused attention, torch.compile, fused Adam) agree with the
reference fixtures and with the plain path to abs 1e-5 (forward, loss, gradients) and 1e-4 after two Adam
steps (the reference replay's own tolerance). bf16 autocast (CPU here; Lightning's ``bf16-mixed``) keeps
8 mantissa bits, so it is held to a bound instead: relative RMS error of the UNet output <= 3e-2 (measured
1.2e-2), loss within 1e-2 relative (1.6e-4), gradients within 1e-1 relative RMS (4.7e-2: the L1 loss's sign
flips where eps - eps_hat is near 0) and cosine similarity >= 0.995 (0.9989) to the fp32 ones.
"""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from torch import Tensor

from sr3_lightning import load_reference
from sr3_lightning.cli import cli_main
from sr3_lightning.diffusion import denoising_loss
from sr3_lightning.fast_paths import (
    CPU_DEFAULTS,
    FastPaths,
    find_max_batch,
    predict_max_batch,
    use_fused_adam,
)
from sr3_lightning.models.unet import SelfAttention, UNet
from sr3_lightning.module import SR3Module, step_seed
from tests.loop import fit_on_tiny_batch, tiny_fit_args
from tests.reference import REF, TINY, tiny_io, tiny_unet

EXACT = {"atol": 1e-5, "rtol": 0}
FP32_PATHS = {
    "channels_last": FastPaths(channels_last=True),
    "unfused_attention": FastPaths(fused_attention=False),
    "channels_last+unfused_attention": FastPaths(channels_last=True, fused_attention=False),
}


def loss_and_grads(unet: UNet, step: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference's training loss on its recorded draws, and the gradients it gives."""
    io = tiny_io()
    unet.zero_grad(set_to_none=True)
    loss = denoising_loss(
        unet,
        io["train_hr"],
        io["train_sr"],
        io[f"train_step{step}_sqrt_gamma"].view(-1),
        io[f"train_step{step}_noise"],
        "l1",
    ).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in unet.parameters()]


def assert_agrees_with_reference(fast: UNet) -> None:
    """Same keys as the reference UNet; forward, loss and gradients equal to fp32 eager within EXACT."""
    plain = tiny_unet()
    assert list(fast.state_dict()) == list(plain.state_dict())  # reference keys, checkpoints still load
    io = tiny_io()
    with torch.no_grad():
        out = fast(io["unet_in_x"], io["unet_in_noise_level"])
    torch.testing.assert_close(out, io["unet_out"], **EXACT)
    loss, grads = loss_and_grads(fast)
    ref_loss, ref_grads = loss_and_grads(plain)
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **EXACT)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).square().mean().sqrt() / b.float().square().mean().sqrt())


@pytest.mark.parametrize("paths", FP32_PATHS.values(), ids=FP32_PATHS.keys())
def test_fp32_paths_match_the_reference_forward_loss_and_gradients(paths):
    assert_agrees_with_reference(paths.apply(tiny_unet()))


def test_paths_apply_in_place_idempotently_and_switch_back():
    unet = tiny_unet()
    attn = next(m for m in unet.modules() if isinstance(m, SelfAttention))
    FastPaths(channels_last=True, fused_attention=False).apply(unet)
    FastPaths(channels_last=True, fused_attention=False).apply(unet)
    assert unet.final_conv.block[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert "forward" in vars(attn)
    FastPaths().apply(unet)
    assert unet.final_conv.block[3].weight.is_contiguous() and "forward" not in vars(attn)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_every_convolution_sees_the_layout_the_paths_chose(channels_last):
    """Attention's output must not switch later convolutions to another layout: a conv given a channels_last
    input copies its weights to channels_last on every call (on the CPU, where channels_last is off, 69
    weight copies per step of the 16->128 UNet)."""
    unet = FastPaths(channels_last=channels_last).apply(tiny_unet())
    layout = torch.channels_last if channels_last else torch.contiguous_format
    seen: list[tuple[str, bool]] = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(
                lambda _, args, name=name: seen.append((name, args[0].is_contiguous(memory_format=layout)))
            )
    x = tiny_io()["unet_in_x"]
    with torch.no_grad():
        unet(x.repeat(2, 1, 1, 1).contiguous(memory_format=layout), torch.rand(2 * len(x)))
    assert seen and [name for name, ok in seen if not ok] == []


def test_fused_adam_replays_the_reference_training_steps():
    """From tiny_init_gen.pth, 2 steps with channels_last + fused Adam reach the reference's weights."""
    plain = load_reference(REF / "tiny_init_gen.pth", config=REF / "tiny_config.json").unet.train()
    fast = FastPaths(channels_last=True).apply(
        load_reference(REF / "tiny_init_gen.pth", config=REF / "tiny_config.json").unet.train()
    )
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-4)
    opt_fast = torch.optim.Adam(fast.parameters(), lr=1e-4)
    assert use_fused_adam([opt_fast]) == 1 and opt_fast.param_groups[0]["fused"]
    for step in (0, 1):
        for unet, opt in ((plain, opt_plain), (fast, opt_fast)):
            loss_and_grads(unet, step)
            opt.step()
    final = load_reference(REF / "tiny_gen.pth", REF / "tiny_opt.pth")
    for (name, p), ref, mine in zip(
        fast.state_dict().items(), final.unet.state_dict().values(), plain.parameters()
    ):
        torch.testing.assert_close(p, ref, atol=1e-4, rtol=0, msg=name)
        torch.testing.assert_close(p, mine, **EXACT, msg=name)
    for index, state in final.optimizer_state["state"].items():
        mine = opt_fast.state_dict()["state"][index]
        torch.testing.assert_close(mine["exp_avg"], state["exp_avg"], atol=1e-4, rtol=0)
        torch.testing.assert_close(mine["exp_avg_sq"], state["exp_avg_sq"], atol=1e-4, rtol=0)


def test_fused_adam_continues_from_the_reference_optimizer_state():
    """Loading the reference _opt.pth resets ``fused``; switching after the load keeps the exact update."""
    ck = load_reference(REF / "tiny_gen.pth", REF / "tiny_opt.pth")
    plain = ck.unet.train()
    fast = FastPaths(channels_last=True).apply(load_reference(REF / "tiny_gen.pth").unet.train())
    opts = []
    for unet in (plain, fast):
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        opt.load_state_dict(copy.deepcopy(ck.optimizer_state))
        opts.append(opt)
    assert not opts[1].param_groups[0]["fused"]
    use_fused_adam(opts[1:])
    for unet, opt in zip((plain, fast), opts):
        loss_and_grads(unet)
        opt.step()
    assert float(opts[1].state[next(fast.parameters())]["step"]) == 3.0
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(a, b, **EXACT)


def test_bf16_autocast_stays_within_its_bound():
    io = tiny_io()
    unet = tiny_unet()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(io["unet_in_x"], io["unet_in_noise_level"])
    assert out.dtype == torch.bfloat16
    assert rel_rms(out, io["unet_out"]) <= 3e-2
    ref_loss, ref_grads = loss_and_grads(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(unet)
    assert abs(float(loss) / float(ref_loss) - 1) <= 1e-2
    flat, ref_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in ref_grads])
    assert rel_rms(flat, ref_flat) <= 1e-1
    assert float(torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0)) >= 0.995


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    """torch.compile (inductor, C++ on CPU) of the tiny UNet: forward, loss and gradients to 1e-5."""
    assert_agrees_with_reference(FastPaths(channels_last=True, compile=True).apply(tiny_unet()))


def test_defaults_are_the_fast_paths():
    """Module defaults resolve to every fast path on CUDA and to the measured-fastest set on CPU, and no
    shipped config switches one off."""
    params = inspect.signature(SR3Module.__init__).parameters
    defaults = {k: params[k].default for k in ("channels_last", "compile", "fused_attention", "fused_adam")}
    assert FastPaths.resolve("cuda", **defaults) == FastPaths(True, True, True, True)
    assert FastPaths.resolve("cpu", **defaults) == FastPaths(**CPU_DEFAULTS, fused_attention=True)
    assert params["progress_bar_loss"].default is False  # no host-device sync per step
    for config in Path("configs").glob("*.yaml"):
        model = yaml.safe_load(config.read_text()).get("model", {})
        for knob, default in (*defaults.items(), ("progress_bar_loss", False)):
            assert model.get(knob, default) == default, f"{config} sets model.{knob}"
    for gpu_config in ("configs/sr3_16_128_ffhq.yaml", "configs/finetune_anime.yaml"):
        assert yaml.safe_load(Path(gpu_config).read_text())["trainer"]["benchmark"] is True  # cuDNN autotune


READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # Python-level reads of a tensor's value


def reads_per_step(monkeypatch, tmp_path: Path, progress_bar_loss: bool) -> dict[str, float]:
    """Reads of tensor values per training step (each one a host-device sync on a GPU), by method.

    Fits 3 and 7 steps with no logging step in between and takes the difference, so setup, teardown and
    the end-of-fit log are left out.
    """
    counts = []
    for steps in (3, 7):
        model = SR3Module(unet=TINY, num_timesteps=100, progress_bar_loss=progress_bar_loss)
        calls = dict.fromkeys(READS, 0)
        with monkeypatch.context() as m:
            for name in READS:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _name=name, _original=original, _calls=calls, **kwargs):
                    _calls[_name] += 1
                    return _original(self, *args, **kwargs)

                m.setattr(torch.Tensor, name, counted)
            fit_on_tiny_batch(model, tmp_path, steps, log_every_n_steps=50)
        counts.append(calls)
    return {name: (counts[1][name] - counts[0][name]) / 4 for name in READS}


@pytest.mark.parametrize("progress_bar_loss", [False, True])
def test_loss_is_fetched_only_at_logging_intervals(monkeypatch, tmp_path, progress_bar_loss):
    """Lightning converts a logged value with .item() each step only when it is on the progress bar."""
    fetches = reads_per_step(monkeypatch, tmp_path, progress_bar_loss)["item"]
    assert fetches >= 1 if progress_bar_loss else fetches == 0


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path):
    reads = reads_per_step(monkeypatch, tmp_path, progress_bar_loss=False)
    assert sum(reads.values()) == 0, reads


def test_every_fast_path_switches_from_the_config(tiny_shards, tmp_path):
    """bf16 autocast, gradient accumulation, channels_last, unfused attention and fused Adam from the CLI."""
    cli = cli_main(
        tiny_fit_args(
            tiny_shards,
            tmp_path,
            2,
            "--trainer.precision=bf16-mixed",
            "--trainer.accumulate_grad_batches=2",
            "--model.channels_last=true",
            "--model.fused_attention=false",
            "--model.fused_adam=true",
            "--model.compile=false",
        )
    )
    model = cli.model
    assert cli.trainer.global_step == 2 and cli.trainer.accumulate_grad_batches == 2
    assert model.unet.final_conv.block[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert all("forward" in vars(m) for m in model.unet.modules() if isinstance(m, SelfAttention))
    assert cli.trainer.optimizers[0].param_groups[0]["fused"] is True
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())


def test_compile_mode_reaches_torch_compile_and_is_checked(tiny_shards, tmp_path, monkeypatch, capsys):
    """``model.compile_mode`` is what torch.compile gets; a bad mode and CUDA graphs with gradient
    accumulation are refused with the knob named before any training."""
    modes = []
    monkeypatch.setattr(UNet, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    args = ("--model.compile=true", "--model.compile_mode=max-autotune-no-cudagraphs")
    cli_main(tiny_fit_args(tiny_shards, tmp_path / "ok", 1, *args))
    assert modes == ["max-autotune-no-cudagraphs"]
    with pytest.raises(SystemExit):
        cli_main(tiny_fit_args(tiny_shards, tmp_path / "bad", 1, "--model.compile_mode=fastest"))
    err = capsys.readouterr().err
    assert re.search(r"\"model.compile_mode\".*\n.*Literal\['default', 'reduce-overhead'.*: fastest", err)
    with pytest.raises(ValueError, match="model.compile_mode='fastest': use one of default, reduce-overhead"):
        SR3Module(compile_mode="fastest")
    graphs = (
        "--model.compile=true",
        "--model.compile_mode=reduce-overhead",
        "--trainer.accumulate_grad_batches=2",
    )
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 batches: raise data.batch_size"):
        cli_main(tiny_fit_args(tiny_shards, tmp_path / "acc", 1, *graphs))
    assert modes == ["max-autotune-no-cudagraphs"]


def test_find_max_batch_doubles_then_bisects():
    tried = []

    def try_batch(b: int, fits_up_to: int) -> None:
        tried.append(b)
        if b > fits_up_to:
            raise torch.OutOfMemoryError(f"CUDA out of memory at batch {b}")

    assert find_max_batch(lambda b: try_batch(b, 37), start=4) == 37
    assert tried[:5] == [4, 8, 16, 32, 64]
    assert find_max_batch(lambda b: try_batch(b, 2), start=4) == 2
    assert find_max_batch(lambda b: try_batch(b, 0), start=4) == 0
    assert find_max_batch(lambda b: try_batch(b, 10**6), start=4, limit=100) == 100

    tried.clear()
    assert find_max_batch(lambda b: try_batch(b, 37), start=34, growth=1.25) == 37
    assert tried == [34, 42, 38, 36, 37]

    def broken(b: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_max_batch(broken)


def test_predict_max_batch_extrapolates_peak_memory_linearly():
    gib = 2**30
    # 1 GiB fixed (weights, optimizer state) + 0.5 GiB per image, an 80 GiB card filled to 92 %
    assert predict_max_batch((4, 3 * gib), (8, 5 * gib), 80 * gib) == int((0.92 * 80 - 1) / 0.5)
    with pytest.raises(ValueError, match="growing batch and memory"):
        predict_max_batch((8, 5 * gib), (8, 5 * gib), 80 * gib)


def test_ema_follows_each_optimizer_step_once_with_gradient_accumulation(tmp_path):
    """EMA_k = d EMA_{k-1} + (1 - d) W_k over optimizer steps k, not micro-batches."""
    model = SR3Module(unet=TINY, num_timesteps=100, ema_decay=0.5)
    expected = [p.detach().clone() for p in model.unet.parameters()]

    class Recurrence(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx % 2 == 1:  # the second micro-batch of each step: the weights just changed
                for e, p in zip(expected, pl_module.unet.parameters()):
                    e.lerp_(p.detach(), 0.5)

    fit_on_tiny_batch(model, tmp_path, 3, accumulate_grad_batches=2, callbacks=[Recurrence()])
    for e, ema in zip(expected, model.ema_unet.parameters()):
        torch.testing.assert_close(ema, e, rtol=0, atol=1e-6)


def test_each_micro_batch_of_an_accumulation_window_draws_its_own_noise(tmp_path):
    """global_step counts optimizer steps, so the micro-batches of one window must not share its seed."""
    after_draws: list[tuple[int, Tensor]] = []

    class Draws(Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            after_draws.append((torch.initial_seed(), torch.get_rng_state()))

    model = SR3Module(unet=TINY, num_timesteps=100, seed=3)
    fit_on_tiny_batch(model, tmp_path, 2, accumulate_grad_batches=2, callbacks=[Draws()])
    seeds = [seed for seed, _ in after_draws]
    assert seeds == [step_seed(3, step, 0, micro) for step in (0, 1) for micro in (0, 1)]
    assert step_seed(3, 5, 1) == 3 * 1_000_003 + 5 * 8_191 + 1  # micro-batch 0: the seeds of earlier releases
    states = [state for _, state in after_draws]
    assert all(not torch.equal(a, b) for i, a in enumerate(states) for b in states[i + 1 :])
