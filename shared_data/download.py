"""Fetch a release: download with progress and size/checksum checks, safe extraction, atomic rename."""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from shared_data.registry import DatasetSpec
from shared_data.staging import make_staging, remove_abandoned
from shared_data.trash_safe import atomic_write_bytes, remove_path

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The archive could not be fetched or failed verification."""


class UnsafeArchiveError(DownloadError):
    """The archive holds a member we refuse to extract (escapes the target, a link, a device)."""


class DatasetUnavailable(RuntimeError):
    """Neither the extracted folder, nor the archive, nor a download is available."""


def is_extracted(folder: Path) -> bool:
    """A release folder counts as present when both of its split folders are."""
    return (folder / "train").is_dir() and (folder / "val").is_dir()


def sha256_of(path: Path, *, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"verify {path.name}", disable=not progress) as bar:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def download_file(url: str, dest: Path, *, expected_size: int | None = None, sha256: str | None = None,
                  progress: bool = True, timeout: float = 30.0) -> str:
    """Download `url` to `dest` atomically, verify size and SHA-256, and return the digest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced is not None else None
            if expected_size is not None and announced is not None and announced != expected_size:
                raise DownloadError(f"{url}: server announces {announced} bytes, expected {expected_size}")
            total = expected_size or announced
            with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                  desc=dest.name, disable=not progress) as bar:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (http.client.HTTPException, OSError) as error:
                        raise DownloadError(f"{url}: connection broke after {received} bytes ({error})") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        want = expected_size if expected_size is not None else announced
        if want is not None and received != want:
            raise DownloadError(f"{url}: truncated download, got {received} of {want} bytes; try again")
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise DownloadError(f"{url}: checksum mismatch (sha256 {got}, expected {sha256}); "
                                "the file is corrupt or the release changed")
        os.replace(partial, dest)
        return got
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise DownloadError(f"{url}: cannot download ({getattr(error, 'reason', error)})") from None
    finally:
        remove_path(partial)


def _check_member(member: tarfile.TarInfo, target: Path) -> None:
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"refusing link member {member.name!r} -> {member.linkname!r}")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"refusing special member {member.name!r} (device, fifo or other)")
    resolved = (target / member.name).resolve()
    if os.path.isabs(member.name) or not resolved.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"refusing member {member.name!r}: it escapes the target folder")


def safe_extract(archive: Path, dest_parent: Path, folder: str, *, progress: bool = True) -> Path:
    """Extract `archive` (which must hold `folder/`) into `dest_parent/folder`, all or nothing."""
    dest_parent = Path(dest_parent)
    final = dest_parent / folder
    staging = make_staging(dest_parent, "extract", folder)
    try:
        try:
            with tarfile.open(archive) as tar:
                members = tar.getmembers()
                for member in members:
                    _check_member(member, staging)
                # The library's "data" filter repeats our checks as a second line of defence.
                for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
                    tar.extract(member, staging, filter="data")
        except (tarfile.TarError, EOFError, OSError) as error:
            if isinstance(error, UnsafeArchiveError):
                raise
            raise DownloadError(f"{archive}: not a readable archive ({error})") from None
        if not is_extracted(staging / folder):
            raise DownloadError(f"{archive}: expected {folder}/train and {folder}/val inside")
        if final.exists():
            remove_path(final)
        os.replace(staging / folder, final)
        return final
    finally:
        remove_path(staging)


def fetch_dataset(spec: DatasetSpec, data_dir: Path, *, allow_download: bool = True,
                  progress: bool = True, timeout: float = 30.0) -> Path:
    """The extracted release folder under `data_dir`, extracting or downloading it as needed."""
    data_dir = Path(data_dir)
    remove_abandoned(data_dir)
    folder = data_dir / spec.folder
    if is_extracted(folder):
        return folder
    archive = data_dir / spec.archive_name
    where = (f"download {spec.url} and put it at {archive} (or extract it to {folder}), "
             "or pass --dataset synthetic")
    if not archive.exists():
        if not allow_download:
            raise DatasetUnavailable(f"{spec.name}: not found and downloads are off; {where}")
        try:
            digest = download_file(spec.url, archive, expected_size=spec.size_bytes, sha256=spec.sha256,
                                   progress=progress, timeout=timeout)
        except DownloadError as error:
            raise DatasetUnavailable(f"{spec.name}: {error}; {where}") from None
        if spec.sha256 is None:
            # No published digest: keep the first one so later re-downloads are checked against it.
            atomic_write_bytes(archive.with_name(archive.name + ".sha256"), f"{digest}  {archive.name}\n".encode())
    else:
        _verify_local_archive(spec, archive, progress=progress)
    return safe_extract(archive, data_dir, spec.folder, progress=progress)


def _verify_local_archive(spec: DatasetSpec, archive: Path, *, progress: bool) -> None:
    size = archive.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        raise DownloadError(f"{archive}: {size} bytes, expected {spec.size_bytes}; delete it and download again")
    recorded = archive.with_name(archive.name + ".sha256")
    expected = spec.sha256 or (recorded.read_text().split()[0] if recorded.exists() else None)
    if expected is not None and sha256_of(archive, progress=progress) != expected:
        raise DownloadError(f"{archive}: checksum mismatch; delete it and download again")
