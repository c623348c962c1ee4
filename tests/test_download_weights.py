"""download_weights.py: ``download`` against a local HTTP server that serves a small random file
with Range support (its bad inputs without a server: test_bad_inputs.py; the registry and
verification: test_checkpoints.py)."""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterator

import pytest

from download_weights import download
from main import main
from samlora.core.errors import UserError
from samlora.models.checkpoints import CHECKPOINTS, CheckpointSpec, sha256_file

PAYLOAD = os.urandom(300 * 1024)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
FILENAME = CHECKPOINTS["vit_t"].filename  # the CLI tests download "vit_t" from the local server


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``payload`` at every path; records the Range header of each request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload = PAYLOAD
        self.honour_range = True
        self.ranges: list[str | None] = []  # one entry per GET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{FILENAME}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` support: 206, 416 past the end, 200 when disabled."""

    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        data, header = self.server.payload, self.headers.get("Range")
        self.server.ranges.append(header)
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match and self.server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def spec() -> CheckpointSpec:
    """A registry-style entry for ``PAYLOAD`` (full hash and size)."""
    return CheckpointSpec("tiny", "http://unused.invalid/x", FILENAME, PAYLOAD_SHA256,
                          size=len(PAYLOAD))


def cli(url: str, out: Path, *extra: str) -> int:
    return main(["download", "--model_type", "vit_t", "--output_dir", str(out), "--url", url,
                 "--sha256", PAYLOAD_SHA256, "--timeout", "5", *extra])


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- the command ---------------------------------------------------------------------------

def test_help() -> None:
    assert main(["download", "--help"]) == 0


def test_full_download_verified(server: FileServer, tmp_path: Path) -> None:
    assert cli(server.url, tmp_path) == 0
    assert sha256_file(tmp_path / FILENAME) == PAYLOAD_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]
    assert server.ranges == [None]


def test_corrupted_download_rejected(server: FileServer, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    server.payload = os.urandom(len(PAYLOAD))
    out = tmp_path / "weights"
    assert cli(server.url, out) == 2
    assert list(out.iterdir()) == []  # neither the .part nor the final name
    [record] = errors_logged(caplog)
    assert "corrupted" in record.getMessage()


def test_mirror_is_checked_against_the_official_hash(server: FileServer, tmp_path: Path) -> None:
    # --url without --sha256: the mirror's file must be the official one, and PAYLOAD is not
    assert main(["download", "--model_type", "vit_t", "--output_dir", str(tmp_path),
                 "--url", server.url, "--timeout", "5"]) == 2
    assert server.ranges == [None]
    assert list(tmp_path.iterdir()) == []


def test_present_and_verified_is_skipped(server: FileServer, tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(PAYLOAD)
    assert cli(server.url, tmp_path) == 0
    assert server.ranges == []  # server never contacted


def test_present_but_wrong_is_kept_until_overwrite(server: FileServer, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / FILENAME
    target.write_bytes(b"not a checkpoint")
    assert cli(server.url, tmp_path) == 2
    assert target.read_bytes() == b"not a checkpoint"
    assert "--overwrite" in errors_logged(caplog)[0].getMessage()
    assert server.ranges == []
    assert cli(server.url, tmp_path, "--overwrite") == 0
    assert target.read_bytes() == PAYLOAD


# --- the library function: resume ----------------------------------------------------------

def test_resume_sends_range(server: FileServer, tmp_path: Path, spec: CheckpointSpec) -> None:
    half = len(PAYLOAD) // 2
    (tmp_path / f"{FILENAME}.part").write_bytes(PAYLOAD[:half])
    path = download(spec, tmp_path, url=server.url, timeout=5)
    assert server.ranges == [f"bytes={half}-"]
    assert sha256_file(path) == PAYLOAD_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_resume_ignored_by_server_restarts(server: FileServer, tmp_path: Path,
                                           spec: CheckpointSpec) -> None:
    server.honour_range = False  # answers 200 with the whole file
    (tmp_path / f"{FILENAME}.part").write_bytes(PAYLOAD[:1000])
    path = download(spec, tmp_path, url=server.url, timeout=5)
    assert server.ranges == ["bytes=1000-"]
    assert path.read_bytes() == PAYLOAD


def test_complete_part_answered_416(server: FileServer, tmp_path: Path,
                                    spec: CheckpointSpec) -> None:
    no_size = CheckpointSpec(spec.model_type, spec.url, spec.filename, spec.sha256)
    (tmp_path / f"{FILENAME}.part").write_bytes(PAYLOAD)
    path = download(no_size, tmp_path, url=server.url, timeout=5)
    assert server.ranges == [f"bytes={len(PAYLOAD)}-"]
    assert path.read_bytes() == PAYLOAD


def test_corrupt_part_is_deleted(server: FileServer, tmp_path: Path,
                                 spec: CheckpointSpec) -> None:
    (tmp_path / f"{FILENAME}.part").write_bytes(b"x" * 1000)  # wrong first bytes
    with pytest.raises(UserError, match="corrupted"):
        download(spec, tmp_path, url=server.url, timeout=5)
    assert list(tmp_path.iterdir()) == []
