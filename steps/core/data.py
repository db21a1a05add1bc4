"""Datasets as in-memory uint8 arrays: fetching, parsing, splitting, saving and verifying.

Everything here is pure Python + NumPy (torchvision only for the real download), so it can
be unit-tested on tiny arrays and loaded without pickle.

Every dataset ends up as the same shape: ``x`` uint8 (N, 28, 28) with raw pixels 0-255 and
``y`` int64 (N,) class indices. Normalisation lives inside the model, not here, so the
logged model takes raw images.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import socket
import zipfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from steps.core.choices import DATASETS
from steps.core.text import described

log = logging.getLogger(__name__)

IMAGE_SIZE = 28
DATA_FILE = "dataset.npz"
MANIFEST_FILE = "manifest.json"

# The MNIST family shares one IDX layout; torchvision knows the official mirrors and md5s.
TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "digits": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# A download that hangs is worse than one that fails: keep every socket operation bounded.
DOWNLOAD_TIMEOUT_S = 15


class DataError(ValueError):
    """Input data is missing, corrupt or inconsistent. The message is meant for the user."""


@dataclass(frozen=True)
class Dataset:
    """Train and test splits of one image-classification dataset, as raw uint8 pixels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    @cached_property  # the arrays are not modified after loading; hash them once
    def digest(self) -> str:
        return dataset_digest(self.x_train, self.y_train, self.x_test, self.y_test)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "digest": self.digest,
            "train_size": int(len(self.y_train)),
            "test_size": int(len(self.y_test)),
            "classes": list(self.classes),
        }


def dataset_digest(*arrays: np.ndarray) -> str:
    """Content hash of the arrays (shape, dtype and bytes), stable across machines."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- IDX parsing

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """Parse one IDX file (the MNIST format) into an array, checking header and length."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_DTYPES or ndim not in (1, 3):
        raise DataError(f"{source}: unsupported IDX type 0x{dtype_code:02x} with {ndim} dims")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{source}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{source}: truncated or corrupt IDX file "
            f"({len(raw)} bytes, header says {expected})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def encode_idx(array: np.ndarray) -> bytes:
    """The inverse of :func:`parse_idx`: a uint8 array in the IDX format MNIST uses."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip file ({exc})") from None
    return data


def find_idx_files(folder: Path) -> dict[str, Path]:
    """Locate the four IDX files in ``folder``: flat or torchvision layout, gzipped or not."""
    candidates = [folder, *(p for p in folder.glob("*/raw")), folder / "raw"]
    found: dict[str, Path] = {}
    missing = []
    for key, stem in IDX_FILES.items():
        for base in candidates:
            hit = next((base / n for n in (stem, stem + ".gz") if (base / n).is_file()), None)
            if hit:
                found[key] = hit
                break
        else:
            missing.append(stem)
    if missing:
        raise DataError(
            f"data_dir {folder} is missing {', '.join(missing)} (.gz or not); expected the four "
            "MNIST-style IDX files, flat or in torchvision's <Name>/raw/ layout"
        )
    return found


def load_idx_folder(folder: str | os.PathLike, name: str) -> Dataset:
    """Read a dataset from a folder that already holds the four IDX files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data_dir {folder} is not a folder")
    paths = find_idx_files(folder)
    arrays = {key: parse_idx(_read_maybe_gz(p), str(p)) for key, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{paths[f'{split}_images']}: images must be 28x28, got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{split} split: {len(images)} images but {labels.shape[0]} labels"
            )
        if len(labels) and labels.max() >= 10:
            raise DataError(f"{paths[f'{split}_labels']}: labels must be 0-9")
    return Dataset(
        name=name,
        x_train=arrays["train_images"].copy(),
        y_train=arrays["train_labels"].astype(np.int64),
        x_test=arrays["test_images"].copy(),
        y_test=arrays["test_labels"].astype(np.int64),
        classes=tuple(CLASS_NAMES.get(name, CLASS_NAMES["mnist"])),
    )


# --------------------------------------------------------------------------- downloading


def download_idx(
    dest: str | os.PathLike,
    resources: list[tuple[str, str]],
    mirrors: list[str],
) -> Path:
    """Fetch ``resources`` ((filename, md5) pairs) into ``dest``, trying each mirror in turn.

    Uses torchvision's downloader, which verifies each file's md5 and deletes nothing it did
    not write. A file already present with the right md5 is not fetched again; one with the
    wrong md5 (a corrupt or partial earlier download) is fetched again.
    """
    from torchvision.datasets.utils import check_integrity, download_url

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for filename, md5 in resources:
            target = dest / filename
            if check_integrity(str(target), md5):
                continue
            if target.exists():
                log.warning("%s fails its md5 check; fetching it again", target)
                target.unlink()
            errors = []
            for mirror in mirrors:
                try:
                    download_url(mirror + filename, str(dest), filename=filename, md5=md5)
                except Exception as exc:  # URLError, HTTPError, md5 RuntimeError, timeouts
                    errors.append(f"{mirror}: {described(exc)}")
                    if target.exists() and not check_integrity(str(target), md5):
                        target.unlink()
                    continue
                break
            else:
                raise DataError(
                    f"could not download {filename} ({'; '.join(errors)}). Offline? Use "
                    "dataset=digits (ships with scikit-learn) or data_dir=<folder with the "
                    "IDX files>"
                )
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return dest


