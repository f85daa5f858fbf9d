"""Tests for moe_lite.data and data/make_subset.py.

Every source is exercised on tiny IDX files written here, with the machine's own locations
(repo data/, cache, Debian's package) replaced by temporary folders and downloads mocked, so the
tests pass offline and without the Debian package.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lite import data as D
from moe_lite.settings import Settings

REPO = Path(__file__).resolve().parents[1]
REAL_ONLINE = D._online  # before the fixture mocks it
N_TRAIN_PER_CLASS, N_TEST_PER_CLASS = 3, 2


# ------------------------------------------------------------------------------------ helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0801 / 0x0803, big-endian dims, payload."""
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def synthetic_split(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [10k, 28, 28], labels uint8 [10k]) shuffled; pixel [0, 0] = label."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class))
    images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = labels
    return images, labels


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                gz: bool = True) -> tuple[Path, Path]:
    """Write one split's two IDX files into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in zip(D.IDX_NAMES[split], (images, labels)):
        payload = idx_bytes(array)
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
        paths.append(path)
    return paths[0], paths[1]


def write_full(folder: Path, gz: bool = True, per_class: tuple[int, int] = (3, 2)) -> Path:
    """A tiny complete 'full set' (both splits) in ``folder``."""
    write_split(folder, "train", *synthetic_split(per_class[0], 1), gz=gz)
    write_split(folder, "test", *synthetic_split(per_class[1], 2), gz=gz)
    return folder


def load_make_subset():
    spec = importlib.util.spec_from_file_location("make_subset", REPO / "data" / "make_subset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No machine locations, no network; a tiny embedded subset in tmp. (The environment is not read
    here: moe_lite.settings does that, and a test passes settings= or offline= for it.)"""
    monkeypatch.setattr(D, "_local_candidates", lambda cache_root=None: [])
    monkeypatch.setattr(D, "_online", lambda timeout=1.5: False)

    def no_download(root):
        raise AssertionError("download attempted")

    monkeypatch.setattr(D, "_torchvision_download", no_download)
    subset = tmp_path / "embedded" / D.SUBSET_FILE
    subset.parent.mkdir()
    ms = load_make_subset()
    arrays = ms.build_subset(write_full(tmp_path / "embedded_src"), 2, 1)
    subset.write_bytes(ms.serialize(arrays))
    monkeypatch.setattr(D, "subset_path", lambda: subset)
    return subset


# ------------------------------------------------------------------------------------ sources


