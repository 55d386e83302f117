"""Image file to RGB uint8 at the cache resolution; unreadable files are skipped with a reason."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

# Bump when the decoded pixels would change (resampling, crop, colour conversion): it keys the cache.
PREPROCESS_VERSION = 1
_RESAMPLE = Image.Resampling.BICUBIC


class SkippedFile(NamedTuple):
    path: str
    reason: str


class CorruptImageError(ValueError):
    """A file that is not a decodable image, raised only in strict mode."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason}); "
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
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise CorruptImageError(path, _reason(path, error)) from None
    square = ImageOps.fit(rgb, (resolution, resolution), method=_RESAMPLE, centering=(0.5, 0.5))
    return np.asarray(square, dtype=np.uint8)


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
