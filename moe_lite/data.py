"""Fashion-MNIST from the best available source, and the embedded subset.

Sources, tried in this order (the first one that exists wins):

1. **path**: ``root=`` (or the ``data_root`` of the :class:`~moe_lite.settings.Settings` passed as
   ``settings=``, from the environment variable ``MOE_LITE_DATA``, whose value ``embedded`` instead
   forces the embedded subset, e.g. ``MOE_LITE_DATA=embedded jupyter lab`` to match
   ``python -m moe_lite run ... --data embedded``). A folder of IDX files
   (gzipped or raw, directly or in torchvision's ``<root>/FashionMNIST/raw/``) or a subset
   ``.npz``. A named path that is missing or lacks the files is an error, never skipped.
2. **local copy**: a full copy on this machine: torchvision's layout under the repository's
   ``data/`` (or the cache root), then Debian's package ``dataset-fashion-mnist`` at
   ``/usr/share/datasets/fashion-mnist/`` (source ``"debian package"``).
3. **torchvision download**: when ``download=True``, or ``download=None`` and the mirror answers
   within 1.5 s. ``offline=True`` (``MOE_LITE_OFFLINE=1`` in the settings) turns downloading off.
   A failed download falls back to 4
   with a note.
4. **embedded subset**: ``data/fashion_mnist_subset.npz`` (1,000 train / 200 test images per class,
   a stratified subset of the official splits made by ``data/make_subset.py``).

The experiments and notebooks load through a :class:`~moe_lite.settings.Settings`, whose size picks
the data when nothing else does (``Settings.data_source``): the embedded subset at smoke and quick
size, on every machine (the published results, stored outputs and shipped trained models were made on
it), and the order above at gpu and full size. ``MOE_LITE_DATA=full`` or ``--data full`` asks for a
full copy at any size.

A file that is corrupt or truncated raises :class:`DataError` naming the file, wherever it was
found: a broken copy is never skipped in favour of the next source.

Axis legend: ``n`` images, ``h = w = 28`` pixels, ``c`` classes.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .settings import ENV_DATA, ENV_OFFLINE, Settings, default_cache_root

__all__ = [
    "CLASS_NAMES",
    "MEAN",
    "random_shift_flip",
    "STD",
    "DataError",
    "FashionMNIST",
    "load_fashion_mnist",
    "load_splits",
    "read_idx",
    "read_idx_split",
    "stratified_indices",
    "subset_provenance",
    "to_tensors",
    "denormalize",
    "make_loader",
    "subsample",
    "subset_path",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MEAN = 0.2860  # Fashion-MNIST pixel mean (train split, pixels scaled to [0, 1])
STD = 0.3530   # Fashion-MNIST pixel std

SPLITS = ("train", "test")
IMAGE_SIZE = 28
# IDX base names of the official files, per split: (images, labels).
IDX_NAMES = MappingProxyType({
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
})
# 0x0803 (ubyte, 3 dims), 0x0801 (ubyte, 1 dim)
IDX_MAGIC = MappingProxyType({"images": 2051, "labels": 2049})

SOURCE_PATH = "path"
SOURCE_LOCAL = "local copy"
SOURCE_DEBIAN = "debian package"
SOURCE_DOWNLOAD = "torchvision download"
SOURCE_EMBEDDED = "embedded subset"

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET_FILE = "fashion_mnist_subset.npz"
SUBSET_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
ENV_PATH = ENV_DATA  # the variables are read by moe_lite.settings; their names here for messages
MIRROR = ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)  # torchvision's mirror
ONLINE_TIMEOUT_S = 1.5

Split = Literal["train", "test"]
Choice = Literal["auto", "full", "embedded"]


class DataError(ValueError):
    """A Fashion-MNIST file is corrupt, truncated or inconsistent; the message names the file."""


# --------------------------------------------------------------------------------------------
# The dataset record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class FashionMNIST:
    """One split of Fashion-MNIST and where it came from.

    Attributes:
        images: uint8 ``[n, 28, 28]``, pixel values 0..255.
        labels: long ``[n]``, class indices in ``[0, 10)``.
        classes: the 10 class names, ``classes[label]``.
        split: ``"train"`` or ``"test"``.
        source: ``"path"``, ``"local copy"``, ``"debian package"``, ``"torchvision download"``
            or ``"embedded subset"``.
        location: the folder or file it was read from.
        note: why an earlier source was not used (e.g. a failed download), else ``""``.
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    split: str
    source: str
    location: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 3:
            raise ValueError(f"images must be uint8 [n, 28, 28], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.long or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be long [{self.images.shape[0]}], got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def full(self) -> bool:
        """True unless this is the embedded subset."""
        return self.source != SOURCE_EMBEDDED

    def class_counts(self) -> list[int]:
        """Number of images per class, ``[c]``."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def __repr__(self) -> str:
        return (f"FashionMNIST(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
                f"source={self.source!r}, location={self.location!r})")


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (CRC checked)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({err}); delete it or "
                        f"replace it with a good copy") from err


def read_idx(path: str | Path, kind: Literal["images", "labels"]) -> np.ndarray:
    """Parse one Fashion-MNIST IDX file (gzipped or raw) with full validation.

    Args:
        path: the file.
        kind: ``"images"`` (magic 2051, dims ``n, 28, 28``) or ``"labels"`` (magic 2049, dim ``n``).

    Returns:
        uint8 ``[n, 28, 28]`` for images, uint8 ``[n]`` for labels (values checked to be 0..9).

    Raises:
        DataError: naming ``path``, on a bad gzip stream, wrong magic, wrong dims, zero items, a
            byte length that does not match the header, or labels outside 0..9.
    """
    path = Path(path)
    if kind not in IDX_MAGIC:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    data = _read_bytes(path)
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX {kind} header")
    magic = int.from_bytes(data[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise DataError(f"{path}: magic number {magic}, expected {IDX_MAGIC[kind]} for IDX {kind}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if kind == "images" and dims[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    if dims[0] == 0:  # a valid IDX header, but nothing to train or evaluate on
        raise DataError(f"{path}: holds no {kind} (the header says 0); replace it with a good copy")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes (decompressed), expected {expected} for "
                        f"dims {dims}: the file is truncated or has extra bytes")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    if kind == "labels" and array.size and int(array.max()) >= len(CLASS_NAMES):
        raise DataError(f"{path}: label {int(array.max())} outside 0..{len(CLASS_NAMES) - 1}")
    return array


def _check_pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise DataError(f"{where}: no images")


def _has_idx(folder: Path) -> bool:
    """True when ``folder`` holds at least one of the four Fashion-MNIST IDX files."""
    return any(_find_idx(folder, name) for names in IDX_NAMES.values() for name in names)


def _idx_folder(path: Path) -> Path | None:
    """The folder holding IDX files: ``path`` itself or torchvision's ``path/FashionMNIST/raw``."""
    for folder in (path, path / "FashionMNIST" / "raw"):
        if _has_idx(folder):
            return folder
    return None


def _find_idx(folder: Path, name: str) -> Path | None:
    """``folder/name`` (raw) or ``folder/name.gz``, raw preferred; None when neither is a file."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _split_files(folder: Path, split: str) -> tuple[Path, Path]:
    """(images file, labels file) of ``split`` in ``folder``; DataError listing what is missing."""
    names = IDX_NAMES[split]
    found = [_find_idx(folder, name) for name in names]
    missing = [f"{name}[.gz]" for name, file in zip(names, found) if file is None]
    if missing:
        raise DataError(f"{folder}: incomplete Fashion-MNIST copy, missing {', '.join(missing)}")
    return found[0], found[1]


def read_idx_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of ``split`` from a folder of IDX files
    (``root`` itself or torchvision's ``root/FashionMNIST/raw``), validated like :func:`read_idx`
    plus the image/label count check."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _idx_folder(Path(root))
    if folder is None:
        raise FileNotFoundError(f"{root}: no Fashion-MNIST IDX files in it or in its "
                                f"FashionMNIST/raw/")
    images_file, labels_file = _split_files(folder, split)
    images = read_idx(images_file, "images")
    labels = read_idx(labels_file, "labels")
    _check_pair(images, labels, f"{images_file} and {labels_file}")
    return images, labels


def _read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of ``split`` from a subset ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in SUBSET_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: not a Fashion-MNIST subset, missing arrays {missing}")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated .npz ({err}); regenerate it with "
                        f"`python data/make_subset.py`") from err
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{path}: {split}_images is {images.dtype} {images.shape}, "
                        f"expected uint8 [n, 28, 28]")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{path}: {split}_labels is {labels.dtype} {labels.shape}, "
                        f"expected uint8 [n]")
    _check_pair(images, labels, f"{path} ({split})")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{path}: {split} label {int(labels.max())} outside 0..9")
    return images, labels


# --------------------------------------------------------------------------------------------
# Where the data is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A resolved source: a folder of IDX files or a subset ``.npz`` file."""

    source: str
    location: Path
    note: str = ""


def repo_data_dir() -> Path:
    """The repository's ``data/`` folder (next to the ``moe_lite`` package in a checkout)."""
    return Path(__file__).resolve().parents[1] / "data"


def subset_path() -> Path:
    """Where the embedded subset lives: ``<repo>/data/fashion_mnist_subset.npz``."""
    return repo_data_dir() / SUBSET_FILE


def cache_dir(cache_root: Path | None = None) -> Path:
    """Where downloads go when the repository's ``data/`` is not writable: the cache root
    (``Settings.cache_root``; default ``~/.cache/moe_lite``)."""
    return Path(cache_root) if cache_root is not None else default_cache_root()


def _local_candidates(cache_root: Path | None = None) -> list[tuple[str, Path]]:
    """Full local copies, searched in order: (source name, folder)."""
    return [
        (SOURCE_LOCAL, repo_data_dir() / "FashionMNIST" / "raw"),
        (SOURCE_LOCAL, cache_dir(cache_root) / "FashionMNIST" / "raw"),
        (SOURCE_DEBIAN, DEBIAN_DIR),
    ]


def _explicit(root: str | Path, origin: str) -> _Found:
    """Resolve a path the user named; FileNotFoundError when it is missing or holds no data."""
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Fashion-MNIST path {str(path)!r} ({origin}) does not exist")
    if path.is_file():
        if path.suffix != ".npz":
            raise FileNotFoundError(f"{path} ({origin}): expected a folder of IDX files or a "
                                    f"subset .npz")
        return _Found(SOURCE_PATH, path)
    folder = _idx_folder(path)
    if folder is None:
        names = ", ".join(n for pair in IDX_NAMES.values() for n in pair)
        raise FileNotFoundError(f"{path} ({origin}) holds no Fashion-MNIST files: expected "
                                f"{names} (raw or .gz) in it or in {path / 'FashionMNIST' / 'raw'}")
    return _Found(SOURCE_PATH, folder)


def _online(timeout: float = ONLINE_TIMEOUT_S) -> bool:
    """True when the download mirror accepts a TCP connection within ``timeout`` seconds.

    Runs in a daemon thread so that a slow DNS lookup cannot make it hang past ``timeout``.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(MIRROR, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _download_root(cache_root: Path | None = None) -> Path:
    """Where a download goes: the repository's ``data/`` (in a checkout, if writable), else the
    cache root."""
    repo = repo_data_dir()
    if (repo / "make_subset.py").is_file() and os.access(repo, os.W_OK):
        return repo
    return cache_dir(cache_root)


def _torchvision_download(root: Path) -> Path:
    """Download the full set with torchvision into ``root/FashionMNIST/raw``; return that folder."""
    # here, not at the top: importing torchvision costs about a second, and only a download needs it
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    return _download_with(TorchvisionFashionMNIST, root)


def _download_with(dataset_cls, root: Path) -> Path:
    """Run ``dataset_cls(root=tmp, train=True, download=True)`` (torchvision's class), then move
    ``tmp/FashionMNIST/raw/*`` into ``root/FashionMNIST/raw``; return that folder.

    The download goes to a temporary folder first and the files move in only when torchvision is
    done (it checks each file's MD5), so a failed download never leaves a half-written copy that
    would later be found, and rejected, as a corrupt local copy.
    """
    root.mkdir(parents=True, exist_ok=True)
    target = root / "FashionMNIST" / "raw"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        dataset_cls(root=tmp, train=True, download=True)
        target.mkdir(parents=True, exist_ok=True)
        for file in (Path(tmp) / "FashionMNIST" / "raw").iterdir():
            shutil.move(str(file), target / file.name)
    return target


def _try_download(download: bool | None, offline: bool = False,
                  cache_root: Path | None = None) -> tuple[Path | None, str]:
    """(folder, "") after a successful download, else (None, why not)."""
    if download is False:
        return None, "download=False"
    if offline:
        return None, f"{ENV_OFFLINE} is set"
    if download is None and not _online():
        return None, "offline (no answer from the download mirror)"
    try:
        return _torchvision_download(_download_root(cache_root)), ""
    except Exception as err:  # noqa: BLE001 - any download failure falls back, with a note
        return None, f"torchvision download failed: {type(err).__name__}: {err}"


def _resolve(root: str | Path | None, source: str, download: bool | None, offline: bool = False,
             cache_root: Path | None = None, settings: Settings | None = None) -> _Found:
    """Pick the source, in the documented order."""
    if source not in ("auto", "full", "embedded"):
        raise ValueError(f"source must be 'auto', 'full' or 'embedded', got {source!r}")
    if settings is not None:
        if root is not None or source != "auto" or offline or cache_root is not None:
            raise ValueError("settings= gives root, source, offline and cache_root; pass it or them, not both")
        if settings.data_source == "embedded":
            return _embedded()
        if settings.data_root is not None:
            return _explicit(settings.data_root, f"settings.data_root, e.g. from {ENV_PATH}")
        source, offline, cache_root = settings.data_source, settings.offline, settings.cache_root
    if source == "embedded":
        if root is not None:
            raise ValueError("source='embedded' and root= contradict each other; pass one")
        return _embedded()
    if root is not None:
        return _explicit(root, "root argument")
    for name, folder in _local_candidates(cache_root):
        if folder.is_dir() and _has_idx(folder):
            return _Found(name, folder)
    folder, why = _try_download(download, offline, cache_root)
    if folder is not None:
        return _Found(SOURCE_DOWNLOAD, folder)
    if source == "full":
        raise FileNotFoundError(f"no full Fashion-MNIST copy found and {why}; pass root=..., set "
                                f"{ENV_PATH}, install Debian's dataset-fashion-mnist, or allow a "
                                f"download")
    return _embedded(note=f"no full copy found; {why}")


def _embedded(note: str = "") -> _Found:
    path = subset_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded Fashion-MNIST subset not found at {path} (moe_lite looks for it in the "
            f"repository's data/ folder; a non-editable install does not include it). Run from a "
            f"checkout, set {ENV_PATH} to a copy of {SUBSET_FILE} or of the full set, or allow a "
            f"download.")
    return _Found(SOURCE_EMBEDDED, path, note)


def _load(found: _Found, split: str) -> FashionMNIST:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if found.location.is_file():
        images, labels = _read_npz(found.location, split)
    else:
        images, labels = read_idx_split(found.location, split)
    return FashionMNIST(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels).long(),
        classes=CLASS_NAMES,
        split=split,
        source=found.source,
        location=str(found.location),
        note=found.note,
    )


def _shown_path(path: Path) -> str:
    """``path`` for a message: relative to the project, or under ``~``, not the machine's absolute path."""
    for base, prefix in ((repo_data_dir().parent, ""), (Path.home(), "~/")):
        try:
            return prefix + Path(path).resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def _report(found: _Found, datasets: Sequence[FashionMNIST]) -> str:
    sizes = ", ".join(f"{d.split} {len(d):,}" for d in datasets)
    text = f"[moe_lite.data] Fashion-MNIST from {found.source} ({_shown_path(found.location)}): {sizes} images"
    if found.note:
        text += f"\n[moe_lite.data] note: {found.note}"
    return text


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def load_fashion_mnist(
    split: Split = "train",
    root: str | Path | None = None,
    *,
    source: Choice = "auto",
    download: bool | None = None,
    verbose: bool = True,
    offline: bool = False,
    cache_root: str | Path | None = None,
    settings: Settings | None = None,
) -> FashionMNIST:
    """Load one split of Fashion-MNIST from the best available source (see the module docstring).

    Args:
        split: ``"train"`` (60,000 images in the full set, 10,000 in the subset) or ``"test"``
            (10,000 / 2,000).
        root: a folder of IDX files (gzipped or raw, or torchvision's ``root/FashionMNIST/raw``)
            or a subset ``.npz``. Missing or empty -> error.
        source: ``"auto"`` (the order above), ``"full"`` (never the subset: error if no full copy)
            or ``"embedded"`` (always the subset, e.g. for results that match on every machine).
        download: True: download when no local copy exists; None: only if the mirror answers
            quickly; False: never. ``offline=True`` disables downloads in every case.
        verbose: print which source was used (and why an earlier one was not).
        offline: never download (``Settings.offline``, from ``MOE_LITE_OFFLINE=1``).
        cache_root: the cache root searched for, and receiving, a download (default
            ``~/.cache/moe_lite``; ``Settings.cache_root``).
        settings: the resolved :class:`~moe_lite.settings.Settings` (at the edge: the CLI,
            ``notebook.setup()``), giving ``data_source`` (the committed subset at smoke and quick
            size unless the settings name other data), ``data_root``, ``offline`` and ``cache_root``
            instead of ``root``, ``source``, ``offline`` and ``cache_root``.

    Returns:
        :class:`FashionMNIST` with images uint8 ``[n, 28, 28]`` and labels long ``[n]``.

    Raises:
        DataError: a file is corrupt, truncated or inconsistent (the message names it).
        FileNotFoundError: a named path is missing or empty, or no source is available.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    found = _resolve(root, source, download, offline, cache_root, settings)
    dataset = _load(found, split)
    if verbose:
        print(_report(found, [dataset]))
    return dataset


def load_splits(
    root: str | Path | None = None,
    *,
    source: Choice = "auto",
    download: bool | None = None,
    verbose: bool = True,
    offline: bool = False,
    cache_root: str | Path | None = None,
    settings: Settings | None = None,
) -> tuple[FashionMNIST, FashionMNIST]:
    """``(train, test)``, both from the same source (resolved once); arguments as
    :func:`load_fashion_mnist`."""
    found = _resolve(root, source, download, offline, cache_root, settings)
    train, test = _load(found, "train"), _load(found, "test")
    if verbose:
        print(_report(found, [train, test]))
    return train, test


def subset_provenance(path: str | Path | None = None) -> dict:
    """The provenance record stored in a subset ``.npz`` (default: the embedded one)."""
    path = Path(path) if path is not None else subset_path()
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["provenance"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: no readable provenance ({err})") from err


# --------------------------------------------------------------------------------------------
# Tensors for training
# --------------------------------------------------------------------------------------------


def to_tensors(ds: FashionMNIST, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Images as float ``[n, 1, 28, 28]`` (in [0, 1], then ``(x - MEAN) / STD`` if ``normalize``)
    and labels long ``[n]``."""
    x = ds.images.unsqueeze(1).float().div_(255.0)
    if normalize:
        x = x.sub_(MEAN).div_(STD)
    return x, ds.labels.clone()


def random_shift_flip(x: Tensor, shift: int = 2, flip: bool = True,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Batch augmentation on normalised images ``x [B, C, H, W]``: each image is translated by up to
    ``shift`` pixels in each direction (the uncovered border is background, i.e. a 0 pixel) and,
    if ``flip``, mirrored left-right with probability 1/2 (every Fashion-MNIST class survives a
    mirror). Runs on ``x``'s device, vectorised over the batch; draws from ``generator`` or the
    global RNG, so training stays reproducible under a seed."""
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    b, c, h, w = x.shape
    out = x
    if shift:
        background = (0.0 - MEAN) / STD
        padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=background)
        offsets = torch.randint(0, 2 * shift + 1, (2, b), generator=generator, device="cpu").to(x.device)
        rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # [B, H]
        cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # [B, W]
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(b, generator=generator, device="cpu") < 0.5).to(x.device)
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def denormalize(x: Tensor) -> Tensor:
    """Undo :func:`to_tensors`' normalization: ``x * STD + MEAN`` (pixels back in [0, 1]);
    any shape."""
    return x * STD + MEAN


def make_loader(
    ds: FashionMNIST | tuple[Tensor, Tensor],
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int = 0,
    *,
    normalize: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of ``(x float [b, 1, 28, 28], y long [b])`` batches.

    Always ``num_workers=0``: the whole split is already in memory as tensors, and worker
    processes need shared memory that Binder and some containers do not have. Shuffling uses its
    own ``torch.Generator`` seeded with ``seed``, so the batch order is reproducible and the global
    RNG is untouched. ``ds`` may also be an ``(x, y)`` pair of tensors (used as given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x, y = to_tensors(ds, normalize=normalize) if isinstance(ds, FashionMNIST) else ds
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, num_workers=0, drop_last=drop_last)


def stratified_indices(labels: np.ndarray, counts: Sequence[int], seed: int,
                       stream: int = 0) -> np.ndarray:
    """Sorted int64 indices into ``labels [n]`` taking ``counts[c]`` random examples of class ``c``.

    Class ``c`` is drawn with ``Generator(PCG64(SeedSequence([seed, stream, c]))).permutation``
    of its members (first ``counts[c]`` kept), so changing one class's count never changes another
    class's selection; ``stream`` separates independent draws (e.g. train 0, test 1).
    """
    chosen = [np.zeros(0, dtype=np.int64)]
    for c, k in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if k > members.size:
            name = CLASS_NAMES[c] if c < len(CLASS_NAMES) else str(c)
            raise ValueError(f"class {c} ({name}) has {members.size} examples, {k} requested")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, c])))
        chosen.append(rng.permutation(members)[:k].astype(np.int64))
    return np.sort(np.concatenate(chosen))


def subsample(
    ds: FashionMNIST,
    n_per_class: int | None = None,
    *,
    fraction: float | None = None,
    seed: int = 0,
) -> FashionMNIST:
    """A stratified random subset of ``ds``, in ``ds``'s order, for training-set-size sweeps.

    Give exactly one of ``n_per_class`` (the same number of every class) or ``fraction`` in
    (0, 1] (that share of each class, rounded, at least 1). Deterministic for a given ``seed``.
    """
    if (n_per_class is None) == (fraction is None):
        raise ValueError("give exactly one of n_per_class or fraction")
    have = np.asarray(ds.class_counts())
    if n_per_class is not None:
        if n_per_class < 0:
            raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
        counts = [n_per_class] * len(have)
    else:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        counts = [max(1, round(fraction * h)) if h else 0 for h in have]
    index = torch.from_numpy(stratified_indices(ds.labels.numpy(), counts, seed))
    return FashionMNIST(images=ds.images[index], labels=ds.labels[index], classes=ds.classes,
                        split=ds.split, source=ds.source, location=ds.location, note=ds.note)
