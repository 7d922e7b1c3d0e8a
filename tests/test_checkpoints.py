import dataclasses
import json
import logging
import shutil

import pytest
import torch

from sr3_lightning import checkpoints, load_reference, save_reference
from sr3_lightning.checkpoints import CheckpointError, unstored_defaults
from sr3_lightning.diffusion import denoising_loss
from sr3_lightning.init_weights import load_init_weights
from sr3_lightning.models.unet import UNet, UNetConfig
from sr3_lightning.module import SR3Module
from tests.reference import REF, TINY, tiny_io


def test_tiny_reference_loads_strictly_with_schedule_and_adam_state():
    ck = load_reference(REF / "tiny_gen.pth", REF / "tiny_opt.pth")  # tiny_config.json sits beside it
    assert ck.config == TINY
    assert ck.schedule_spec == {"kind": "linear", "num_timesteps": 100, "start": 1e-6, "end": 1e-2}
    assert (ck.step, ck.epoch) == (2, 1)
    opt = torch.optim.Adam(ck.unet.parameters(), lr=1e-4)
    opt.load_state_dict(ck.optimizer_state)
    assert float(opt.state[next(ck.unet.parameters())]["step"]) == 2.0


def test_two_training_steps_replay_the_reference_weights_and_moments():
    """From tiny_init_gen.pth, the reference's 2 Adam steps on fixed draws give tiny_gen/tiny_opt.pth."""
    io = tiny_io()
    unet = load_reference(REF / "tiny_init_gen.pth", config=REF / "tiny_config.json").unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    for s in (0, 1):
        loss = denoising_loss(
            unet,
            io["train_hr"],
            io["train_sr"],
            io[f"train_step{s}_sqrt_gamma"].view(-1),
            io[f"train_step{s}_noise"],
            "l1",
        ).mean()
        torch.testing.assert_close(loss, io[f"train_step{s}_loss"], rtol=1e-5, atol=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = load_reference(REF / "tiny_gen.pth", REF / "tiny_opt.pth")
    for (name, ours), theirs in zip(unet.state_dict().items(), final.unet.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=name)
    for index, state in final.optimizer_state["state"].items():
        mine = opt.state_dict()["state"][index]
        torch.testing.assert_close(mine["exp_avg"], state["exp_avg"], atol=1e-4, rtol=0)
        torch.testing.assert_close(mine["exp_avg_sq"], state["exp_avg_sq"], atol=1e-4, rtol=0)


def test_round_trip_is_lossless(tmp_path):
    ck = load_reference(REF / "tiny_gen.pth", REF / "tiny_opt.pth")
    save_reference(
        tmp_path / "rt_gen.pth",
        ck.unet,
        ck.schedule,
        tmp_path / "rt_opt.pth",
        ck.optimizer_state,
        ck.step,
        ck.epoch,
    )
    original = torch.load(REF / "tiny_gen.pth", weights_only=True)
    again = torch.load(tmp_path / "rt_gen.pth", weights_only=True)
    assert list(again) == list(original)
    for key in original:
        assert torch.equal(again[key], original[key]) and again[key].dtype == original[key].dtype, key
    opt = torch.load(tmp_path / "rt_opt.pth", weights_only=True)
    ref_opt = torch.load(REF / "tiny_opt.pth", weights_only=True)
    assert (opt["iter"], opt["epoch"]) == (ref_opt["iter"], ref_opt["epoch"])
    for index, state in ref_opt["optimizer"]["state"].items():
        assert torch.equal(opt["optimizer"]["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_architecture_is_inferred_from_weights_when_no_config(tmp_path, caplog):
    shutil.copy(REF / "tiny_gen.pth", tmp_path / "tiny_gen.pth")
    with pytest.raises(
        CheckpointError, match=r"norm_groups=32 does not divide.*\(--config\) or --norm-groups"
    ):
        load_reference(tmp_path / "tiny_gen.pth")
    ck = load_reference(tmp_path / "tiny_gen.pth", norm_groups=4)
    assert (ck.config.inner_channel, tuple(ck.config.channel_multiplier), ck.config.res_blocks) == (
        8,
        (1, 2, 2),
        1,
    )
    assert "do not store image_size=128, dropout=0.2: assumed the 16->128 model's" in caplog.text
    assert "--image-size VALUE --dropout VALUE" in caplog.text and "norm_groups=" not in caplog.text
    caplog.clear()
    ck = load_reference(tmp_path / "tiny_gen.pth", norm_groups=4, image_size=32, dropout=0.0)
    assert ck.config == TINY and not caplog.text  # everything the weights lack was given: the exact model
    with pytest.raises(CheckpointError, match="--image-size and --dropout are for weights without a config"):
        load_reference(REF / "tiny_gen.pth", image_size=64)  # tiny_config.json sits beside it
    io = tiny_io()
    with torch.no_grad():
        out = ck.unet.eval()(io["unet_in_x"], io["unet_in_noise_level"])
    torch.testing.assert_close(out, io["unet_out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("unet", "published", "unstored"),
    [
        (UNetConfig(), "sr_sr3_16_128.json", {"norm_groups": 32, "image_size": 128, "dropout": 0.2}),
        (
            UNetConfig(
                norm_groups=16,
                channel_multiplier=(1, 2, 4, 8, 16),
                attn_res=(),
                res_blocks=1,
                dropout=0.0,
                image_size=512,
            ),
            "sr_sr3_64_512.json",
            {"norm_groups": 16, "image_size": 512, "dropout": 0.0},
        ),
        (UNetConfig(inner_channel=32), None, checkpoints.UNSTORED),
    ],
)
def test_published_layouts_supply_what_weights_do_not_store(unet, published, unstored):
    """The 64->512 model's GroupNorm has 16 groups: assuming the 16->128 model's 32 loads without an error
    and changes every output, so weights with its layout take its values."""
    with torch.device("meta"):  # shapes only: the real 64->512 UNet has 155 M parameters
        weights = UNet(unet).state_dict()
    assert unstored_defaults(weights) == (published, unstored)


def test_weights_without_config_take_the_published_layouts_values(tmp_path, caplog, monkeypatch):
    shutil.copy(REF / "tiny_gen.pth", tmp_path / "tiny_gen.pth")
    tiny_layout = (6, 3, 8, (1, 2, 2), 1, (2,))
    values = {"norm_groups": 4, "image_size": 32, "dropout": 0.0}
    monkeypatch.setitem(checkpoints.PUBLISHED, tiny_layout, ("sr_tiny.json", values))
    with caplog.at_level(logging.WARNING):
        ck = load_reference(tmp_path / "tiny_gen.pth")
    assert ck.config == TINY
    assert "the layout of the reference's sr_tiny.json" in caplog.text
    assert "norm_groups=4, image_size=32, dropout=0.0" in caplog.text
    caplog.clear()
    ck = load_reference(tmp_path / "tiny_gen.pth", dropout=0.1)  # what is given wins
    assert ck.config.dropout == 0.1 and "dropout" not in caplog.text


def test_config_beside_checkpoint_may_carry_comments_after_values(tmp_path):
    """The reference's configs comment after values (``"phase": "train", // train or val``)."""
    shutil.copy(REF / "tiny_gen.pth", tmp_path / "tiny_gen.pth")
    lines = (REF / "tiny_config.json").read_text().splitlines()
    commented = ["// sr3 config, reference style"] + [
        f"{line} // {i}" if line.rstrip().endswith(",") else line for i, line in enumerate(lines)
    ]
    text = "\n".join(commented).replace('"name": "sr_tiny_reference"', '"name": "http://x//y"')
    (tmp_path / "config.json").write_text(text)
    assert sum("// " in line for line in commented) > 10
    ck = load_reference(tmp_path / "tiny_gen.pth")
    assert ck.config == TINY
    assert ck.schedule_spec == {"kind": "linear", "num_timesteps": 100, "start": 1e-6, "end": 1e-2}


def test_truncated_file_is_a_clear_error(tmp_path):
    data = (REF / "tiny_gen.pth").read_bytes()
    (tmp_path / "cut_gen.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be read.*truncated or not a PyTorch checkpoint"):
        load_reference(tmp_path / "cut_gen.pth")


def test_wrong_architecture_names_the_first_offending_key():
    wider = TINY.__class__(**{**TINY.to_dict(), "inner_channel": 16})
    with pytest.raises(
        CheckpointError, match=r"noise_level_mlp\.1\.weight has shape \(32, 8\), the model expects \(64, 16\)"
    ):
        load_reference(REF / "tiny_gen.pth", config=wider)
    deeper = TINY.__class__(**{**TINY.to_dict(), "res_blocks": 2})
    with pytest.raises(CheckpointError, match=r"missing key denoise_fn\.downs\.2\.res_block"):
        load_reference(REF / "tiny_gen.pth", config=deeper)


def test_optimizer_file_given_as_generator_is_named():
    with pytest.raises(CheckpointError, match="unexpected key epoch.*Is this an \\*_opt.pth"):
        load_reference(REF / "tiny_opt.pth")


def test_init_from_on_another_noise_schedule_warns_with_both(caplog, tmp_path):
    """SR3 conditions on the noise level, so another schedule works; an unintended one must not be silent."""
    with caplog.at_level(logging.WARNING, logger="sr3_lightning"):
        SR3Module(unet=TINY, num_timesteps=100, init_from=str(REF / "tiny"))
    assert not caplog.records  # the tiny reference was trained with linear 1e-6..1e-2 over T = 100
    ckpt = tmp_path / "t2000.ckpt"
    model = SR3Module(unet=TINY, num_timesteps=2000, init_from=str(REF / "tiny"))
    assert "'num_timesteps': 100" in caplog.text and "'num_timesteps': 2000" in caplog.text
    caplog.clear()
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    with caplog.at_level(logging.WARNING, logger="sr3_lightning"):
        SR3Module(unet=TINY, num_timesteps=2000, init_from=str(ckpt))
        assert not caplog.records
        SR3Module(unet=TINY, num_timesteps=2000, beta_end=2e-2, init_from=str(ckpt))
    assert "'end': 0.02" in caplog.text and "model.beta_end" in caplog.text


def test_init_from_checks_groupnorm_groups_the_weights_cannot_show(tmp_path, caplog, monkeypatch):
    """Any divisor of the widths loads; the config beside the pair settles the groups, a published layout
    hints at them."""
    for name in ("tiny_gen.pth", "tiny_opt.pth"):
        shutil.copy(REF / name, tmp_path / name)
    config = json.loads((REF / "tiny_config.json").read_text())
    config["model"]["unet"]["norm_groups"] = 2
    (tmp_path / "tiny_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"norm_groups=4, but .*tiny_config.json .* with 2: set"):
        SR3Module(unet=TINY, num_timesteps=100, init_from=str(tmp_path / "tiny"))
    (tmp_path / "tiny_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"trainer": "someone else's"}))
    with caplog.at_level(logging.WARNING):
        SR3Module(unet=TINY, num_timesteps=100, init_from=str(tmp_path / "tiny"))  # not a reference config
    assert "config.json is not a reference SR3 config" in caplog.text and "not checked" in caplog.text
    (tmp_path / "config.json").unlink()
    caplog.clear()
    tiny_layout = (6, 3, 8, (1, 2, 2), 1, (2,))
    monkeypatch.setitem(checkpoints.PUBLISHED, tiny_layout, ("sr_tiny.json", {"norm_groups": 2}))
    with caplog.at_level(logging.WARNING):
        SR3Module(unet=TINY, num_timesteps=100, init_from=str(tmp_path / "tiny"))
    assert "layout of the reference's sr_tiny.json, which uses GroupNorm 2 groups" in caplog.text
    assert "Set model.unet.norm_groups: 2" in caplog.text


def test_the_reference_ddpm_module_unet_is_named_not_mangled(tmp_path):
    state = torch.load(REF / "tiny_gen.pth", weights_only=True)
    state["denoise_fn.time_mlp.1.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "ddpm_gen.pth")
    with pytest.raises(CheckpointError, match="DDPM-module UNet .* only the reference's sr3 models load"):
        load_reference(tmp_path / "ddpm_gen.pth")
    config = json.loads((REF / "tiny_config.json").read_text())
    config["model"]["which_model_G"] = "ddpm"
    (tmp_path / "ddpm.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="ddpm.json builds the reference's DDPM-module UNet"):
        load_reference(REF / "tiny_gen.pth", config=tmp_path / "ddpm.json")


def test_init_from_one_of_our_checkpoints_of_another_width_names_the_unet_values_to_set(tmp_path):
    wide = SR3Module(unet=dataclasses.replace(TINY, inner_channel=16), num_timesteps=100)
    torch.save({"state_dict": wide.state_dict(), "hyper_parameters": dict(wide.hparams)}, tmp_path / "w.ckpt")
    with pytest.raises(
        CheckpointError, match=r"trained with model.unet inner_channel: 16 \(config: 8\); set"
    ):
        load_init_weights(tmp_path / "w.ckpt", UNet(TINY))