@pytest.mark.parametrize("gz", [True, False])
def test_explicit_root_gz_and_raw(tmp_path, gz, capsys):
    folder = write_full(tmp_path / "fm", gz=gz)
    ds = D.load_fashion_mnist("train", root=folder)
    assert ds.source == "path" and ds.location == str(folder)
    assert ds.images.shape == (30, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.long and ds.class_counts() == [3] * 10
    assert torch.equal(ds.images[:, 0, 0].long(), ds.labels)
    assert ds.classes == D.CLASS_NAMES and ds.num_classes == 10 and ds.full
    out = capsys.readouterr().out
    assert "from path" in out and str(folder) in out


def test_torchvision_layout_and_settings(tmp_path, monkeypatch):
    raw = write_full(tmp_path / "root" / "FashionMNIST" / "raw")
    ds = D.load_fashion_mnist("test", root=tmp_path / "root", verbose=False)
    assert ds.location == str(raw) and len(ds) == 20
    settings = Settings.resolve(size="smoke", environ={D.ENV_PATH: str(tmp_path / "root")})
    ds = D.load_fashion_mnist("test", settings=settings, verbose=False)
    assert ds.source == "path" and ds.location == str(raw)
    # the variable itself is read by Settings.resolve only
    monkeypatch.setenv(D.ENV_PATH, str(tmp_path / "root"))
    assert D.load_fashion_mnist("test", verbose=False).source == "embedded subset"
    with pytest.raises(ValueError, match="not both"):
        D.load_fashion_mnist(root=write_full(tmp_path / "other"), settings=settings)


def test_explicit_npz_path(isolated, monkeypatch):
    monkeypatch.setattr(D, "subset_path", lambda: Path("/nonexistent/x.npz"))
    ds = D.load_fashion_mnist("train", root=isolated, verbose=False)
    assert ds.source == "path" and ds.class_counts() == [2] * 10


def test_named_path_missing_or_empty_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        D.load_fashion_mnist(root=tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Fashion-MNIST files"):
        D.load_fashion_mnist(root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="MOE_LITE_DATA"):
        D.load_fashion_mnist(settings=Settings.resolve(size="smoke", environ={D.ENV_PATH: str(tmp_path / "nope")}))
    half = tmp_path / "half"
    write_split(half, "train", *synthetic_split(1, 0))
    with pytest.raises(D.DataError, match="t10k-images-idx3-ubyte"):
        D.load_fashion_mnist("test", root=half)


def test_local_candidates_in_order(tmp_path, monkeypatch):
    local, debian = tmp_path / "local", tmp_path / "debian"
    monkeypatch.setattr(D, "_local_candidates",
                        lambda cache_root=None: [("local copy", local), ("debian package", debian)])
    write_full(debian)
    train, test = D.load_splits(verbose=False)
    assert train.source == test.source == "debian package" and len(test) == 20
    write_full(local, gz=False)
    assert D.load_fashion_mnist(verbose=False).source == "local copy"


def test_corrupt_auto_discovered_copy_is_an_error_not_skipped(tmp_path, monkeypatch):
    local, debian = tmp_path / "local", tmp_path / "debian"
    monkeypatch.setattr(D, "_local_candidates",
                        lambda cache_root=None: [("local copy", local), ("debian package", debian)])
    write_full(debian)
    write_full(local)
    bad = local / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(D.DataError, match=str(bad)):
        D.load_fashion_mnist("train")
    (local / "train-images-idx3-ubyte.gz").unlink()  # incomplete copy: also an error
    with pytest.raises(D.DataError, match="incomplete"):
        D.load_fashion_mnist("train")


def test_embedded_subset_when_nothing_else(isolated, capsys):
    train, test = D.load_splits(offline=True)
    assert train.source == test.source == "embedded subset" and not train.full
    assert train.location == str(isolated)
    assert train.class_counts() == [2] * 10 and test.class_counts() == [1] * 10
    out = capsys.readouterr().out
    assert "embedded subset" in out and "MOE_LITE_OFFLINE" in out
    assert D.load_fashion_mnist(source="embedded", verbose=False).source == "embedded subset"
    with pytest.raises(FileNotFoundError, match="no full Fashion-MNIST copy"):
        D.load_fashion_mnist(source="full")


def test_embedded_subset_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "subset_path", lambda: tmp_path / "gone.npz")
    with pytest.raises(FileNotFoundError, match="embedded Fashion-MNIST subset not found"):
        D.load_fashion_mnist()


def test_download_failure_falls_back_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(D, "_download_root", lambda cache_root=None: tmp_path / "dl")

    def fail(root):
        raise RuntimeError("mirror unreachable")

    monkeypatch.setattr(D, "_torchvision_download", fail)
    ds = D.load_fashion_mnist(download=True)
    assert ds.source == "embedded subset" and "mirror unreachable" in ds.note
    assert "download failed" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="mirror unreachable"):
        D.load_fashion_mnist(download=True, source="full")


