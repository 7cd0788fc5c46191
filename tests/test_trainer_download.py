"""The downloader and the downloaded corpora, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from autoresearch.trainer import prepare
from autoresearch.trainer.download import DownloadError, download
from autoresearch.trainer.settings import Settings
from autoresearch.trainer.sources import CLIMBMIX_VAL_SHARD, DataError
from trainer_fixtures import cache, mixed_text, session_cache  # noqa: F401

PAYLOAD = bytes(range(256)) * 4000  # ~1 MB


class Server:
    """Serves `files`; `truncate_first[name] = n` makes the first n requests stop halfway."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.truncate_first: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_first.get(name, 0) > 0:
                    server.truncate_first[name] -= 1
                    self.wfile.write(body[: len(body) // 2])  # then drop the connection
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_complete_file_then_noop(tmp_path):
    with Server({"f.bin": PAYLOAD}) as srv:
        dest = download(f"{srv.url}/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert dest.read_bytes() == PAYLOAD
        download(f"{srv.url}/f.bin", tmp_path / "f.bin")
        assert len(srv.requests) == 1  # already there: no second request


def test_interrupted_transfer_resumes_with_range(tmp_path):
    with Server({"f.bin": PAYLOAD}) as srv:
        srv.truncate_first["f.bin"] = 2
        dest = download(f"{srv.url}/f.bin", tmp_path / "f.bin", backoff=0.01, size=len(PAYLOAD),
                        sha256=hashlib.sha256(PAYLOAD).hexdigest())
        assert dest.read_bytes() == PAYLOAD
        assert srv.requests[0] == ("f.bin", None)
        assert srv.requests[1][1] and srv.requests[1][1].startswith("bytes=")  # resumed, not restarted
        assert int(srv.requests[1][1][6:-1]) > 0
        assert not (tmp_path / "f.bin.part").exists()


def test_truncated_file_never_becomes_the_destination(tmp_path):
    with Server({"f.bin": PAYLOAD}) as srv:
        srv.truncate_first["f.bin"] = 100  # every attempt stops early
        with pytest.raises(DownloadError, match="f.bin"):
            download(f"{srv.url}/f.bin", tmp_path / "f.bin", retries=3, backoff=0.01)
        assert not (tmp_path / "f.bin").exists()
        assert len(srv.requests) == 3


def test_wrong_checksum_or_size_is_rejected(tmp_path):
    with Server({"f.bin": PAYLOAD}) as srv:
        with pytest.raises(DownloadError, match="checksum mismatch"):
            download(f"{srv.url}/f.bin", tmp_path / "f.bin", sha256="0" * 64, retries=2, backoff=0.01)
        assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()
        with pytest.raises(DownloadError, match="expected"):
            download(f"{srv.url}/f.bin", tmp_path / "g.bin", size=len(PAYLOAD) + 1, retries=2, backoff=0.01)
        assert not (tmp_path / "g.bin").exists()


def test_missing_file_fails_fast(tmp_path):
    with Server({}) as srv:
        with pytest.raises(DownloadError, match="404"):
            download(f"{srv.url}/nope.bin", tmp_path / "nope.bin", retries=5, backoff=5)
        assert len(srv.requests) == 1  # a 404 is not retried


def parquet_bytes(texts: list[str], path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), path)
    return path.read_bytes()


def test_climbmix_corpus_prepared_from_a_mirror(tmp_path, cache):
    import random

    rng = random.Random(0)
    shards = {
        "shard_00000.parquet": parquet_bytes([mixed_text(rng, 30) for _ in range(80)], tmp_path / "a.parquet"),
        f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet": parquet_bytes([mixed_text(rng, 30) for _ in range(20)],
                                                                  tmp_path / "b.parquet"),
    }
    with Server(shards) as srv:
        srv.truncate_first["shard_00000.parquet"] = 1
        settings = Settings("cpu", "climbmix", srv.url)
        entry = prepare.ensure(settings)
        n_requests = len(srv.requests)
        assert prepare.ensure(settings) == entry and len(srv.requests) == n_requests  # cached: no traffic
    meta = (entry / "meta.json").read_text()
    assert '"corpus": "climbmix"' in meta
    assert (cache / "downloads" / "climbmix" / "shard_00000.parquet").read_bytes() == shards["shard_00000.parquet"]


def test_unreachable_corpus_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path / "empty-cache"))
    with Server({}) as srv:
        with pytest.raises(DataError, match="climbmix: download of .*404"):
            prepare.ensure(Settings("cpu", "climbmix", srv.url + "/missing"))
