"""Download an archive with a progress bar, check its checksum, unpack it."""

from __future__ import annotations

import hashlib
import logging
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


def download_and_extract(url: str, md5: str, dest: Path, timeout: float = 30.0) -> None:
    """Fetch ``url`` into ``dest``, verify its md5 and unzip it there.

    Raises:
        OSError: the download failed (no network, HTTP error).
        ValueError: the checksum does not match (the partial file is removed).
    """
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / url.rsplit("/", 1)[-1]
    part = archive.with_suffix(archive.suffix + ".part")
    log.info("downloading %s to %s", url, archive)
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=archive.name) as bar:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != md5:
        part.unlink()
        raise ValueError(
            f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; "
            f"the download was removed, try again"
        )
    part.rename(archive)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest)
    log.info("extracted %s into %s", archive.name, dest)
