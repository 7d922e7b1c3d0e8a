"""Turn an image collection into deterministic, verifiable tar shards for one domain.

    python -m dataset_tools.make_shards --src PATH --out DIR --domain NAME --lr 16 --hr 128 \
        [--shard-size 1000] [--limit N] [--workers K] [--keys stem|path]

--src is a folder of images (recursive), a zip file, a folder prepared by the reference SR3
``prepare_data.py`` (``hr_{H}/ lr_{L}/ sr_{L}_{H}/``) or its LMDB. Each sample gets ``hr.png``, ``lr.png``,
``lr_up.png`` (preprocessed exactly as the reference) and ``json``; ``index.json`` records sizes, counts
and sha256 per shard. Output depends only on the input and the arguments (not on --workers): sorted input
order, fixed tar metadata, no timestamps. Unreadable images are named, skipped and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import signal
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dataset_tools.sources import Item, Source, make_key, open_source
from sr3_lightning.data.shards import FORMAT, IMAGE_MEMBERS, INDEX_NAME, file_sha256, shard_name

log = logging.getLogger("make_shards")

TOOL_VERSION = "1.1"  # bump whenever the bytes written for the same input change (1.1: .jfif, .jpe read)

_source: Source | None = None  # what each pool worker reads, set once per process by _init_worker
_domain = ""


def _init_worker(source: Source, domain: str, pool_worker: bool = False) -> None:
    global _source, _domain
    _source, _domain = source, domain
    if pool_worker:  # Ctrl-C reaches the whole process group: the main process alone winds the run down
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pool ends workers by SIGTERM


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=6)  # pinned: the bytes must not follow a Pillow default
    return buffer.getvalue()


def _encode(item: Item) -> tuple[Item, dict[str, bytes] | None, str, bool]:
    """Load and encode one item in a worker: (item, {member: bytes}, '', rotated) or (item, None, error,
    False); ``rotated``: the file has an EXIF orientation, which is not applied (as by the reference)."""
    assert _source is not None
    try:
        triplet = _source.load(item)
        meta = {
            "domain": _domain,
            "source": item.source,
            "original_size": list(triplet.original_size) if triplet.original_size else None,
            "lr_size": triplet.lr.size[0],
            "hr_size": triplet.hr.size[0],
        }
        payload = {
            "hr.png": _png(triplet.hr),
            "lr.png": _png(triplet.lr),
            "lr_up.png": _png(triplet.lr_up),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }
    except Exception as err:  # noqa: BLE001 - any failure to read one image skips that image, loudly
        return item, None, f"{type(err).__name__}: {err}", False
    return item, payload, "", triplet.exif_rotated


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: no mtime, owner or mode from the machine
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
        len(data),
        0,
        0o644,
        0,
        0,
        "",
        "",
    )
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    """Writes ``{domain}-{index:06d}.tar`` files of ``shard_size`` samples and records them for the index."""

    def __init__(self, out: Path, domain: str, shard_size: int) -> None:
        self.out, self.domain, self.shard_size = out, domain, shard_size
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._partial = out / "unused.partial"
        self._keys: list[str] = []

    def add(self, key: str, payload: dict[str, bytes]) -> None:
        if self._tar is None:
            self._partial = self.out / (shard_name(self.domain, len(self.shards)) + ".partial")
            self._tar = tarfile.open(self._partial, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - spans calls
        for ext in sorted(payload):
            _add_member(self._tar, f"{key}.{ext}", payload[ext])
        self._keys.append(key)
        if len(self._keys) == self.shard_size:
            self.close()

    def abort(self) -> None:
        """Remove the shard being written: an interrupted run leaves only whole shards behind."""
        if self._tar is not None:
            self._tar.close()
            self._partial.unlink(missing_ok=True)
            self._tar = None

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.out / shard_name(self.domain, len(self.shards))
        os.replace(self._partial, path)
        self.shards.append(
            {
                "name": path.name,
                "num_samples": len(self._keys),
                "sha256": file_sha256(path),
                "keys": self._keys,
            }
        )
        self._tar, self._keys = None, []


KeyKind = Literal["stem", "path"]


def _keyed(items: list[Item], keys: KeyKind) -> list[Item]:
    """``path`` keys name each image by its path under --src (``cat/0001.png`` -> ``cat_0001``), for
    collections that number the images of every sub-folder alike."""
    if keys == "stem":
        return items
    return [Item(make_key(PurePosixPath(i.source).with_suffix("").as_posix()), i.source) for i in items]


def _check_keys(items: Sequence[Item], keys: KeyKind) -> None:
    counts = Counter(item.key for item in items)
    clashes = [item.source for item in items if counts[item.key] > 1]
    if clashes:
        fix = (
            "rename them" if keys == "path" else "pass --keys path (cat/0001.png -> cat_0001), or rename them"
        )
        raise ValueError(
            f"{len(clashes)} files share a key (the file {keys}), e.g. {clashes[:4]}; keys must be unique "
            f"per domain: {fix}"
        )


def _check_sizes(lr_size: int, hr_size: int) -> None:
    """Refuse impossible sizes before any image is read: otherwise every image fails the same way."""
    for flag, size in (("--lr", lr_size), ("--hr", hr_size)):
        if size < 1:
            raise ValueError(f"{flag} {size}: must be a positive number of pixels, e.g. --lr 16 --hr 128")
    if lr_size >= hr_size:
        raise ValueError(
            f"--lr {lr_size} --hr {hr_size}: the LR size must be smaller than the HR size; pass the "
            "low-resolution side as --lr and the high-resolution side as --hr, e.g. --lr 16 --hr 128"
        )


class WorkerDied(RuntimeError):
    """A pool worker was killed (most often for memory) while encoding images."""


def _encoded(
    source: Source, domain: str, items: Sequence[Item], workers: int
) -> Iterator[tuple[Item, dict | None, str, bool]]:
    """Encode items in input order; with workers > 1 in a process pool (``map`` keeps the order). A killed
    worker stops the run with `WorkerDied` (a ``multiprocessing.Pool`` would wait for its task forever)."""
    if workers <= 1:
        _init_worker(source, domain)
        yield from map(_encode, items)
        return
    done = 0
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source, domain, True))
    try:
        for result in pool.map(_encode, items, chunksize=8):
            yield result
            done += 1
    except BrokenProcessPool:
        raise WorkerDied(
            f"a worker process died while encoding the images from {items[done].source} on (killed for "
            "memory? a very large image can take GBs); no index.json was written. Run make_shards again "
            "with fewer --workers."
        ) from None
    finally:  # stopped early (interrupt, error): drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def _check_out(out: Path, domain: str) -> None:
    """One directory per domain: never mix a domain's shards into another's index."""
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file; pass a directory (one per domain), e.g. {out.parent / domain}"
        )
    index = out / INDEX_NAME
    if index.is_file():
        try:
            previous = json.loads(index.read_text())["domain"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{index} is not a shard index (damaged, or written by another tool); delete it to build "
                f"domain '{domain}' in {out}, or choose another --out"
            ) from None
        if previous != domain:
            raise ValueError(
                f"--out {out} already holds domain '{previous}'; use one directory per domain, "
                f"e.g. {out / domain}"
            )


def _write_all(
    source: Source,
    out: Path,
    domain: str,
    items: Sequence[Item],
    shard_size: int,
    workers: int,
    progress: bool,
) -> tuple[_ShardWriter, list[dict[str, str]]]:
    """Encode and write every item; unreadable images are logged and listed, not fatal."""
    writer = _ShardWriter(out, domain, shard_size)
    skipped: list[dict[str, str]] = []
    rotated: list[str] = []
    with (
        logging_redirect_tqdm(),
        tqdm(total=len(items), unit="img", disable=not progress, desc=domain) as bar,
    ):
        try:
            for item, payload, error, exif_rotated in _encoded(source, domain, items, workers):
                if payload is None:
                    log.warning("skipping unreadable image %s (%s)", item.source, error)
                    skipped.append({"source": item.source, "error": error.split(":")[0]})
                else:
                    writer.add(item.key, payload)
                rotated += [item.source] if exif_rotated else []
                bar.update()
        except BaseException:
            writer.abort()
            raise
    writer.close()
    if rotated:
        log.warning(
            "%d image(s) carry an EXIF orientation, which is not applied (nor by the reference): they are "
            "stored as their pixels lie, e.g. sideways; rotate them beforehand if they should be upright: %s",
            len(rotated),
            ", ".join(rotated[:10]) + (" ..." if len(rotated) > 10 else ""),
        )
    return writer, skipped


def _remove_stale(out: Path, domain: str, written: set[str]) -> None:
    """Shards of an earlier, larger (or killed) run of the same domain would otherwise sit beside the new
    index."""
    for stale in sorted(out.glob(f"{domain}-*.tar*")):
        pattern = rf"{re.escape(domain)}-\d{{6}}\.tar(\.partial)?"
        if stale.name not in written and re.fullmatch(pattern, stale.name):
            log.info("removing %s left over from an earlier, larger run", stale)
            stale.unlink()


def make_shards(
    src: Path,
    out: Path,
    domain: str,
    lr_size: int = 16,
    hr_size: int = 128,
    shard_size: int = 1000,
    limit: int | None = None,
    workers: int = 1,
    progress: bool = True,
    keys: KeyKind = "stem",
) -> dict:
    """Write the shards and ``index.json`` for one domain into ``out``; return the index."""
    if not re.fullmatch(r"[\w-]+", domain):
        raise ValueError(f"--domain {domain!r}: use letters, digits, '_' or '-' (it names the shard files)")
    if shard_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"--shard-size {shard_size} / --limit {limit}: must be positive")
    _check_sizes(lr_size, hr_size)
    source = open_source(Path(src), lr_size, hr_size)
    items = _keyed(source.items()[:limit], keys)
    if not items:
        raise ValueError(f"--src {src}: no images found ({source.kind}); expected PNG/JPEG files")
    _check_keys(items, keys)
    out = Path(out)
    _check_out(out, domain)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    writer, skipped = _write_all(source, out, domain, items, shard_size, workers, progress)
    elapsed = time.perf_counter() - start
    if not writer.shards:
        raise ValueError(
            f"--src {src}: none of the {len(items)} images could be read; see the warnings above"
        )
    index = {
        "format": FORMAT,
        "tool_version": TOOL_VERSION,
        "domain": domain,
        "lr_size": lr_size,
        "hr_size": hr_size,
        "members": [f"{m}.png" for m in IMAGE_MEMBERS] + ["json"],
        "source_kind": source.kind,
        "num_samples": sum(s["num_samples"] for s in writer.shards),
        "skipped": skipped,
        "shards": writer.shards,
    }
    partial = out / (INDEX_NAME + ".partial")  # a kill while writing must not leave half an index
    partial.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(partial, out / INDEX_NAME)
    _remove_stale(out, domain, {s["name"] for s in writer.shards})
    log.info(
        "%s: wrote %d samples in %d shards to %s in %.1f s (%.1f images/s)",
        *(domain, index["num_samples"], len(writer.shards), out, elapsed, len(items) / elapsed),
    )
    if skipped:
        names = ", ".join(s["source"] for s in skipped[:20]) + (" ..." if len(skipped) > 20 else "")
        log.warning("skipped %d unreadable image(s): %s", len(skipped), names)
    return index


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="image folder, zip, reference folder or LMDB")
    parser.add_argument("--out", type=Path, required=True, help="output directory (one per domain)")
    parser.add_argument("--domain", required=True, help="domain name, e.g. ffhq, celebahq, anime")
    parser.add_argument("--lr", type=int, default=16, help="LR size in px (default 16)")
    parser.add_argument("--hr", type=int, default=128, help="HR size in px (default 128)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images in sorted order")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default: CPUs, max 8)"
    )
    parser.add_argument(
        "--keys",
        choices=["stem", "path"],
        default="stem",
        help="sample key: the file stem (default), or the path under --src (cat/0001.png -> cat_0001) "
        "when sub-folders repeat file names",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # winds down as after Ctrl-C
    try:
        make_shards(
            args.src,
            args.out,
            args.domain,
            args.lr,
            args.hr,
            args.shard_size,
            args.limit,
            args.workers,
            progress=not args.no_progress,
            keys=args.keys,
        )
    except (ValueError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"make_shards: error: {err}\n")
    except WorkerDied as err:
        parser.exit(1, f"make_shards: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(
            130,
            "make_shards: interrupted before index.json was written; run the same command again to "
            "build the shards.\n",
        )
    finally:  # called in-process (tests, scripts): leave the caller's SIGTERM handling as it was
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
