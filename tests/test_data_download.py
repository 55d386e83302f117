"""Downloading and extracting a release from a local HTTP server: good, truncated, tampered, unsafe."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from shared_data.download import DatasetUnavailable, UnsafeArchiveError, fetch_dataset
from shared_data.registry import get_spec

FOLDER = "imagenette2-160"


def _tgz(members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def _release(extra: list[tarfile.TarInfo] = (), extra_files: dict[str, bytes] | None = None) -> bytes:
    files = {f"{FOLDER}/{split}/n01440764/{split}_0.JPEG": b"not decoded here" for split in ("train", "val")}
    files[f"{FOLDER}/noisy_imagenette.csv"] = b"path\n"
    return _tgz({**files, **(extra_files or {})}, extra)


class _Server:
    """Serves byte strings by path; a route may announce more bytes than it sends (a broken transfer)."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, int]] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, announced = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def serve(self, path: str, body: bytes, announced: int | None = None) -> str:
        self.routes[path] = (body, len(body) if announced is None else announced)
        return self.url + path


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    yield srv
    srv.httpd.shutdown()


def _spec(url: str, body: bytes, **overrides):
    fields = dict(url=url, size_bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    return dataclasses.replace(get_spec("imagenette-160"), **{**fields, **overrides})


def _leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.name.startswith(".") or p.name.endswith(".part"))


def test_good_archive_downloads_verifies_and_extracts(server, tmp_path):
    body = _release()
    url = server.serve("/good/imagenette2-160.tgz", body)
    folder = fetch_dataset(_spec(url, body), tmp_path, progress=False)
    assert folder == tmp_path / FOLDER
    assert (folder / "train" / "n01440764" / "train_0.JPEG").read_bytes() == b"not decoded here"
    assert (tmp_path / "imagenette2-160.tgz").read_bytes() == body
    assert _leftovers(tmp_path) == []
    # Present now, so a second call needs no network at all.
    assert fetch_dataset(_spec("http://127.0.0.1:9/none.tgz", body), tmp_path, progress=False) == folder


def test_truncated_download_is_rejected_and_leaves_nothing(server, tmp_path):
    body = _release()
    url = server.serve("/truncated/imagenette2-160.tgz", body[: len(body) // 2], announced=len(body))
    with pytest.raises(DatasetUnavailable, match="truncated|broke"):
        fetch_dataset(_spec(url, body), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_wrong_checksum_is_rejected_and_leaves_nothing(server, tmp_path):
    body = _release()
    url = server.serve("/tampered/imagenette2-160.tgz", body)
    with pytest.raises(DatasetUnavailable, match="checksum mismatch"):
        fetch_dataset(_spec(url, body, sha256="0" * 64), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unexpected_size_is_rejected_before_downloading(server, tmp_path):
    body = _release()
    url = server.serve("/resized/imagenette2-160.tgz", body)
    with pytest.raises(DatasetUnavailable, match="expected"):
        fetch_dataset(_spec(url, body, size_bytes=len(body) + 1), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def _link(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("extra, extra_files", [
    ([], {"../escaped.txt": b"evil"}),
    ([], {f"{FOLDER}/../../escaped.txt": b"evil"}),
    ([], {"/tmp/absolute-escaped.txt": b"evil"}),
    ([_link(f"{FOLDER}/train/link", tarfile.SYMTYPE, "/etc/passwd")], None),
    ([_link(f"{FOLDER}/train/hard", tarfile.LNKTYPE, f"{FOLDER}/noisy_imagenette.csv")], None),
    ([_link(f"{FOLDER}/train/dev", tarfile.CHRTYPE)], None),
    ([_link(f"{FOLDER}/train/fifo", tarfile.FIFOTYPE)], None),
], ids=["parent", "nested-parent", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_member_is_refused_and_nothing_is_extracted(server, tmp_path, extra, extra_files):
    body = _release(extra, extra_files)
    url = server.serve(f"/unsafe-{len(server.routes)}/imagenette2-160.tgz", body)
    data_dir = tmp_path / "data"
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        fetch_dataset(_spec(url, body), data_dir, progress=False)
    assert not (data_dir / FOLDER).exists()
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute-escaped.txt").exists()
    assert [p.name for p in data_dir.iterdir()] == ["imagenette2-160.tgz"]  # verified archive kept, no staging


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_error_says_where_to_put_the_archive(tmp_path):
    body = _release()
    spec = _spec(f"http://127.0.0.1:{_closed_port()}/imagenette2-160.tgz", body)
    with pytest.raises(DatasetUnavailable) as caught:
        fetch_dataset(spec, tmp_path, progress=False, timeout=5)
    message = str(caught.value)
    assert str(tmp_path / "imagenette2-160.tgz") in message and "\n" not in message
    with pytest.raises(DatasetUnavailable, match="downloads are off"):
        fetch_dataset(spec, tmp_path, allow_download=False)


def test_archive_placed_by_hand_is_verified_then_extracted(tmp_path):
    body = _release()
    spec = _spec(f"http://127.0.0.1:{_closed_port()}/imagenette2-160.tgz", body)
    (tmp_path / "imagenette2-160.tgz").write_bytes(body)
    assert (fetch_dataset(spec, tmp_path, progress=False) / "val").is_dir()


def test_archive_placed_by_hand_with_wrong_content_is_refused(tmp_path):
    body = _release()
    spec = _spec(f"http://127.0.0.1:{_closed_port()}/imagenette2-160.tgz", body)
    (tmp_path / "imagenette2-160.tgz").write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(Exception, match="checksum mismatch"):
        fetch_dataset(spec, tmp_path, progress=False)
    assert not (tmp_path / FOLDER).exists()


def test_checksum_is_recorded_on_first_download_when_unpublished(server, tmp_path):
    body = _release()
    url = server.serve("/unpublished/imagenette2-160.tgz", body)
    fetch_dataset(_spec(url, body, sha256=None, size_bytes=None), tmp_path, progress=False)
    recorded = (tmp_path / "imagenette2-160.tgz.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(body).hexdigest()
