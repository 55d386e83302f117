"""Decoding: every mode becomes RGB at the stored resolution; broken files are skipped or, strictly, fatal."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared_data.cache import list_split, load_or_build
from shared_data.decode import CorruptImageError, decode_square, stored_resolution, try_decode_square
from shared_data.registry import IMAGENETTE_CLASSES

RED = (220, 30, 30)


def _save(path, mode: str, size=(120, 80), fmt="JPEG"):
    image = Image.new("RGB", size, RED)
    image.convert(mode).save(path, format=fmt)
    return path


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                       ("RGBA", "PNG"), ("I;16", "PNG")])
def test_every_mode_decodes_to_rgb_square(tmp_path, mode, fmt):
    pixels = decode_square(_save(tmp_path / f"x.{fmt.lower()}", mode, fmt=fmt), 37)
    assert pixels.shape == (37, 37, 3) and pixels.dtype == np.uint8
    if mode in ("RGB", "CMYK", "P", "RGBA"):
        assert np.abs(pixels.astype(int) - RED).max() < 12  # colour survives, CMYK not inverted
    if mode == "L":
        assert np.ptp(pixels, axis=-1).max() == 0  # grey stays grey, in three equal channels


def test_short_side_is_resized_then_centre_cropped(tmp_path):
    left_half_black = np.full((100, 300, 3), 255, np.uint8)
    left_half_black[:, :150] = 0
    Image.fromarray(left_half_black).save(tmp_path / "wide.png")
    pixels = decode_square(tmp_path / "wide.png", 50)
    assert pixels[:, :20].max() < 10 and pixels[:, 30:].min() > 245  # centre crop keeps the middle edge


def test_stored_resolution_keeps_the_256_from_292_ratio():
    assert stored_resolution(256) == 292 and stored_resolution(64) == 73 and stored_resolution(192) == 219


def _broken_files(folder):
    good = _save(folder / "good.JPEG", "RGB")
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "text.JPEG").write_text("this is not an image")
    data = good.read_bytes()
    (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "garbage.JPEG").write_bytes(np.random.default_rng(0).bytes(3000))
    return ["empty.JPEG", "garbage.JPEG", "text.JPEG", "truncated.JPEG"]


def test_corrupt_truncated_empty_and_non_image_files_get_reasons(tmp_path):
    _broken_files(tmp_path)
    reasons = {name: try_decode_square(tmp_path / name, 16)[1]
               for name in ("good.JPEG", "empty.JPEG", "text.JPEG", "truncated.JPEG", "garbage.JPEG")}
    assert reasons["good.JPEG"] is None
    assert reasons["empty.JPEG"] == "empty file"
    assert all(reasons[name] for name in ("text.JPEG", "garbage.JPEG", "truncated.JPEG"))


def _release_with_broken_files(root):
    class_ids = tuple(wnid for wnid, _ in IMAGENETTE_CLASSES)
    for split in ("train", "val"):
        for wnid in class_ids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                _save(root / split / wnid / f"{wnid}_{i}.JPEG", ["RGB", "L", "CMYK"][i % 3], size=(60 + i, 40))
    broken = _broken_files(root / "train" / class_ids[3])
    return class_ids, sorted(f"train/{class_ids[3]}/{name}" for name in broken)


def test_cache_build_skips_and_lists_broken_files_without_crashing(tmp_path):
    class_ids, broken = _release_with_broken_files(tmp_path / "release")
    files, labels = list_split(tmp_path / "release", "train", class_ids)
    split, skipped, _ = load_or_build(tmp_path / "release", "imagenette", "train", files, labels, 16,
                                      tmp_path / "cache", num_workers=2, progress=False)
    assert sorted(s.path for s in skipped) == broken and all(s.reason for s in skipped)
    assert len(split) == len(files) - len(broken) == 21
    assert not set(broken) & set(split.files)
    # Rows stay aligned with their files and labels after the broken ones are squeezed out.
    for row in (0, 6, 7, 20):
        expected = decode_square(tmp_path / "release" / split.files[row], 16)
        assert np.array_equal(split.images[row], expected)
        assert split.labels[row] == class_ids.index(split.files[row].split("/")[1])


def test_strict_mode_fails_fast_naming_the_file(tmp_path):
    class_ids, broken = _release_with_broken_files(tmp_path / "release")
    files, labels = list_split(tmp_path / "release", "train", class_ids)
    with pytest.raises(CorruptImageError) as caught:
        load_or_build(tmp_path / "release", "imagenette", "train", files, labels, 16, tmp_path / "cache",
                      num_workers=1, strict=True, progress=False)
    message = str(caught.value)
    assert broken[0].split("/")[-1] in message and "--strict" in message and "\n" not in message
    assert [p for p in (tmp_path / "cache").iterdir()] == []  # nothing half-built left behind