MIRRORS_ENV = "MNIST_PIPELINE_MIRRORS"


def torchvision_sources(name: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The official (filename, md5) list and mirrors torchvision uses for ``name``.

    ``MNIST_PIPELINE_MIRRORS`` (comma-separated base URLs) replaces the mirrors, e.g. for a
    local copy; the md5s stay the official ones.
    """
    import torchvision.datasets

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    override = [m.strip() for m in os.environ.get(MIRRORS_ENV, "").split(",") if m.strip()]
    mirrors = [m if m.endswith("/") else m + "/" for m in override] or list(cls.mirrors)
    return list(cls.resources), mirrors


def download_dataset(name: str, cache_dir: str | os.PathLike) -> Dataset:
    """Download one of the MNIST family from its official mirrors (md5-checked) and parse it."""
    resources, mirrors = torchvision_sources(name)
    folder = download_idx(Path(cache_dir) / name, resources, mirrors)
    return load_idx_folder(folder, name)


# --------------------------------------------------------------------------- digits (offline)


def load_digits_dataset(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, upscaled to MNIST's geometry.

    MNIST digits sit in a 20x20 box centred in 28x28, so the 8x8 images are resized to 20x20
    (bilinear) and padded by 4: every dataset then has one input shape and similar framing.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) * (255.0 / 16.0)
    images = resize_bilinear(images, 20)
    x = np.pad(images, ((0, 0), (4, 4), (4, 4))).round().clip(0, 255).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], tuple(CLASS_NAMES["digits"]))


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, h, w) float images to (N, size, size) with align-corners bilinear sampling."""
    n, h, w = images.shape
    rows = np.linspace(0, h - 1, size)
    cols = np.linspace(0, w - 1, size)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr = (rows - r0)[None, :, None]
    fc = (cols - c0)[None, None, :]
    top = images[:, r0][:, :, c0] * (1 - fc) + images[:, r0][:, :, c1] * fc
    bottom = images[:, r1][:, :, c0] * (1 - fc) + images[:, r1][:, :, c1] * fc
    return top * (1 - fr) + bottom * fr


def load_dataset(name: str, data_dir: str = "", cache_dir: str | os.PathLike = "") -> Dataset:
    """Get ``name`` from ``data_dir`` if given, else from its source (download or package)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir:
        if name == "digits":
            raise DataError("data_dir holds IDX files; it cannot be used with dataset=digits")
        return load_idx_folder(data_dir, name)
    if name == "digits":
        return load_digits_dataset()
    return download_dataset(name, cache_dir or default_cache_dir())


def default_cache_dir() -> Path:
    return Path(os.environ.get("MNIST_PIPELINE_CACHE", Path.home() / ".cache" / "mnist-pipeline"))


# --------------------------------------------------------------------------- artifact format


def save_dataset(ds: Dataset, folder: str | os.PathLike) -> Path:
    """Write ``ds`` as ``dataset.npz`` (plain arrays, no pickle) plus a JSON manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Uncompressed: the arrays are read on every train/evaluate start, and decompression
    # would cost more than the disk it saves.
    np.savez(
        folder / DATA_FILE,
        x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
    )
    (folder / MANIFEST_FILE).write_text(json.dumps(ds.summary(), indent=2) + "\n")
    return folder


def load_saved_dataset(folder: str | os.PathLike) -> Dataset:
    """Load a folder written by :func:`save_dataset`, refusing pickles and verifying the digest."""
    folder = Path(folder)
    manifest_path, data_path = folder / MANIFEST_FILE, folder / DATA_FILE
    if not manifest_path.is_file() or not data_path.is_file():
        raise DataError(
            f"{folder} is not a dataset artifact (expected {DATA_FILE} and {MANIFEST_FILE})"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(data_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{folder}: unreadable dataset artifact ({described(exc)})") from None
    ds = Dataset(
        name=manifest.get("name", "unknown"),
        classes=tuple(manifest.get("classes", CLASS_NAMES["mnist"])),
        **arrays,
    )
    if ds.digest != manifest.get("digest"):
        raise DataError(
            f"{folder}: dataset digest {ds.digest} does not match its manifest "
            f"({manifest.get('digest')}); the artifact is corrupt or was edited"
        )
    return ds


def split_train_val(
    n: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random train/validation split of ``n`` samples."""
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise DataError(f"val_fraction={val_fraction} leaves no training samples out of {n}")
    return order[n_val:], order[:n_val]