def test_download_success_and_when_it_is_attempted(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "_download_root", lambda cache_root=None: tmp_path / "dl")
    calls = []

    def fake_download(root):
        calls.append(root)
        return write_full(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(D, "_torchvision_download", fake_download)
    ds = D.load_fashion_mnist("test", download=True, verbose=False)
    assert ds.source == "torchvision download" and len(ds) == 20 and len(calls) == 1
    # download=None: only when the mirror answers (here: it does not, then it does)
    assert D.load_fashion_mnist(verbose=False).source == "embedded subset" and len(calls) == 1
    monkeypatch.setattr(D, "_online", lambda timeout=1.5: True)
    assert D.load_fashion_mnist(verbose=False).source == "torchvision download"
    assert D.load_fashion_mnist(download=False, verbose=False).source == "embedded subset"
    # offline (Settings.offline, from MOE_LITE_OFFLINE=1) beats download=True
    assert D.load_fashion_mnist(download=True, offline=True, verbose=False).source == "embedded subset"
    offline = Settings.resolve(size="smoke", environ={"MOE_LITE_OFFLINE": "1"})
    assert D.load_fashion_mnist(download=True, settings=offline, verbose=False).source == "embedded subset"
    assert len(calls) == 2


def test_corrupt_download_is_an_error(monkeypatch, tmp_path):

    def bad_download(root):
        raw = write_full(root / "FashionMNIST" / "raw")
        (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot gzip")
        return raw

    monkeypatch.setattr(D, "_download_root", lambda cache_root=None: tmp_path / "dl")
    monkeypatch.setattr(D, "_torchvision_download", bad_download)
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz"):
        D.load_fashion_mnist("test", download=True)


def test_torchvision_download_moves_files_only_on_success(tmp_path):
    class FakeTorchvision:
        fail = False

        def __init__(self, root, train=True, download=False):
            raw = write_full(Path(root) / "FashionMNIST" / "raw")
            if self.fail:
                raise RuntimeError("md5 mismatch")
            assert raw.is_dir() and download

    FakeTorchvision.fail = True
    with pytest.raises(RuntimeError, match="md5"):
        D._download_with(FakeTorchvision, tmp_path / "dl")
    assert list((tmp_path / "dl").iterdir()) == []  # nothing half-written left behind
    FakeTorchvision.fail = False
    raw = D._download_with(FakeTorchvision, tmp_path / "dl")
    assert raw == tmp_path / "dl" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["FashionMNIST"]
    assert len(D.load_fashion_mnist("test", root=tmp_path / "dl", verbose=False)) == 20


def test_online_check_is_bounded(monkeypatch):
    import socket
    import time

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        address = server.getsockname()
        monkeypatch.setattr(D, "MIRROR", address)
        assert REAL_ONLINE(timeout=1.0) is True
    monkeypatch.setattr(D, "MIRROR", address)  # now closed
    start = time.monotonic()
    assert REAL_ONLINE(timeout=0.5) is False
    assert time.monotonic() - start < 1.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist("valid")
    with pytest.raises(ValueError, match="source"):
        D.load_fashion_mnist(source="cloud")
    with pytest.raises(ValueError, match="contradict"):
        D.load_fashion_mnist(root=".", source="embedded")


# ------------------------------------------------------------------------------------ corrupt files


def _corrupt_cases(tmp_path):
    images, labels = synthetic_split(1, 0)

    def case(name, kind, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path, kind

    good_img, good_lbl = idx_bytes(images), idx_bytes(labels)
    crc = bytearray(gzip.compress(good_lbl, mtime=0))
    crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return [
        (*case("trunc.gz", "images", gzip.compress(good_img, mtime=0)[:-40]), "gzip"),
        (*case("crc.gz", "labels", bytes(crc)), "gzip"),
        (*case("magic", "images", good_lbl), "magic number 2049"),
        (*case("short", "images", good_img[:-5]), "truncated"),
        (*case("long.gz", "labels", gzip.compress(good_lbl + b"\0", mtime=0)), "extra bytes"),
        (*case("tiny", "labels", b"\0\0\x08"), "too short"),
        (*case("dims", "images", idx_bytes(np.zeros((2, 27, 28), np.uint8))), "27x28"),
        (*case("label11", "labels", idx_bytes(np.array([0, 11], np.uint8))), "label 11"),
    ]


def test_corrupt_files_raise_data_error_naming_the_file(tmp_path):
    for path, kind, message in _corrupt_cases(tmp_path):
        with pytest.raises(D.DataError, match=message) as info:
            D.read_idx(path, kind)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


def test_count_mismatch_names_both_files(tmp_path):
    images, labels = synthetic_split(2, 0)
    img, lbl = write_split(tmp_path, "train", images, labels[:-1], gz=False)
    with pytest.raises(D.DataError, match="20 images but 19 labels") as info:
        D.load_fashion_mnist(root=tmp_path)
    assert str(img) in str(info.value) and str(lbl) in str(info.value)


@pytest.mark.parametrize("empty", ["images", "labels", "both"])
def test_idx_copy_with_zero_images_is_an_error_naming_the_file(tmp_path, empty):
    images, labels = synthetic_split(1, 0)
    write_full(tmp_path)  # a good test split; the train split below is empty
    img, lbl = write_split(tmp_path, "train", images[:0] if empty != "labels" else images,
                           labels[:0] if empty != "images" else labels)
    with pytest.raises(D.DataError, match="no (images|labels)") as info:
        D.load_fashion_mnist(root=tmp_path, split="train")
    assert str(lbl if empty == "labels" else img) in str(info.value)


def test_npz_split_with_zero_images_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros(0, np.uint8),
             test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.zeros(2, np.uint8))
    with pytest.raises(D.DataError, match="empty.npz.*no images"):
        D.load_fashion_mnist(root=empty, split="train")


def test_corrupt_npz_is_an_error(tmp_path, isolated):
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(isolated.read_bytes()[: isolated.stat().st_size // 2])
    with pytest.raises(D.DataError, match="trunc.npz"):
        D.load_fashion_mnist(root=truncated)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, train_images=np.zeros((2, 28, 28), np.float32),
             train_labels=np.zeros(2, np.uint8), test_images=np.zeros((0, 28, 28), np.uint8),
             test_labels=np.zeros(0, np.uint8))
    with pytest.raises(D.DataError, match="wrong.npz.*uint8"):
        D.load_fashion_mnist(root=wrong)


# ------------------------------------------------------------------------------------ the subset


def test_subset_builder_is_deterministic_and_stratified(tmp_path):
    ms = load_make_subset()
    source = write_full(tmp_path / "full", per_class=(8, 5))
    a = ms.build_subset(source, 4, 2, seed=0)
    b = ms.build_subset(source, 4, 2, seed=0)
    assert ms.same_arrays(a, b) == [] and ms.serialize(a) == ms.serialize(b)
    full = ms.read_full(source)
    for split, k in (("train", 4), ("test", 2)):
        images, labels = full[split]
        index = a[f"{split}_indices"]
        assert np.all(np.diff(index) > 0)  # sorted: official order kept
        assert np.bincount(a[f"{split}_labels"], minlength=10).tolist() == [k] * 10
        assert np.array_equal(a[f"{split}_images"], images[index])
        assert np.array_equal(a[f"{split}_labels"], labels[index])
    c = ms.build_subset(source, 4, 2, seed=1)
    assert "train_indices" in ms.same_arrays(a, c)
    with pytest.raises(ValueError, match="has 5 examples, 6 requested"):
        ms.build_subset(source, 4, 6)


def test_make_subset_cli_writes_reproducible_bytes(tmp_path, capsys):
    ms = load_make_subset()
    source = write_full(tmp_path / "full", per_class=(4, 2))
    out = tmp_path / "sub.npz"
    args = ["--source", str(source), "--out", str(out), "--train-per-class", "2",
            "--test-per-class", "1"]
    assert ms.main(args) == 0
    first = out.read_bytes()
    assert ms.main(args) == 0 and out.read_bytes() == first
    assert "unchanged" in capsys.readouterr().out
    assert ms.main(args + ["--check"]) == 0
    assert ms.main(args[:-4] + ["--train-per-class", "3", "--test-per-class", "1", "--check"]) == 1
    ds = D.load_fashion_mnist(root=out, verbose=False)
    assert ds.class_counts() == [2] * 10
    assert D.subset_provenance(out)["train_per_class"] == 2


def test_committed_subset_loads():
    path = REPO / "data" / D.SUBSET_FILE
    assert path.is_file(), "run `python data/make_subset.py` to create the embedded subset"
    assert path.stat().st_size < 8_000_000
    train = D.load_fashion_mnist("train", root=path, verbose=False)
    test = D.load_fashion_mnist("test", root=path, verbose=False)
    assert train.images.shape == (10_000, 28, 28) and test.images.shape == (2_000, 28, 28)
    assert train.class_counts() == [1000] * 10 and test.class_counts() == [200] * 10
    prov = D.subset_provenance(path)
    assert prov["dataset"] == "Fashion-MNIST" and "MIT" in prov["licence"]
    assert prov["source_sizes"] == {"train": 60_000, "test": 10_000}
    with np.load(path) as npz:
        assert np.all(np.diff(npz["train_indices"]) > 0) and npz["train_indices"].max() < 60_000


def test_repo_subset_location():
    from moe_lite.data import repo_data_dir

    assert repo_data_dir() == REPO / "data"


# ------------------------------------------------------------------------------------ tensors


@pytest.fixture
def tiny(tmp_path):
    return D.load_fashion_mnist("train", root=write_full(tmp_path / "fm", per_class=(6, 1)),
                                verbose=False)


def test_to_tensors_and_denormalize(tiny):
    x, y = D.to_tensors(tiny)
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    raw, _ = D.to_tensors(tiny, normalize=False)
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(D.denormalize(x), raw, atol=1e-6)
    assert torch.allclose(raw[:, 0], tiny.images.float() / 255)


def test_make_loader_iterates_with_num_workers_0(tiny):
    loader = D.make_loader(tiny, batch_size=16, shuffle=True, seed=3)
    assert loader.num_workers == 0
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 12]
    assert batches[0][0].shape[1:] == (1, 28, 28) and batches[0][1].dtype == torch.long
    again = [b[1] for b in D.make_loader(tiny, batch_size=16, shuffle=True, seed=3)]
    assert all(torch.equal(a[1], b) for a, b in zip(batches, again))
    ordered = torch.cat([b[1] for b in D.make_loader(tiny, batch_size=7, shuffle=False)])
    assert torch.equal(ordered, tiny.labels)
    pairs = D.make_loader(D.to_tensors(tiny), batch_size=60, drop_last=True)
    assert len(pairs) == 1


def test_subsample_is_stratified_and_deterministic(tiny):
    sub = D.subsample(tiny, 2, seed=0)
    assert sub.class_counts() == [2] * 10 and sub.source == tiny.source
    assert torch.equal(sub.labels, D.subsample(tiny, 2, seed=0).labels)
    assert torch.equal(sub.images[:, 0, 0].long(), sub.labels)
    half = D.subsample(tiny, fraction=0.5, seed=1)
    assert half.class_counts() == [3] * 10
    assert D.subsample(tiny, fraction=0.01).class_counts() == [1] * 10
    with pytest.raises(ValueError, match="exactly one"):
        D.subsample(tiny)
    with pytest.raises(ValueError, match="requested"):
        D.subsample(tiny, 7)
    with pytest.raises(ValueError, match="fraction"):
        D.subsample(tiny, fraction=1.5)


def test_repr_is_short(tiny):
    assert len(repr(tiny)) < 200 and "n=60" in repr(tiny)
    assert json.dumps(tiny.class_counts())


def test_download_root_is_the_checkout_or_the_cache_root(tmp_path, monkeypatch):
    root = Settings.resolve(size="smoke", environ={"XDG_CACHE_HOME": str(tmp_path / "cache")}).cache_root
    assert D._download_root(root) == REPO / "data"  # this checkout (data/make_subset.py exists)
    monkeypatch.setattr(D, "repo_data_dir", lambda: tmp_path / "site-packages" / "data")
    assert D._download_root(root) == tmp_path / "cache" / "moe_lite"
    assert D._download_root() == Path.home() / ".cache" / "moe_lite"


# ---- augmentation -----------------------------------------------------------------------------
def test_random_shift_flip_is_a_translated_or_mirrored_copy():
    from moe_lite.data import MEAN, STD, random_shift_flip

    torch.manual_seed(0)
    x = torch.randn(64, 1, 6, 6)
    gen = torch.Generator().manual_seed(3)
    out = random_shift_flip(x, shift=1, flip=True, generator=gen)
    assert out.shape == x.shape
    background = (0.0 - MEAN) / STD
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=background)
    for i in range(64):
        candidates = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), i
    # every offset and both mirror states occur over a batch of 64
    assert not torch.equal(out, x)


