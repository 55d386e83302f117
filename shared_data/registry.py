"""Dataset names mapped to their release: URL, archive size and checksum, folder, classes."""

from __future__ import annotations

import dataclasses

from shared_data.errors import ConfigError

SYNTHETIC = "synthetic"
NOISY_LABEL_PERCENTS = (0, 1, 5, 25, 50)
_BASE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/"

IMAGENETTE_CLASSES = (
    ("n01440764", "tench"),
    ("n02102040", "English springer"),
    ("n02979186", "cassette player"),
    ("n03000684", "chain saw"),
    ("n03028079", "church"),
    ("n03394916", "French horn"),
    ("n03417042", "garbage truck"),
    ("n03425413", "gas pump"),
    ("n03445777", "golf ball"),
    ("n03888605", "parachute"),
)
IMAGEWOOF_CLASSES = (
    ("n02086240", "Shih-Tzu"),
    ("n02087394", "Rhodesian ridgeback"),
    ("n02088364", "beagle"),
    ("n02089973", "English foxhound"),
    ("n02093754", "Border terrier"),
    ("n02096294", "Australian terrier"),
    ("n02099601", "golden retriever"),
    ("n02105641", "Old English sheepdog"),
    ("n02111889", "Samoyed"),
    ("n02115641", "dingo"),
)
# Imagenette v2 per-class image counts (train, val), in sorted wnid order: 9,469 and 3,925 in all.
IMAGENETTE_COUNTS = (
    (963, 387), (955, 395), (993, 357), (858, 386), (941, 409),
    (956, 394), (961, 389), (931, 419), (951, 399), (960, 390),
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One downloadable release (or the synthetic stand-in, which has no URL)."""

    name: str
    url: str | None
    folder: str  # the folder the archive extracts to, under --data-dir
    size_bytes: int | None
    sha256: str | None  # None: recorded next to the archive on first download
    classes: tuple[tuple[str, str], ...]
    noisy_csv: str | None

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.url else ""

    @property
    def class_ids(self) -> tuple[str, ...]:
        return tuple(wnid for wnid, _ in self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.classes)


def _release(name: str, folder: str, size: int, sha256: str, classes, noisy_csv: str) -> DatasetSpec:
    return DatasetSpec(name, f"{_BASE_URL}{folder}.tgz", folder, size, sha256, classes, noisy_csv)


# Sizes and SHA-256 digests as published in TensorFlow Datasets' checksum lists for these URLs.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _release("imagenette", "imagenette2", 1557161267,
                 "6cbfac238434d89fe99e651496f0812ebc7a10fa62bd42d6874042bf01de4efd",
                 IMAGENETTE_CLASSES, "noisy_imagenette.csv"),
        _release("imagenette-320", "imagenette2-320", 341663724,
                 "569b4497c98db6dd29f335d1f109cf315fe127053cedf69010d047f0188e158c",
                 IMAGENETTE_CLASSES, "noisy_imagenette.csv"),
        _release("imagenette-160", "imagenette2-160", 99003388,
                 "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
                 IMAGENETTE_CLASSES, "noisy_imagenette.csv"),
        _release("imagewoof", "imagewoof2", 1343482285,
                 "d6f2ffc7b95663f7701b94cea32db1683b9a50dd389382c7cca024e840af0379",
                 IMAGEWOOF_CLASSES, "noisy_imagewoof.csv"),
        _release("imagewoof-320", "imagewoof2-320", 328288506,
                 "4e4905ed7643120daaf9bf3b2ef7f3a7e8396d9bdaf254a38c6f01f618b4973d",
                 IMAGEWOOF_CLASSES, "noisy_imagewoof.csv"),
        _release("imagewoof-160", "imagewoof2-160", 92560471,
                 "663c22f69c2802d85e2a67103c017e047096702ffddf9149a14011b7002539bf",
                 IMAGEWOOF_CLASSES, "noisy_imagewoof.csv"),
        DatasetSpec(SYNTHETIC, None, SYNTHETIC, None, None, IMAGENETTE_CLASSES, "noisy_imagenette.csv"),
    )
}
DATASET_NAMES = tuple(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The release called `name`; ConfigError naming --dataset when there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}") from None
