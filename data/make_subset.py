"""Make the embedded Fashion-MNIST subset ``data/fashion_mnist_subset.npz`` from the full set.

    python data/make_subset.py                       # source: first full copy found, see below
    python data/make_subset.py --source /usr/share/datasets/fashion-mnist --out data/x.npz
    python data/make_subset.py --check               # rebuild in memory, compare with --out

Selection: for each class ``c``, ``numpy.random.Generator(PCG64(SeedSequence([seed, stream, c])))``
permutes that class's indices in the official split (stream 0 = train, 1 = test) and the first
``--train-per-class`` / ``--test-per-class`` are kept; the kept indices are then sorted, so the
subset keeps the official file order (classes interleaved as in the original). The indices are
stored in the file (``train_indices``, ``test_indices``) next to the images and labels.

Reproducibility: the ``.npz`` is written with fixed zip metadata (1980-01-01 timestamps, fixed
permissions, fixed member order, deflate level 9), so the same inputs give the same bytes with
the same zlib. The script builds the file twice and checks the bytes match before writing.
``--check`` compares array contents (not bytes, which a different zlib may change) with an
existing file and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

try:
    from moe_lite import data as mdata
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moe_lite import data as mdata

SEED = 0
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
STREAMS = {"train": 0, "test": 1}
ARRAY_ORDER = ("train_images", "train_labels", "test_images", "test_labels",
               "train_indices", "test_indices", "provenance")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def default_source() -> Path | None:
    """The first full local copy that moe_lite.data would use (repo data/, cache, Debian)."""
    for _, folder in mdata._local_candidates():
        if folder.is_dir() and mdata._has_idx(folder):
            return folder
    return None


def read_full(source: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The full set in ``source``: split -> (images uint8 [n, 28, 28], labels uint8 [n])."""
    return {split: mdata.read_idx_split(source, split) for split in ("train", "test")}


def select_subset(full: dict[str, tuple[np.ndarray, np.ndarray]],
                  train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                  seed: int = SEED) -> dict[str, np.ndarray]:
    """The subset's arrays, selected deterministically from ``full`` (see :func:`read_full`).

    Returns a dict with ``{split}_images`` uint8 ``[k * 10, 28, 28]``, ``{split}_labels`` uint8
    ``[k * 10]``, ``{split}_indices`` int32 (rows of the official split, ascending) and
    ``provenance`` (0-d str array holding JSON: counts, seed, sha256 of the source arrays).
    """
    per_class = {"train": train_per_class, "test": test_per_class}
    arrays: dict[str, np.ndarray] = {}
    digests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for split, (images, labels) in full.items():
        digests[f"{split}_images"] = hashlib.sha256(images.tobytes()).hexdigest()
        digests[f"{split}_labels"] = hashlib.sha256(labels.tobytes()).hexdigest()
        sizes[split] = int(labels.shape[0])
        counts = [per_class[split]] * len(mdata.CLASS_NAMES)
        index = mdata.stratified_indices(labels, counts, seed, stream=STREAMS[split])
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_indices"] = index.astype(np.int32)
    provenance = {
        "dataset": "Fashion-MNIST",
        "licence": "MIT, Copyright (c) 2017 Zalando SE "
                   "(https://github.com/zalandoresearch/fashion-mnist)",
        "made_by": "data/make_subset.py",
        "selection": "per class: Generator(PCG64(SeedSequence([seed, stream, class])))"
                     ".permutation, first k kept; indices sorted ascending (official order); "
                     "stream train=0 test=1",
        "seed": seed,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "classes": list(mdata.CLASS_NAMES),
        "source_sizes": sizes,
        "source_sha256": digests,
        "source_sha256_of": "the decoded uint8 arrays (IDX payload without header)",
    }
    arrays["provenance"] = np.array(json.dumps(provenance, sort_keys=True))
    return arrays


def build_subset(source: str | Path, train_per_class: int = TRAIN_PER_CLASS,
                 test_per_class: int = TEST_PER_CLASS, seed: int = SEED) -> dict[str, np.ndarray]:
    """:func:`select_subset` of the full set read from ``source``."""
    return select_subset(read_full(source), train_per_class, test_per_class, seed)


def serialize(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (readable by ``np.load``) with fixed zip metadata: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ARRAY_ORDER:
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.create_system = 3  # unix, whatever the platform
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays that differ (missing, shape, dtype or values)."""
    return [k for k in ARRAY_ORDER
            if k not in a or k not in b or a[k].dtype != b[k].dtype
            or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="folder with the full set's IDX files (raw or .gz, or torchvision's "
                             "<root>/FashionMNIST/raw); default: the first full local copy")
    parser.add_argument("--out", type=Path, default=mdata.subset_path(), help="the .npz to write")
    parser.add_argument("--train-per-class", type=int, default=TRAIN_PER_CLASS)
    parser.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true",
                        help="compare a fresh build with --out instead of writing it")
    args = parser.parse_args(argv)

    source = args.source or default_source()
    if source is None:
        parser.error("no full Fashion-MNIST copy found; pass --source DIR")
    full = read_full(source)
    first = select_subset(full, args.train_per_class, args.test_per_class, args.seed)
    blob = serialize(first)
    again = select_subset(full, args.train_per_class, args.test_per_class, args.seed)
    if serialize(again) != blob:
        print("error: two builds gave different bytes", file=sys.stderr)
        return 1

    if args.check:
        if not args.out.is_file():
            print(f"error: {args.out} does not exist", file=sys.stderr)
            return 1
        differ = same_arrays(first, _load_npz(args.out))
        if differ:
            print(f"{args.out} differs from a fresh build from {source}: {differ}", file=sys.stderr)
            return 1
        same_bytes = args.out.read_bytes() == blob
        print(f"{args.out} matches a fresh build from {source} "
              f"({'identical bytes' if same_bytes else 'identical arrays, different zip bytes'})")
        return 0

    unchanged = args.out.is_file() and args.out.read_bytes() == blob
    if not unchanged:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    print(f"{'unchanged' if unchanged else 'wrote'} {args.out}: {len(blob) / 1e6:.2f} MB, "
          f"train {first['train_labels'].size}, test {first['test_labels'].size}, "
          f"from {source}, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