def test_random_shift_flip_identity_and_determinism():
    from moe_lite.data import random_shift_flip

    x = torch.randn(8, 1, 5, 5)
    assert torch.equal(random_shift_flip(x, shift=0, flip=False), x)
    a = random_shift_flip(x, generator=torch.Generator().manual_seed(1))
    b = random_shift_flip(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        random_shift_flip(x[0])
    with pytest.raises(ValueError):
        random_shift_flip(x, shift=-1)


def test_classification_task_augments_only_in_training():
    from moe_lite.train import ClassificationTask

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return torch.zeros(images.shape[0], 10)

    x, y = torch.randn(16, 1, 28, 28), torch.zeros(16, dtype=torch.long)
    model = Spy()
    task = ClassificationTask(augment=True)
    torch.manual_seed(0)
    task.loss(model.train(), (x, y))
    task.loss(model.eval(), (x, y))
    assert not torch.equal(seen[0], x) and torch.equal(seen[1], x)
    task.evaluate(model.train(), [(x, y)])
    assert torch.equal(seen[2], x)


def test_env_value_embedded_forces_the_subset(monkeypatch):
    monkeypatch.setenv("MOE_LITE_DATA", "embedded")
    train, test = D.load_splits(verbose=False)
    assert train.source == test.source == "embedded subset"
    assert len(train) == len(D.load_fashion_mnist("train", source="embedded", verbose=False))
