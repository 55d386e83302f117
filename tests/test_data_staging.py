"""Staging folders a killed run left (extraction, synthetic set, cache build): later runs remove them, trash-safely."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shared_data import staging
from shared_data.download import fetch_dataset
from shared_data.prepare import prepare_data
from shared_data.registry import get_spec
from tests.test_data_download import FOLDER, _tgz

REPO = Path(__file__).resolve().parents[1]


def staging_of_a_dead_process(parent: Path, kind: str, name: str) -> Path:
    """A staging folder, holding 1000 bytes, whose owner process has died (as a killed run's does)."""
    code = f"from shared_data.staging import make_staging; print(make_staging({str(parent)!r}, {kind!r}, {name!r}))"
    made = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    folder = Path(made.stdout.strip())
    (folder / name).mkdir()
    (folder / name / "part.bin").write_bytes(b"x" * 1000)
    return folder


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_extraction_killed_part_way_is_removed_by_the_next_run(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    files = {f"{FOLDER}/{split}/n01440764/{i}.JPEG": b"x" * 5000 for split in ("train", "val") for i in range(100)}
    (data_dir / f"{FOLDER}.tgz").write_bytes(_tgz(files))
    script = textwrap.dedent(f"""
        import dataclasses, tarfile, time
        from pathlib import Path
        from shared_data.download import fetch_dataset
        from shared_data.registry import get_spec
        real_extract = tarfile.TarFile.extract
        def slow_extract(*args, **kwargs):
            time.sleep(0.05)
            return real_extract(*args, **kwargs)
        tarfile.TarFile.extract = slow_extract
        spec = dataclasses.replace(get_spec("imagenette-160"), size_bytes=None, sha256=None)
        fetch_dataset(spec, Path({str(data_dir)!r}), progress=False)
    """)
    extractor = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 60
    while len(list(data_dir.glob(f".extract-{FOLDER}-*/{FOLDER}/train/n01440764/*"))) < 5:
        assert extractor.poll() is None and time.monotonic() < deadline, "extraction never started"
        time.sleep(0.05)
    extractor.kill()  # SIGKILL: no cleanup code runs
    extractor.wait()
    assert len(_hidden(data_dir)) == 1 and not (data_dir / FOLDER).exists()
    spec = dataclasses.replace(get_spec("imagenette-160"), size_bytes=None, sha256=None)
    assert fetch_dataset(spec, data_dir, progress=False) == data_dir / FOLDER
    assert _hidden(data_dir) == [] and len(list((data_dir / FOLDER / "train" / "n01440764").iterdir())) == 100


def test_every_kind_of_leftover_is_removed_by_a_later_run_and_reaches_the_trash_empty(
        synthetic_data_dir, tmp_path, trash):  # noqa: F811  (pytest passes the imported fixture)
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_data_dir / "synthetic-tiny-seed0", data_dir / "synthetic-tiny-seed0")
    (data_dir / "cache").mkdir()
    leftovers = [staging_of_a_dead_process(data_dir, "extract", "imagenette2-320"),
                 staging_of_a_dead_process(data_dir, "synthetic", "synthetic-small-seed0"),
                 staging_of_a_dead_process(data_dir / "cache", "building", "synthetic-train-r18-v2-0123456789abcdef")]
    busy = staging.make_staging(data_dir, "extract", "imagewoof2")  # this process's: still at work, kept
    prepare_data("synthetic", data_dir, 16, synthetic_size="tiny", num_workers=2, progress=False)
    assert not any(folder.exists() for folder in leftovers) and busy.is_dir()
    trashed = sorted(trash.glob("*part.bin"))
    assert len(trashed) == 3 and all(p.stat().st_size == 0 for p in trashed)


def test_leftover_whose_owner_cannot_be_checked_is_removed_once_a_day_old(tmp_path):
    # Made before owners were recorded, and one from another host sharing this disk: its processes are not ours to see.
    unknown = [tmp_path / ".extract-imagenette2-320-k2j4h5g6",
               tmp_path / ".building-synthetic-val-r24-v1-0a1b2c-12@other-host-x1y2z3"]
    for folder in unknown:
        folder.mkdir()
    assert staging.remove_abandoned(tmp_path) == [] and all(folder.exists() for folder in unknown)
    day_old = time.time() - staging.UNKNOWN_OWNER_AGE_S - 60
    for folder in unknown:
        os.utime(folder, (day_old, day_old))
    assert sorted(staging.remove_abandoned(tmp_path)) == sorted(unknown)
    assert list(tmp_path.iterdir()) == []
