"""Download the statute corpus: ``python -m legal_eagle.citations.fetch [--dest DIR] [--force]``.

It downloads the archive of the public repository ZixinxinWang/Legal-Eagle-InternLM at commit
3521219 over HTTPS, extracts only its ``Retrieval-Augmented Generation/laws/`` folder into a
temporary folder beside the destination and renames it into place, so the destination is
either the old corpus or the complete new one, never half of one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from legal_eagle.citations.corpus import law_files

logger = logging.getLogger(__name__)

REPO = "ZixinxinWang/Legal-Eagle-InternLM"
COMMIT = "3521219"
ARCHIVE_URL = f"https://github.com/{REPO}/archive/{COMMIT}.zip"
LAWS_FOLDER = "Retrieval-Augmented Generation/laws"
MAX_ARCHIVE_BYTES = 500 * 1024 * 1024
MIN_LAW_FILES = 200

Opener = Callable[[str], BinaryIO]


def _urlopen(url: str) -> BinaryIO:
    """Open ``url`` for reading (urllib, 60 s timeout)."""
    import urllib.request

    response: BinaryIO = urllib.request.urlopen(url, timeout=60)  # noqa: S310 - fixed https URL by default
    return response


def _download(url: str, target: Path, opener: Opener) -> None:
    """Copy ``url`` to ``target`` in chunks, refusing archives over MAX_ARCHIVE_BYTES."""
    size = 0
    with opener(url) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > MAX_ARCHIVE_BYTES:
                raise ValueError(f"archive is larger than {MAX_ARCHIVE_BYTES} bytes; refusing it")
            out.write(chunk)
    logger.info("downloaded %d bytes from %s", size, url)


def _extract_laws(archive: Path, target: Path) -> int:
    """Extract the files under LAWS_FOLDER (at any top-level prefix) into ``target``; returns the count."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            parts = PurePosixPath(info.filename).parts
            marker = tuple(PurePosixPath(LAWS_FOLDER).parts)
            starts = [i for i in range(len(parts)) if parts[i:i + len(marker)] == marker]
            if not starts:
                continue
            rel = parts[starts[0] + len(marker):]
            if not rel or any(p in ("", ".", "..") or "\\" in p for p in rel):
                raise ValueError(f"unsafe path in archive: {info.filename!r}")
            dest = target.joinpath(*rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            count += 1
    return count


def fetch_laws(dest: Path, url: str = ARCHIVE_URL, opener: Opener = _urlopen, force: bool = False,
               min_files: int = MIN_LAW_FILES) -> Path:
    """Download and install the statute corpus at ``dest``.

    Args:
        dest: the corpus folder to create or replace (e.g. ``<cache_dir>/laws``).
        url: the repository archive (zip) URL.
        opener: opens a URL for binary reading (tests pass a fake).
        force: replace a corpus that is already there.
        min_files: fewer law files than this in the archive means the wrong archive (1-100000).

    Returns:
        ``dest``.

    Raises:
        ValueError: the archive lacks the laws folder, has too few files or an unsafe path.
        OSError: download or file system errors (the old corpus, if any, is kept).
    """
    if not 1 <= min_files <= 100000:
        raise ValueError(f"min_files must be 1-100000, got {min_files}")
    if dest.is_dir() and law_files(dest) and not force:
        logger.info("statute corpus already at %s (use force to replace it)", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".laws-fetch-", dir=dest.parent))
    try:
        archive = work / "archive.zip"
        _download(url, archive, opener)
        staged = work / "laws"
        staged.mkdir()
        count = _extract_laws(archive, staged)
        found = len(law_files(staged))
        if found < min_files:
            raise ValueError(f"archive has {found} law files under {LAWS_FOLDER!r} "
                             f"(expected at least {min_files})")
        if dest.exists():
            dest.rename(work / "old")
        staged.rename(dest)
        logger.info("installed %d files (%d laws) at %s", count, found, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    import os

    from legal_eagle.config import Settings

    default_dest = Settings.load([], os.environ).laws_path
    parser = argparse.ArgumentParser(prog="python -m legal_eagle.citations.fetch",
                                     description="下载法律条文库 (download the statute corpus).")
    parser.add_argument("--dest", type=Path, default=default_dest,
                        help=f"corpus folder [default: {default_dest}, i.e. LE_LAWS_DIR or <cache_dir>/laws]")
    parser.add_argument("--url", default=ARCHIVE_URL, help=f"archive URL [default: {ARCHIVE_URL}]")
    parser.add_argument("--force", action="store_true", help="replace an existing corpus")
    parser.add_argument("--min-files", type=int, default=MIN_LAW_FILES,
                        help=f"refuse an archive with fewer law files [default: {MIN_LAW_FILES}]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = fetch_laws(args.dest.expanduser(), url=args.url, force=args.force, min_files=args.min_files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        print(f"下载法律条文库失败：{exc}", file=sys.stderr)
        return 1
    print(f"法律条文库已就绪：{path}（{len(law_files(path))} 部法律）。重启应用即可开启法条核对。")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
