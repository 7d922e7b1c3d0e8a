"""SR3DataModule: batches, limited-data subsets, exactly-once DDP x worker split, resume, errors."""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint

from sr3_lightning.data import SR3DataModule, TrainDomain, ValDomain
from sr3_lightning.data.shards import ShardError
from sr3_lightning.data.train_stream import pass_order

TINY = {"lr_size": 8, "hr_size": 32}


def take(loader: Iterable, n: int) -> list[dict[str, Any]]:
    return list(islice(iter(loader), n))


def keys_of(batches: list[dict[str, Any]]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_train_batches_are_full_dicts_in_range(tiny_shards: Path) -> None:
    dm = SR3DataModule(TrainDomain("anime", str(tiny_shards)), batch_size=4, num_workers=0, **TINY)
    for batch in take(dm.train_dataloader(), 8):  # 32 samples: more than one pass over the 24 images
        assert set(batch) == {"hr", "lr", "lr_up", "key", "domain"}
        assert batch["hr"].shape == batch["lr_up"].shape == (4, 3, 32, 32) and batch["lr"].shape == (
            4,
            3,
            8,
            8,
        )
        for name in ("hr", "lr", "lr_up"):
            assert batch[name].dtype == torch.float32
            assert batch[name].min() >= -1 and batch[name].max() <= 1
        assert len(batch["key"]) == 4 and batch["domain"] == ["anime"] * 4


def test_subset_is_first_n_or_a_stable_seeded_sample(make_domain_shards: Callable[..., Path]) -> None:
    shards = str(make_domain_shards("anime", 20))
    all_keys = [f"anime_{i:03d}" for i in range(20)]

    def subset(limit: int, subset_seed: int | None, **kwargs: Any) -> list[str]:
        dm = SR3DataModule(TrainDomain("anime", shards, limit, subset_seed), **TINY, **kwargs)
        dm.setup("fit")
        return dm.train_keys

    assert subset(6, None) == all_keys[:6]
    seeded = subset(6, 0)
    assert seeded != all_keys[:6] and seeded == sorted(seeded, key=all_keys.index)
    assert subset(6, 0, seed=123, num_workers=0) == subset(6, 0, num_workers=2, batch_size=1) == seeded
    assert set(subset(3, 0)) <= set(seeded) <= set(subset(12, 0))  # nested: the study's N grows
    assert subset(6, 1) != seeded


def test_stream_does_not_depend_on_worker_count(tiny_shards: Path) -> None:
    train = TrainDomain("anime", str(tiny_shards), limit=10, subset_seed=0)
    streams = [
        take(SR3DataModule(train, batch_size=3, num_workers=workers, **TINY).train_dataloader(), 6)
        for workers in (0, 2)
    ]
    assert keys_of(streams[0]) == keys_of(streams[1])
    for a, b in zip(*streams):
        assert all(torch.equal(a[name], b[name]) for name in ("hr", "lr", "lr_up"))


def test_every_image_once_per_pass_across_2_ranks_x_2_workers(
    make_domain_shards: Callable[..., Path],
) -> None:
    dm = SR3DataModule(
        TrainDomain("anime", str(make_domain_shards("anime", 12))), batch_size=3, num_workers=2, **TINY
    )
    dm.setup("fit")
    # 2 ranks x 2 batches x 3 samples = 12 = one pass; take two passes
    per_rank = [take(dm.train_loader(rank=rank, world_size=2), 4) for rank in (0, 1)]
    passes = [
        keys_of(per_rank[0][p * 2 : p * 2 + 2]) + keys_of(per_rank[1][p * 2 : p * 2 + 2]) for p in (0, 1)
    ]
    for seen in passes:
        assert sorted(seen) == sorted(dm.train_keys)  # each image exactly once
    assert set(keys_of(per_rank[0][:2])).isdisjoint(keys_of(per_rank[1][:2]))
    assert passes[0] != passes[1]  # re-shuffled pass


def test_val_loaders_are_fixed_held_out_and_ordered(tiny_shards: Path) -> None:
    val = [ValDomain("anime", str(tiny_shards), 5), ValDomain("ffhq", str(tiny_shards / "ffhq"))]
    dm = SR3DataModule(TrainDomain("anime", str(tiny_shards)), val, batch_size=4, num_workers=0, **TINY)
    dm.setup("fit")
    assert dm.val_domain_names == ["anime", "ffhq"]
    loaders = dm.val_dataloader()
    first, again = [list(loader) for loader in loaders], [list(loader) for loader in dm.val_dataloader()]
    assert keys_of(first[0]) == [f"anime_{i:03d}" for i in range(19, 24)]  # the last 5 in index order
    assert keys_of(first[1]) == [f"ffhq_{i:03d}" for i in range(8)] and first[1][0]["domain"] == ["ffhq"] * 4
    for batches_a, batches_b in zip(first, again):
        for a, b in zip(batches_a, batches_b):
            assert (
                a["key"] == b["key"] and torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr_up"], b["lr_up"])
            )
    assert len(dm.train_keys) == 19 and set(dm.train_keys).isdisjoint(keys_of(first[0]))


def test_hflip_flips_hr_lr_and_lr_up_together(tiny_shards: Path) -> None:
    def batches(hflip: bool) -> list[dict[str, Any]]:
        dm = SR3DataModule(
            TrainDomain("anime", str(tiny_shards)), batch_size=4, num_workers=0, hflip=hflip, **TINY
        )
        return take(dm.train_dataloader(), 3)

    flipped = 0
    for a, b in zip(batches(True), batches(False)):
        assert a["key"] == b["key"]
        for i in range(4):
            same = [torch.equal(a[n][i], b[n][i]) for n in ("hr", "lr", "lr_up")]
            mirrored = [torch.equal(a[n][i], b[n][i].flip(-1)) for n in ("hr", "lr", "lr_up")]
            assert all(same) or all(mirrored)
            flipped += not all(same)
    assert 0 < flipped < 12


class RecordKeys(pl.LightningModule):
    """Trains one scalar and records the keys of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.keys: list[list[str]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.keys.append(batch["key"])
        return (self.weight * batch["hr"].mean() - 1) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path: Path, shards: Path, max_steps: int, ckpt_path: Path | None = None) -> list[list[str]]:
    dm = SR3DataModule(TrainDomain("anime", str(shards), limit=10), batch_size=4, num_workers=2, **TINY)
    model = RecordKeys()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.keys


def test_resume_continues_the_same_stream(tmp_path: Path, tiny_shards: Path) -> None:
    uninterrupted = _fit(tmp_path / "a", tiny_shards, max_steps=6)
    assert _fit(tmp_path / "b", tiny_shards, max_steps=3) == uninterrupted[:3]
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)["SR3DataModule"]
    assert (state["samples_seen"], state["pass"], state["position"]) == (12, 1, 2)  # 3 steps x 4 of 10 images
    assert _fit(tmp_path / "b", tiny_shards, max_steps=6, ckpt_path=last) == uninterrupted[3:]


def test_a_resume_says_when_the_stream_order_changed(tiny_shards: Path, caplog: Any) -> None:
    """Only settings that change the order count: any buffer of at least the subset's size (None, the
    default, or the 10,000 of checkpoints from before it was saved) is the same full permutation."""
    state = _setup(tiny_shards).state_dict()
    assert state["shuffle_buffer"] is None  # the default: a uniform permutation per pass, as the reference
    old = {k: v for k, v in state.items() if k != "shuffle_buffer"}
    for saved, warns in ((state, False), (old, False), ({**state, "shuffle_buffer": 10_000}, False),
                         ({**state, "shuffle_buffer": 5}, True), ({**state, "seed": 1}, True)):  # fmt: skip
        dm = _setup(tiny_shards)
        dm.load_state_dict(saved)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dm.train_loader()
        assert ("shuffle_buffer differ from the checkpoint's" in caplog.text) == warns, saved


def test_config_builds_the_domains_from_yaml_like_dicts(tiny_shards: Path) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(SR3DataModule, "data")
    config = parser.parse_object(
        {"data": {"train": {"domain": "anime", "shards": str(tiny_shards), "limit": 8, "subset_seed": 0},
                  "val": [{"domain": "ffhq", "shards": str(tiny_shards)}], "lr_size": 8, "hr_size": 32}}
    )  # fmt: skip
    dm = parser.instantiate(config).data
    assert (
        isinstance(dm.train, TrainDomain) and isinstance(dm.val[0], ValDomain) and dm.val[0].num_images == 8
    )
    dm.setup("fit")
    assert len(dm.train_keys) == 8 and dm.val_domain_names == ["ffhq"]


# --- errors: each names the file or key and the fix ---------------------------------------------------------


def _setup(shards: Path | str, domain: str = "anime", **kwargs: Any) -> SR3DataModule:
    dm = SR3DataModule(TrainDomain(domain, str(shards)), **{**TINY, **kwargs})
    dm.setup("fit")
    return dm


def _member(shards: Path, key: str, member: str) -> tuple[Path, int, int]:
    """(shard path, data offset, size) of ``{key}.{member}`` in the domain's shards."""
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name == f"{key}.{member}":
                    return path, info.offset_data, info.size
    raise KeyError(key)


