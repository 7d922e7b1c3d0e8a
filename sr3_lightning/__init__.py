"""SR3 diffusion super-resolution with PyTorch Lightning, compatible with the reference SR3 checkpoints."""

__version__ = "0.1.0"

from sr3_lightning.checkpoints import load_reference, save_reference  # noqa: E402

__all__ = ["load_reference", "save_reference"]
