"""make_shards: sample layout, reference pixel equality, determinism, every source kind, broken inputs."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import write_images
from PIL import Image

from dataset_tools.make_shards import main, make_shards
from sr3_lightning.data.degradations import prepare_triplet
from sr3_lightning.data.shards import file_sha256

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
ROOT = Path(__file__).parents[1]


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member: bytes} over all shards listed in index.json."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((out / "index.json").read_text())["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int16)


def test_folder_to_shards_layout_and_index(tmp_path: Path) -> None:
    write_images(tmp_path / "src" / "sub", 3, prefix="b")
    write_images(tmp_path / "src", 4, prefix="a")
    index = make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, shard_size=3, progress=False)

    assert index["domain"] == "demo" and (index["lr_size"], index["hr_size"]) == (8, 32)
    assert index["num_samples"] == 7 and index["skipped"] == []
    assert [s["name"] for s in index["shards"]] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["tool_version"] and json.loads((tmp_path / "out" / "index.json").read_text()) == index
    for shard in index["shards"]:
        assert file_sha256(tmp_path / "out" / shard["name"]) == shard["sha256"]
    samples = read_shards(tmp_path / "out")
    assert list(samples) == [
        "a000",
        "a001",
        "a002",
        "a003",
        "b000",
        "b001",
        "b002",
    ]  # sorted by relative path
    for key, sample in samples.items():
        assert sorted(sample) == ["hr.png", "json", "lr.png", "lr_up.png"]
        assert pixels(sample["hr.png"]).shape == (32, 32, 3) and pixels(sample["lr.png"]).shape == (8, 8, 3)
        assert pixels(sample["lr_up.png"]).shape == (32, 32, 3)
        meta = json.loads(sample["json"])
        assert meta["domain"] == "demo" and (meta["lr_size"], meta["hr_size"]) == (8, 32)
        assert meta["source"] == (f"sub/{key}.png" if key.startswith("b") else f"{key}.png")
        assert meta["original_size"] == list(Image.open(tmp_path / "src" / meta["source"]).size)


def test_shards_are_pixel_equal_to_reference(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    shutil.copy(REFERENCE / "prep_input.png", tmp_path / "src")
    make_shards(tmp_path / "src", tmp_path / "out", "ref", 16, 128, progress=False)
    sample = read_shards(tmp_path / "out")["prep_input"]
    for member, reference in (("lr", "prep_lr_16"), ("hr", "prep_hr_128"), ("lr_up", "prep_sr_16_128")):
        expected = np.asarray(Image.open(REFERENCE / f"{reference}.png").convert("RGB")).astype(np.int16)
        assert np.abs(pixels(sample[f"{member}.png"]) - expected).max() == 0, member


def test_two_runs_are_byte_identical_whatever_the_workers(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 10)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        make_shards(tmp_path / "src", out, "demo", 8, 32, shard_size=4, workers=workers, progress=False)
        runs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert list(runs[1]) == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar", "index.json"]
    assert runs[1] == runs[2]


def test_cli_names_the_broken_file_and_finishes(tmp_path: Path) -> None:
    """The acceptance command, as a user runs it, on a folder with one broken file."""
    write_images(tmp_path / "src", 3)
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = subprocess.run(
        [sys.executable, "-m", "dataset_tools.make_shards", "--src", str(tmp_path / "src"), "--out",
         str(tmp_path / "shards"), "--domain", "demo", "--workers", "2"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipping unreadable image broken.png" in result.stderr
    assert "skipped 1 unreadable image(s): broken.png" in result.stderr
    assert "images/s" in result.stderr
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["num_samples"] == 3 and [s["source"] for s in index["skipped"]] == ["broken.png"]


def test_grayscale_palette_16bit_and_rgba_become_rgb(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8), (40, 1))
    Image.fromarray(gray).save(src / "gray.png")
    Image.fromarray(gray).convert("P").save(src / "palette.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "sixteen.png")
    Image.fromarray(np.dstack([gray, gray, gray, gray])).save(src / "rgba.png")
    Image.fromarray(np.dstack([gray] * 3)).save(src / "photo.jpg", quality=95)
    make_shards(src, tmp_path / "out", "modes", 8, 32, progress=False)
    samples = read_shards(tmp_path / "out")
    assert sorted(samples) == ["gray", "palette", "photo", "rgba", "sixteen"]
    hr = {key: pixels(sample["hr.png"]) for key, sample in samples.items()}
    assert np.array_equal(hr["sixteen"], hr["gray"])  # 16-bit scaled to 8 bits, not clipped to white
    assert np.array_equal(hr["rgba"], hr["gray"])


def test_zip_gives_the_same_shards_as_the_folder(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "src", 5)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in reversed(paths):  # member order must not matter
            archive.write(path, path.name)
        archive.writestr("__MACOSX/._img000.png", b"resource fork")
    make_shards(tmp_path / "src", tmp_path / "from_folder", "demo", 8, 32, progress=False)
    index = make_shards(
        tmp_path / "images.zip", tmp_path / "from_zip", "demo", 8, 32, workers=2, progress=False
    )
    assert index["source_kind"] == "zip" and index["num_samples"] == 5
    assert (tmp_path / "from_zip" / "demo-000000.tar").read_bytes() == (
        tmp_path / "from_folder" / "demo-000000.tar"
    ).read_bytes()


def _reference_prepared(tmp_path: Path, n: int) -> list[tuple[Image.Image, Image.Image, Image.Image]]:
    """Triplets as the reference prepare_data.py makes them for 8 -> 32, saved under names str(i).zfill(5)."""
    lmdb = pytest.importorskip("lmdb")  # the optional extra sr3-lightning[lmdb]
    triplets = [prepare_triplet(Image.open(p), 8, 32) for p in write_images(tmp_path / "raw", n)]
    for folder in ("lr_8", "hr_32", "sr_8_32"):
        (tmp_path / "prepared" / folder).mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (lr, hr, sr) in enumerate(triplets):
            stem = str(i).zfill(5)
            for folder, img in (("lr_8", lr), ("hr_32", hr), ("sr_8_32", sr)):
                img.save(tmp_path / "prepared" / folder / f"{stem}.png")
                buffer = io.BytesIO()
                img.save(buffer, format="png")
                txn.put(f"{folder}_{stem}".encode(), buffer.getvalue())
        txn.put(b"length", str(n).encode())
    env.close()
    return triplets


@pytest.mark.parametrize("kind", ["prepared", "lmdb"])
def test_reference_prepared_data_converts(tmp_path: Path, kind: str) -> None:
    triplets = _reference_prepared(tmp_path, 3)
    index = make_shards(tmp_path / kind, tmp_path / "out", "ffhq", 8, 32, workers=2, progress=False)
    assert index["source_kind"] == {"prepared": "reference-folder", "lmdb": "reference-lmdb"}[kind]
    samples = read_shards(tmp_path / "out")
    assert list(samples) == ["00000", "00001", "00002"]
    for (lr, hr, sr), sample in zip(triplets, samples.values()):
        assert np.array_equal(pixels(sample["lr.png"]), np.asarray(lr))
        assert np.array_equal(pixels(sample["hr.png"]), np.asarray(hr))
        assert np.array_equal(pixels(sample["lr_up.png"]), np.asarray(sr))
        assert json.loads(sample["json"])["original_size"] is None


def test_reference_data_at_other_sizes_is_explained(tmp_path: Path) -> None:
    _reference_prepared(tmp_path, 1)
    with pytest.raises(ValueError, match=r"looks reference-prepared \(hr_32, lr_8\).*--lr/--hr"):
        make_shards(tmp_path / "prepared", tmp_path / "out", "ffhq", 16, 128, progress=False)
    with pytest.raises(ValueError, match=r"no 'hr_128_\*' keys.*HR sizes: \['32'\]"):
        make_shards(tmp_path / "lmdb", tmp_path / "out", "ffhq", 16, 128, progress=False)


def test_shards_stream_with_webdataset(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 5)
    index = make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, shard_size=2, progress=False)
    urls = [str(tmp_path / "out" / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"img{i:03d}" for i in range(5)]
    assert {"hr.png", "lr.png", "lr_up.png", "json"} <= set(samples[0])


def test_clashing_stems_and_mixed_domains_are_refused(tmp_path: Path) -> None:
    write_images(tmp_path / "src" / "a", 1)
    write_images(tmp_path / "src" / "b", 1)
    with pytest.raises(ValueError, match=r"share a key.*\['a/img000.png', 'b/img000.png'\]"):
        make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, progress=False)
    make_shards(tmp_path / "src" / "a", tmp_path / "out", "ffhq", 8, 32, progress=False)
    with pytest.raises(ValueError, match="already holds domain 'ffhq'; use one directory per domain"):
        make_shards(tmp_path / "src" / "b", tmp_path / "out", "anime", 8, 32, progress=False)


def test_limit_and_rerun_remove_stale_shards(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 6)
    make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, shard_size=2, progress=False)
    index = make_shards(
        tmp_path / "src", tmp_path / "out", "demo", 8, 32, shard_size=2, limit=3, progress=False
    )
    assert index["num_samples"] == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["demo-000000.tar", "demo-000001.tar"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--domain", "demo"])
    assert exit_info.value.code == 2
    assert "no images found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lr", "hr", "message"),
    [
        (0, 128, r"--lr 0: must be a positive number of pixels"),
        (-4, 128, r"--lr -4: must be a positive number of pixels"),
        (8, 0, r"--hr 0: must be a positive number of pixels"),
        (32, 8, r"--lr 32 --hr 8: the LR size must be smaller than the HR size"),
        (8, 8, r"--lr 8 --hr 8: the LR size must be smaller than the HR size"),
    ],
)
def test_bad_sizes_are_refused_before_reading_images(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    lr: int,
    hr: int,
    message: str,
) -> None:
    """Not one 'unreadable image' warning per file: the flag is named once, and nothing is written."""
    write_images(tmp_path / "src", 2)
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--domain", "demo"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--lr", str(lr), "--hr", str(hr), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, err), err
    assert "unreadable" not in caplog.text and not (tmp_path / "out").exists()


def test_path_keys_tell_apart_sub_folders_that_repeat_names(tmp_path: Path) -> None:
    write_images(tmp_path / "src" / "cat", 2)
    write_images(tmp_path / "src" / "dog", 2)
    with pytest.raises(ValueError, match="pass --keys path"):
        make_shards(tmp_path / "src", tmp_path / "out", "pets", 8, 32, progress=False)
    index = make_shards(tmp_path / "src", tmp_path / "out", "pets", 8, 32, progress=False, keys="path")
    assert index["shards"][0]["keys"] == ["cat_img000", "cat_img001", "dog_img000", "dog_img001"]


def run_with_patched_load(tmp_path: Path, patch: str, *extra: str) -> subprocess.CompletedProcess:
    """make_shards on 6 images, one of whose loads is replaced by ``patch`` (a forked worker inherits it);
    a timeout, not a hang, if the run never ends."""
    write_images(tmp_path / "src", 6)
    code = (
        "import os, sys\nfrom dataset_tools import sources\nfrom dataset_tools.make_shards import main\n"
        "load = sources.FolderSource.load\n"
        "def patched(self, item):\n"
        f"    if item.key == 'img003':\n        {patch}\n    return load(self, item)\n"
        "sources.FolderSource.load = patched\nmain(sys.argv[1:])\n"
    )
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--domain", "demo", "--lr", "8"]
    return subprocess.run(
        [sys.executable, "-c", code, *argv, "--hr", "32", "--shard-size", "2", "--no-progress", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_killed_worker_stops_the_run_with_the_image_it_was_on(tmp_path: Path) -> None:
    result = run_with_patched_load(tmp_path, "os._exit(9)", "--workers", "2")
    assert result.returncode == 1, result.stderr
    assert "a worker process died while encoding the images from img00" in result.stderr
    assert "fewer --workers" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "index.json").exists() and not list((tmp_path / "out").glob("*.partial"))


def test_an_interrupted_run_leaves_whole_shards_and_says_what_to_do(tmp_path: Path) -> None:
    result = run_with_patched_load(tmp_path, "raise KeyboardInterrupt", "--workers", "1")
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert "interrupted before index.json was written; run the same command again" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo-000000.tar"]  # no .partial


def test_a_damaged_index_or_a_file_as_out_is_named(tmp_path: Path) -> None:
    write_images(tmp_path / "src", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.json").write_text('{"dom')  # killed while written by another tool
    with pytest.raises(ValueError, match=r"out/index.json is not a shard index .* delete it"):
        make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out .*file is a file; pass a directory"):
        make_shards(tmp_path / "src", tmp_path / "file", "demo", 8, 32, progress=False)


def test_exif_rotated_photos_are_stored_as_their_pixels_lie_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_images(tmp_path / "src", 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show": a phone photo taken upright
    Image.new("RGB", (60, 40), "red").save(tmp_path / "src" / "phone.jfif", format="JPEG", exif=exif)
    index = make_shards(tmp_path / "src", tmp_path / "out", "demo", 8, 32, progress=False)
    assert index["num_samples"] == 3  # .jfif is a JPEG
    assert "1 image(s) carry an EXIF orientation, which is not applied (nor by the reference)" in caplog.text
    assert "phone.jfif" in caplog.text
