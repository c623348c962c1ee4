"""``download`` against a local HTTP server that serves a small random file with Range support."""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import re
import socket
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest

from checkpoints import (
    CHECKPOINTS,
    CheckpointSpec,
    ChecksumError,
    default_checkpoint_path,
    sha256_file,
    verify_file,
)
from download_weights import download
from errors import UserError
from main import main

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


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{FILENAME}"


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


def test_offline_one_line_error(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    assert cli(url, tmp_path) == 2
    [record] = errors_logged(caplog)
    message = record.getMessage()
    assert url in message and str((tmp_path / FILENAME).absolute()) in message
    assert "\n" not in message and record.exc_info is None
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert list(tmp_path.iterdir()) == []


def test_url_with_all_is_refused(tmp_path: Path) -> None:
    assert main(["download", "--model_type", "all", "--url", "http://127.0.0.1:9/x",
                 "--output_dir", str(tmp_path)]) == 2


def test_bad_sha256_flag_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["download", "--sha256", "abc", "--output_dir", str(tmp_path)]) == 2


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


# --- the registry and verification ---------------------------------------------------------

def test_registry_sanity() -> None:
    assert set(CHECKPOINTS) == {"vit_t", "vit_b", "vit_l", "vit_h"}
    for model_type, spec in CHECKPOINTS.items():
        assert spec.model_type == model_type
        assert urlparse(spec.url).scheme == "https"
        assert spec.filename == Path(urlparse(spec.url).path).name
        assert spec.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert spec.sha256_prefix == spec.sha256[:6]
        assert spec.size is not None and spec.size > 10_000_000
        if model_type != "vit_t":
            # SAM's file-name suffix is an MD5 prefix, not a SHA-256 one: a file checked with
            # torch.hub's "name carries the SHA-256 prefix" rule would always be rejected.
            suffix = re.fullmatch(rf"sam_{model_type}_([0-9a-f]{{6}})\.pth", spec.filename)
            assert suffix is not None and not spec.sha256.startswith(suffix.group(1))


def test_default_checkpoint_path() -> None:
    assert default_checkpoint_path("vit_b") == Path("weights/sam_vit_b_01ec64.pth")
    assert default_checkpoint_path("vit_t", "w") == Path("w/mobile_sam.pt")
    with pytest.raises(ValueError, match="vit_t"):
        default_checkpoint_path("vit_x")


def test_verify_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    verify_file(path, CheckpointSpec("t", "u", "f.bin", PAYLOAD_SHA256, size=len(PAYLOAD)))
    # prefix + size only, for entries without a published full hash
    verify_file(path, CheckpointSpec("t", "u", "f.bin", sha256_prefix=PAYLOAD_SHA256[:6],
                                     size=len(PAYLOAD)))
    with pytest.raises(ChecksumError, match="bytes, expected"):
        verify_file(path, CheckpointSpec("t", "u", "f.bin", PAYLOAD_SHA256, size=len(PAYLOAD) + 1))
    wrong = "0" * 64 if PAYLOAD_SHA256[0] != "0" else "1" * 64
    with pytest.raises(ChecksumError, match="SHA-256"):
        verify_file(path, CheckpointSpec("t", "u", "f.bin", wrong))
    with pytest.raises(ValueError):
        CheckpointSpec("t", "u", "f.bin")  # nothing to verify against
