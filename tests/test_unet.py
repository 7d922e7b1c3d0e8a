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
