"""Data: reference preprocessing (``degradations``), the shard format and its checks (``shards``), the
resumable train stream (``train_stream``) and ``SR3DataModule`` (``datamodule``).

The data module is imported on first use, so that ``dataset_tools`` and ``degradations`` do not pay for
importing Lightning.
"""

from typing import Any

__all__ = ["SR3DataModule", "TrainDomain", "ValDomain"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sr3_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