def test_missing_or_empty_shard_directory(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"does not exist; create it with python -m dataset_tools.make_shards"
    ):
        _setup(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no index.json for domain 'anime'.*make_shards"):
        _setup(tmp_path / "empty")


def test_domain_not_present(tiny_shards: Path) -> None:
    with pytest.raises(
        ValueError, match=r"domain 'anime' asked for, but .*ffhq.index.json holds domain 'ffhq'"
    ):
        _setup(tiny_shards / "ffhq", "anime")
    with pytest.raises(
        FileNotFoundError, match=r"sub-directories for domains \['anime', 'celebahq', 'ffhq'\]"
    ):
        _setup(tiny_shards, "danbooru")


def test_lr_hr_sizes_must_match_the_model(tiny_shards: Path) -> None:
    expected = (
        r"shards are 8->32 px but the model is configured for 16->128 px; re-run make_shards with --lr 16"
    )
    with pytest.raises(ValueError, match=expected):
        _setup(tiny_shards, lr_size=16, hr_size=128)


def test_index_that_does_not_match_the_shards(tiny_shards: Path) -> None:
    index_path = tiny_shards / "anime" / "index.json"
    index = json.loads(index_path.read_text())
    index["shards"][0]["keys"].pop()
    index["shards"][0]["num_samples"] -= 1
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        ShardError, match=r"anime-000000.tar: holds 10 samples, .*index.json lists 9; the first that differs"
    ):
        _setup(tiny_shards)


