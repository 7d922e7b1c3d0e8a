import json

import torch

from sr3_lightning.models.unet import UNet, UNetConfig
from tests.reference import REF, tiny_io, tiny_unet


def test_real_16_128_unet_has_the_reference_keys_shapes_and_size():
    manifest = json.loads((REF / "sr3_16_128_state_dict.json").read_text())
    expected = [
        (k.removeprefix("denoise_fn."), s) for k, s, _ in manifest["state_dict"] if "denoise_fn." in k
    ]
    unet = UNet(UNetConfig())  # defaults = the reference 16->128 config
    assert [(k, list(v.shape)) for k, v in unet.state_dict().items()] == expected
    assert sum(p.numel() for p in unet.parameters()) == manifest["num_trainable_parameters"]


def test_forward_matches_reference_output():
    io = tiny_io()
    with torch.no_grad():
        out = tiny_unet()(io["unet_in_x"], io["unet_in_noise_level"])
    torch.testing.assert_close(out, io["unet_out"], atol=1e-5, rtol=0)


def test_noise_level_accepts_flat_and_column_shapes():
    io = tiny_io()
    unet = tiny_unet()
    with torch.no_grad():
        flat = unet(io["unet_in_x"], io["unet_in_noise_level"].view(-1))
        col = unet(io["unet_in_x"], io["unet_in_noise_level"])
    assert torch.equal(flat, col)


def test_a_run_from_scratch_starts_from_the_reference_init_bit_for_bit(tmp_path):
    """``seed_everything: 0`` then the orthogonal init, as the reference's ``torch.manual_seed(0)`` then
    ``define_G``: the same starting weights, so a from-scratch comparison starts level."""
    from sr3_lightning.cli import SR3CLI

    args = ["--config", "configs/tiny_cpu.yaml", f"--trainer.default_root_dir={tmp_path}"]
    cli = SR3CLI(args=args, run=False)
    reference = torch.load(REF / "tiny_init_gen.pth", weights_only=True)
    ours = cli.model.unet.state_dict()
    weights = {k.removeprefix("denoise_fn."): v for k, v in reference.items() if "denoise_fn." in k}
    assert list(ours) == list(weights)
    assert all(torch.equal(ours[k], v) for k, v in weights.items())
