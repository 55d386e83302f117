"""Decoding: every mode Pillow opens becomes the RGB image a viewer shows; broken files skipped or, strictly, fatal."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from shared_data.cache import list_split, load_or_build
from shared_data.decode import (ALPHA_BACKGROUND, CorruptImageError, decode_square, stored_resolution,
                                 try_decode_square)
from shared_data.registry import IMAGENETTE_CLASSES

RED = (220, 30, 30)
BLUE = (30, 30, 220)
SIDE = 16  # square test images decoded at their own size: no resampling, so lossless formats compare exactly


def _save(path, mode: str, size=(120, 80), fmt="JPEG"):
    image = Image.new("RGB", size, RED)
    image.convert(mode).save(path, format=fmt)
    return path


def _decoded(image: Image.Image, path, **options) -> np.ndarray:
    """Save `image`, check Pillow opens it in the mode under test, and decode it at SIDE."""
    image.save(path, **options)
    with Image.open(path) as opened:
        assert opened.mode == image.mode, f"{path.name} opens as {opened.mode}, not the mode under test"
    pixels = decode_square(path, SIDE)
    assert pixels.shape == (SIDE, SIDE, 3) and pixels.dtype == np.uint8
    return pixels.astype(int)


def _over_background(rgb, alpha) -> np.ndarray:
    rgb, alpha = np.asarray(rgb, float), np.asarray(alpha, float)[..., None]
    return np.rint((rgb * alpha + np.asarray(ALPHA_BACKGROUND) * (255 - alpha)) / 255)


def _palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([channel for colour in colours for channel in colour])
    return image


GRADIENT = np.arange(SIDE * SIDE).reshape(SIDE, SIDE)
STRIPES = GRADIENT % 3  # palette indices 0, 1, 2 in turn
OPAQUE_CASES = {
    "1": (Image.fromarray(GRADIENT % 2 == 0), np.where(GRADIENT % 2 == 0, 255, 0)[..., None].repeat(3, -1)),
    "L": (Image.fromarray(GRADIENT.astype(np.uint8), "L"), GRADIENT[..., None].repeat(3, -1)),
    "P": (_palette_image(STRIPES, [RED, BLUE, (10, 200, 10)]), np.array([RED, BLUE, (10, 200, 10)])[STRIPES]),
    "RGB": (Image.fromarray(np.dstack([GRADIENT, 255 - GRADIENT, GRADIENT // 2]).astype(np.uint8), "RGB"),
            np.dstack([GRADIENT, 255 - GRADIENT, GRADIENT // 2])),
}


@pytest.mark.parametrize("mode", OPAQUE_CASES)
def test_opaque_modes_decode_to_their_exact_colours(tmp_path, mode):
    image, expected = OPAQUE_CASES[mode]
    assert np.array_equal(_decoded(image, tmp_path / "x.png"), expected)


# Three bands across the width: opaque, half transparent (alpha 128), fully transparent over a hidden green.
BAND = np.array([0] * 6 + [1] * 5 + [2] * 5)[None, :].repeat(SIDE, 0)
BAND_ALPHA = np.array([255, 128, 0])[BAND]
HIDDEN = (0, 255, 0)


def _transparent_cases() -> dict[str, tuple[Image.Image, np.ndarray, np.ndarray]]:
    """mode -> (image, its colours, its alpha): what a viewer shows is the colour over the background."""
    rgb = np.array([RED, (0, 0, 0), HIDDEN])[BAND]
    grey = np.array([60, 0, 200])[BAND]
    palette = _palette_image(BAND, [RED, (0, 0, 0), HIDDEN])
    palette.info["transparency"] = bytes([255, 128, 0])  # the PNG tRNS chunk: one alpha per palette entry
    keyed = _palette_image((BAND == 2).astype(int), [RED, HIDDEN])
    keyed.info["transparency"] = 1  # GIF-style: one palette index fully transparent
    return {
        "LA": (Image.fromarray(np.dstack([grey, BAND_ALPHA]).astype(np.uint8), "LA"), grey[..., None], BAND_ALPHA),
        "P-alpha-per-entry": (palette, rgb, BAND_ALPHA),
        "P-transparent-index": (keyed, np.array([RED, HIDDEN])[(BAND == 2).astype(int)], np.where(BAND == 2, 0, 255)),
        "RGBA": (Image.fromarray(np.dstack([rgb, BAND_ALPHA]).astype(np.uint8), "RGBA"), rgb, BAND_ALPHA),
    }


@pytest.mark.parametrize("case", ["LA", "P-alpha-per-entry", "P-transparent-index", "RGBA"])
def test_transparency_is_composited_on_the_background_never_showing_the_hidden_colour(tmp_path, case):
    image, colours, alpha = _transparent_cases()[case]
    pixels = _decoded(image, tmp_path / "x.png")
    assert np.abs(pixels - _over_background(colours, alpha)).max() <= 1
    assert (pixels[alpha == 0] == ALPHA_BACKGROUND).all()


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("YCbCr", "TIFF")])
def test_cmyk_and_ycbcr_decode_to_their_colour(tmp_path, mode, fmt):
    halves = np.array([RED, BLUE])[(np.arange(SIDE) >= SIDE // 2).astype(int)][None].repeat(SIDE, 0)
    image = Image.fromarray(halves.astype(np.uint8), "RGB").convert(mode)
    pixels = _decoded(image, tmp_path / f"x.{fmt.lower()}", format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    # Away from the edge between the halves, where JPEG rings: the colour survives, CMYK not inverted.
    assert np.abs(pixels[:, :4] - RED).max() <= 8 and np.abs(pixels[:, -4:] - BLUE).max() <= 8


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF")],
                         ids=["little-endian-png", "big-endian-tiff"])
def test_16_bit_greyscale_spans_its_full_range_instead_of_clipping_white(tmp_path, mode, fmt):
    values = np.linspace(0, 65535, SIDE * SIDE).round().reshape(SIDE, SIDE)
    image = Image.frombytes(mode, (SIDE, SIDE), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    pixels = _decoded(image, tmp_path / f"x.{fmt.lower()}", format=fmt)
    assert np.array_equal(pixels, np.rint(values * 255 / 65535)[..., None].repeat(3, -1))
    assert len(np.unique(pixels)) == 256  # every grey level, where Pillow's own conversion gave all white


@pytest.mark.parametrize("mode, low, high", [("I", -70_000, 130_000), ("F", -2.5, 7.5)])
def test_32_bit_integer_and_float_greyscale_are_stretched_over_their_own_range(tmp_path, mode, low, high):
    values = np.linspace(low, high, SIDE * SIDE).reshape(SIDE, SIDE)
    values = values.astype(np.float32) if mode == "F" else values.round().astype(np.int32)
    if mode == "F":
        values[5, 5] = np.nan  # no brightness at all: shown as the darkest
    pixels = _decoded(Image.fromarray(values, mode), tmp_path / "x.tiff", format="TIFF")
    expected = np.rint((np.nan_to_num(values.astype(float), nan=low) - low) * 255 / (high - low))
    assert np.array_equal(pixels, expected[..., None].repeat(3, -1))


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_stands_the_photo_upright(tmp_path, orientation, turns):
    """A phone stores the sensor's pixels and says in EXIF how to turn them; stored: red left, blue right."""
    stored = np.zeros((320, 640, 3), np.uint8)
    stored[:, :320], stored[:, 320:] = RED, BLUE
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(stored).save(tmp_path / "phone.JPEG", exif=exif, quality=95)
    upright = np.rot90(stored, turns)  # turns of 90 degrees anticlockwise, as a viewer shows it
    short = min(upright.shape[:2])
    top, left = (upright.shape[0] - short) // 2, (upright.shape[1] - short) // 2
    expected = upright[top:top + short, left:left + short][::short // 4, ::short // 4][1::2, 1::2].astype(int)
    pixels = decode_square(tmp_path / "phone.JPEG", 32)[::8, ::8][1::2, 1::2].astype(int)
    assert np.abs(pixels - expected).max() < 40


def test_large_jpeg_is_decoded_at_a_reduced_draft_scale(tmp_path, monkeypatch):
    Image.new("RGB", (1024, 768), RED).save(tmp_path / "big.JPEG")
    sizes = []
    real_fit = ImageOps.fit

    def recording_fit(image, *args, **kwargs):
        sizes.append(image.size)
        return real_fit(image, *args, **kwargs)

    monkeypatch.setattr(ImageOps, "fit", recording_fit)
    decode_square(tmp_path / "big.JPEG", 64)
    assert sizes == [(128, 96)]  # an eighth of the DCT, still covering 64 x 64


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
    files, labels, _ = list_split(tmp_path / "release", "train", class_ids)
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
    files, labels, _ = list_split(tmp_path / "release", "train", class_ids)
    with pytest.raises(CorruptImageError) as caught:
        load_or_build(tmp_path / "release", "imagenette", "train", files, labels, 16, tmp_path / "cache",
                      num_workers=1, strict=True, progress=False)
    message = str(caught.value)
    assert broken[0].split("/")[-1] in message and "--strict" in message and "\n" not in message
    assert [p for p in (tmp_path / "cache").iterdir()] == []  # nothing half-built left behind