def edit_index(shards: Path, edit: Callable[[dict], None]) -> None:
    """Edit the anime index by hand, keeping the shards and their sha256 as make_shards wrote them."""
    index_path = shards / "anime" / "index.json"
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))


def test_hand_edited_indexes_are_named_before_training(tiny_shards: Path) -> None:
    def swap(index: dict) -> None:
        keys = index["shards"][0]["keys"]
        keys[0], keys[1] = keys[1], keys[0]

    edit_index(tiny_shards, swap)
    with pytest.raises(ShardError, match=r"the first that differs is 'anime_000' in the file, 'anime_001'"):
        _setup(tiny_shards)
    edit_index(tiny_shards, swap)
    edit_index(tiny_shards, lambda index: index.update(lr_size=16, hr_size=64))
    with pytest.raises(
        ShardError, match=r"hr.png is 32x32 px but .*index.json says 64x64; the index was edited"
    ):
        _setup(tiny_shards, lr_size=16, hr_size=64)  # before: the first training batch blamed the file
    edit_index(tiny_shards, lambda index: index.update(lr_size=8, hr_size=32))
    edit_index(tiny_shards, lambda index: index["shards"][1]["keys"].__setitem__(0, "anime_000"))
    with pytest.raises(ShardError, match=r"1 key\(s\) are listed more than once, e.g. 'anime_000'"):
        _setup(tiny_shards, on_corrupt="skip")


