"""Download one file robustly: retries with backoff, resume (HTTP Range), size and
checksum validation, and an atomic rename so a partial file is never taken for a
finished one."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20


class DownloadError(Exception):
    """The file could not be downloaded intact after all retries."""


class _Corrupt(Exception):
    """The finished file failed validation: restart from zero, don't resume."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Fetch `url` to `dest` unless `dest` already exists; return `dest`.

    Bytes go to ``dest + ".part"``; an interrupted transfer resumes from there
    with a Range request. The part file is renamed onto `dest` only after its
    size matches (`size`, else the server's Content-Length) and, when given,
    its `sha256`. A wrong checksum or size discards the part file and starts
    over. Raises DownloadError after `retries` failed attempts.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = "no attempt made"
    for attempt in range(1, retries + 1):
        try:
            _attempt(url, part, size, sha256, timeout, progress)
            os.replace(part, dest)
            return dest
        except _Corrupt as exc:
            last_error = str(exc)
            part.unlink(missing_ok=True)
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code} {exc.reason}"
            if exc.code == 416:  # our offset is past the end: the part file is bad
                part.unlink(missing_ok=True)
            elif 400 <= exc.code < 500 and exc.code not in (408, 429):
                break  # not found / forbidden: retrying will not help
        except (OSError, http.client.HTTPException) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    raise DownloadError(f"download of {url} failed: {last_error}")


def _attempt(url, part: Path, size, sha256, timeout, progress) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        raise _Corrupt(f"partial file larger than expected size {size}")
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    total = size
    if not (size is not None and have == size):  # nothing left to fetch otherwise
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if have and resp.status != 206:
                have = 0  # the server ignored Range: it is sending the whole file
            expected = _expected_total(resp, have)
            if total is None:
                total = expected
            elif expected is not None and expected != total:
                raise _Corrupt(f"server reports {expected} bytes, expected {total}")
            with open(part, "ab" if have else "wb") as f:
                got = have
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    if progress:
                        progress(got, total)
        # A body shorter than Content-Length raises IncompleteRead above; a server that
        # sends no length and stops early is caught here instead.
    final = part.stat().st_size
    if total is not None and final < total:
        raise OSError(f"transfer stopped at {final} of {total} bytes")  # retry resumes it
    if total is not None and final > total:
        raise _Corrupt(f"got {final} bytes, expected {total}")
    if sha256 and (actual := sha256_file(part)) != sha256.lower():
        raise _Corrupt(f"checksum mismatch: sha256 {actual}, expected {sha256.lower()}")


def _expected_total(resp, offset: int) -> int | None:
    """The full file size the server claims, from Content-Range or Content-Length."""
    content_range = resp.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return offset + int(length) if length is not None else None
