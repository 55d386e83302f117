"""Image file to RGB uint8 at the cache resolution; unreadable files are skipped with a reason."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from shared_data.errors import ConfigError

# Bump when the decoded pixels would change (resampling, crop, colour conversion): it keys the cache.
# 2: transparency composited on ALPHA_BACKGROUND, 16/32-bit and float greyscale scaled (not clipped), EXIF orientation.
PREPROCESS_VERSION = 2
_RESAMPLE = Image.Resampling.BICUBIC
# What shows through transparent pixels: white, as a viewer or a web page shows a transparent PNG. Without it the
# colour hidden under a fully transparent pixel (often black, or garbage) would be trained on.
ALPHA_BACKGROUND = (255, 255, 255)
# Greyscale wider than 8 bits. 16-bit integers have a fixed white level, 65535; 32-bit integers and floats have none
# (they hold depth, counts or radiance), so each such image is stretched from its own minimum to its maximum.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_GREY_MODES = _SIXTEEN_BIT_MODES | {"I", "F"}


class SkippedFile(NamedTuple):
    path: str
    reason: str


class CorruptImageError(ConfigError):
    """A file that would be skipped (not a decodable image, a refused link), raised only in strict mode."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"--strict: {path} cannot be used ({reason}); "
                         "fix or remove it, or run without --strict to skip it")
        self.path = str(path)
        self.reason = reason


def stored_resolution(img_size: int) -> int:
    """The cached side R: training crops img_size from it, validation centre-crops it (256 from 292)."""
    return round(img_size * 292 / 256)


def decode_square(path: str | Path, resolution: int) -> np.ndarray:
    """The file as RGB uint8 [R, R, 3]: short side resized to R, centre-cropped; CorruptImageError if unreadable."""
    try:
        with Image.open(path) as image:
            # JPEG draft decodes at a reduced DCT scale that still covers R x R: several times faster on big files.
            image.draft("RGB", (resolution, resolution))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a phone photo stands the way it was taken
            rgb = to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(path, _reason(path, error)) from None
    square = ImageOps.fit(rgb, (resolution, resolution), method=_RESAMPLE, centering=(0.5, 0.5))
    return np.asarray(square, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens as the RGB image a viewer shows: transparency over ALPHA_BACKGROUND, wide greyscale
    scaled to 0..255 (Pillow's own conversion clips it at 255: a 16-bit PNG comes out all white)."""
    if image.mode in _WIDE_GREY_MODES:
        colour, alpha = _wide_grey(image)
    elif image.has_transparency_data:  # an alpha band, or a palette or colour key marked transparent
        rgba = image.convert("RGBA")
        colour, alpha = rgba.convert("RGB"), rgba.getchannel("A")
    else:
        return image.convert("RGB")
    if alpha is None:
        return colour.convert("RGB")
    composite = Image.new("RGB", image.size, ALPHA_BACKGROUND)
    composite.paste(colour.convert("RGB"), mask=alpha)
    return composite


def _wide_grey(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """A 16-bit, 32-bit or float greyscale image as 8-bit grey, and its transparency mask (a PNG colour key) if any."""
    values = np.asarray(image)
    key = image.info.get("transparency")
    alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L") if isinstance(key, int) else None
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (values.astype(np.uint32) + 128) // 257  # round(v * 255 / 65535), exactly
    else:
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        scale = 255 / (high - low) if high > low else 0.0  # a flat image has no range to stretch: black
        grey = np.rint((np.where(finite, values, low) - low) * scale)
    return Image.fromarray(grey.astype(np.uint8), "L"), alpha


def _reason(path: str | Path, error: Exception) -> str:
    """Why a file failed, in words a person can act on (PIL says "cannot identify" even for empty files)."""
    try:
        if Path(path).stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    return str(error).strip() or type(error).__name__


def try_decode_square(path: str | Path, resolution: int, *,
                      strict: bool = False) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) for a good file, (None, reason) for a bad one; strict mode raises CorruptImageError."""
    try:
        return decode_square(path, resolution), None
    except CorruptImageError as error:
        if strict:
            raise
        return None, error.reason


def skipped_report(skipped: list[SkippedFile]) -> dict:
    """A JSON-ready summary of the files left out, for data_report.json."""
    return {"skipped_count": len(skipped), "skipped": [{"path": s.path, "reason": s.reason} for s in skipped]}