def test_shard_changed_after_make_shards(tiny_shards: Path) -> None:
    with open(tiny_shards / "anime" / "anime-000001.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match=r"anime-000001.tar: sha256 .* does not match .*on_corrupt: skip"):
        _setup(tiny_shards)


def test_truncated_tar(tiny_shards: Path) -> None:
    path = tiny_shards / "anime" / "anime-000000.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"anime-000000.tar: is truncated .*re-run make_shards"):
        _setup(tiny_shards)


def test_missing_shard_file(tiny_shards: Path) -> None:
    (tiny_shards / "anime" / "anime-000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"anime-000002.tar \(listed in .*index.json\) is missing"):
        _setup(tiny_shards)


def test_corrupt_image_raises_or_is_skipped(tiny_shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, offset, _ = _member(tiny_shards / "anime", "anime_004", "hr.png")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"NOT A PNG")
    with pytest.raises(ShardError, match=r"sample 'anime_004' hr.png cannot be decoded"):
        _setup(tiny_shards)
    with caplog.at_level(logging.WARNING):
        dm = _setup(tiny_shards, on_corrupt="skip", num_workers=0)
    assert "anime_004" not in dm.train_keys and len(dm.train_keys) == 23
    assert "1 of 24 samples of domain 'anime' skipped" in caplog.text and "anime_004" in caplog.text
    assert len(take(dm.train_dataloader(), 7)) == 7


def test_many_skipped_samples_are_listed_ten_and_counted(
    tiny_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(10):  # every sample of the first shard: its sha256 and 10 samples, 11 problems
        path, offset, _ = _member(tiny_shards / "anime", f"anime_{i:03d}", "hr.png")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"NOT A PNG")
    with caplog.at_level(logging.WARNING):
        dm = _setup(tiny_shards, on_corrupt="skip", num_workers=0)
    assert len(dm.train_keys) == 14 and "10 of 24 samples of domain 'anime' skipped" in caplog.text
    assert caplog.text.count("cannot be decoded") == 9 and "... and 1 more" in caplog.text


def test_limit_larger_than_the_domain(tiny_shards: Path) -> None:
    dm = SR3DataModule(
        TrainDomain("anime", str(tiny_shards), limit=100), [ValDomain("anime", str(tiny_shards))], **TINY
    )
    with pytest.raises(
        ValueError,
        match=r"limit 100 but .*anime.index.json holds 24 images, 8 of them held out for validation",
    ):
        dm.setup("fit")


def test_every_image_held_out_for_validation(make_domain_shards: Callable[..., Path]) -> None:
    """Val taking all images of the train shards is a config problem, not a corrupt shard."""
    shards = str(make_domain_shards("anime", 12))
    for limit in (None, 4):
        dm = SR3DataModule(TrainDomain("anime", shards, limit), [ValDomain("anime", shards, 12)], **TINY)
        with pytest.raises(
            ValueError,
            match=r"all 12 images of .*anime.index.json are held out for validation of domain 'anime'; "
            r"lower its val `num_images` or add training images",
        ):
            dm.setup("fit")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="each domain may appear once"):
        SR3DataModule(val=[ValDomain("ffhq", "a"), ValDomain("ffhq", "b")])
    with pytest.raises(ValueError, match="batch_size 0"):
        SR3DataModule(batch_size=0)


def test_pass_order_is_a_seeded_permutation_per_pass() -> None:
    groups = np.array([0] * 5 + [1] * 5 + [2] * 3)  # 3 shards
    orders = [pass_order(groups, seed=0, pass_index=p, shuffle_buffer=100)[0] for p in (0, 1)]
    assert all(sorted(order) == list(range(13)) for order in orders) and list(orders[0]) != list(orders[1])
    assert np.array_equal(pass_order(groups, 0, 0, 100)[0], orders[0])  # a function of (seed, pass) only
    assert list(pass_order(groups, 0, 0, shuffle_buffer=0)[0]) == list(range(13))  # 0: index order
    full = [pass_order(groups, 0, 0, size)[0].tolist() for size in (None, 13, 10_000)]
    assert full[0] == full[1] == full[2] == orders[0].tolist()  # None: the whole pass, as any buffer >= N
