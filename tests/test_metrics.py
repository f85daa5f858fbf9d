"""Metrics: accuracy, the Fréchet distance (closed forms), conditional accuracy, the classifier cache."""

import pytest
import torch
from torch import nn

from moe_lite import data as fmnist
from moe_lite.metrics import (
    FD_METRIC,
    FeatureClassifier,
    accuracy,
    classifier_outputs,
    conditional_accuracy,
    frechet_distance,
    frechet_distance_from_stats,
    generation_metrics,
    get_feature_classifier,
    real_fd_floor,
)




def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError, match="logits"):
        accuracy(logits, torch.tensor([0, 1]))


# ---- Fréchet distance ------------------------------------------------------------------------------
def random_spd(f, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(f, f, generator=g, dtype=torch.float64)
    return a @ a.T / f + 0.1 * torch.eye(f, dtype=torch.float64)


def test_frechet_from_stats_diagonal_closed_form():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    expected = (mu_a - mu_b).pow(2).sum() + (var_a.sqrt() - var_b.sqrt()).pow(2).sum()  # 5 + (1 + 0 + 4)
    fd = frechet_distance_from_stats(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert fd == pytest.approx(float(expected), abs=1e-10) and fd == pytest.approx(10.0)


def test_frechet_from_stats_general_covariances():
    cov_a, cov_b = random_spd(6, 0), random_spd(6, 1)
    mu_a, mu_b = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    # independent route: Tr (cov_a cov_b)^{1/2} = sum of sqrt(eigenvalues of the non-symmetric product)
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0).sqrt().sum()
    expected = 6.0 + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(float(expected), rel=1e-9)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(
        frechet_distance_from_stats(mu_b, cov_b, mu_a, cov_a), rel=1e-9)
    assert frechet_distance_from_stats(mu_a, cov_a, mu_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_on_samples():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8.0)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)
    # scaling about the origin: ||mu (1 - s)||² + (1 - s)² Tr(cov), with the sample statistics
    a64 = a.double()
    expected = 0.25 * (a64.mean(0).pow(2).sum() + torch.cov(a64.T).trace())
    assert frechet_distance(a, 0.5 * a) == pytest.approx(float(expected), rel=1e-6)
    b = torch.randn(300, 8, generator=g)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, b[:, :4])
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


# ---- conditional accuracy and generation metrics ---------------------------------------------------
class PixelArgmax(nn.Module):
    """Stand-in classifier: the class is the column (0..9) of the brightest pixel in row 0."""

    def __init__(self):
        super().__init__()
        self.head = nn.Identity()
        self.anchor = nn.Parameter(torch.zeros(()))  # so that it has a device

    def features(self, x):
        return x[:, 0, 0, :10] + self.anchor


def images_for(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(len(labels), 1, 28, 28, generator=g)
    x[torch.arange(len(labels)), 0, 0, labels] = 1.0 + torch.rand(len(labels), generator=g)
    return x


def test_conditional_accuracy_and_generation_metrics():
    asked = torch.arange(20) % 10
    shown = asked.clone()
    shown[:5] = (asked[:5] + 1) % 10  # 5 of 20 samples show the wrong class
    samples = images_for(shown)
    assert conditional_accuracy(PixelArgmax(), samples, asked) == 0.75
    reference = images_for(asked, seed=1)
    m = generation_metrics(samples, asked, reference, PixelArgmax(), clamp=False)
    assert m["conditional_accuracy"] == 0.75 and m["num_samples"] == 20 and m["num_reference"] == 20
    fa, _ = classifier_outputs(PixelArgmax(), samples)
    fb, _ = classifier_outputs(PixelArgmax(), reference)
    assert m[FD_METRIC] == pytest.approx(frechet_distance(fa, fb))
    same = generation_metrics(reference, asked, reference, PixelArgmax())
    assert same[FD_METRIC] == pytest.approx(0.0, abs=1e-6) and same["conditional_accuracy"] == 1.0
    with pytest.raises(ValueError, match="labels"):
        generation_metrics(samples, asked[:3], reference, PixelArgmax())


def test_real_fd_floor_matches_hand_draws():
    pool = images_for(torch.arange(60) % 10, seed=2)
    reference = images_for(torch.arange(40) % 10, seed=3)
    floor = real_fd_floor(pool, reference, PixelArgmax(), num_samples=20, draws=3, seed=5)
    # the same three draws by hand: randperm from one generator seeded 5
    gen = torch.Generator().manual_seed(5)
    ref_feats, _ = classifier_outputs(PixelArgmax(), reference)
    by_hand = []
    for _ in range(3):
        feats, _ = classifier_outputs(PixelArgmax(), pool[torch.randperm(60, generator=gen)[:20]])
        by_hand.append(frechet_distance(feats, ref_feats))
    assert floor["mean"] == pytest.approx(sum(by_hand) / 3)
    assert floor["min"] == pytest.approx(min(by_hand)) and floor["max"] == pytest.approx(max(by_hand))
    assert floor["std"] > 0 and floor["draws"] == 3 and floor["num_samples"] == 20
    # fewer samples per draw: a larger floor (the FD's small-sample bias), which is why it is printed
    assert real_fd_floor(pool, reference, PixelArgmax(), num_samples=5, draws=3)["mean"] > floor["mean"]
    with pytest.raises(ValueError, match="num_samples"):
        real_fd_floor(pool, reference, PixelArgmax(), num_samples=61)
    with pytest.raises(ValueError, match="draws"):
        real_fd_floor(pool, reference, PixelArgmax(), num_samples=10, draws=0)


# ---- the feature classifier and its cache ------------------------------------------------------------
def test_feature_classifier_shapes():
    model = FeatureClassifier(width=4, feature_dim=32)
    x = torch.randn(3, 1, 28, 28)
    assert model.features(x).shape == (3, 32) and model(x).shape == (3, 10)
    with pytest.raises(ValueError, match="28, 28"):
        model(torch.randn(3, 28, 28))


@pytest.fixture(scope="module")
def tiny_data():
    """300 train / 100 test images of the embedded subset (stratified)."""
    train, test = fmnist.load_splits(source="embedded", verbose=False)
    return fmnist.subsample(train, 30), fmnist.subsample(test, 10)


def test_feature_classifier_cache_round_trip(tiny_data, tmp_path, monkeypatch, capsys):
    kwargs = dict(device="cpu", data=tiny_data, width=4, feature_dim=16, epochs=1, cache_dir=tmp_path)
    trained = get_feature_classifier(**kwargs)
    assert "trained the feature classifier" in capsys.readouterr().out
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and "-embedded-" in files[0].name and files[0].name.startswith("fmnist-cnn-v1")
    assert not trained.training and trained.info["n_train"] == 300
    assert 0.0 <= trained.info["test_accuracy"] <= 1.0

    loaded = get_feature_classifier(**kwargs)
    out = capsys.readouterr().out
    assert "loaded the feature classifier" in out and str(files[0]) in out
    assert not loaded.training and loaded.info == trained.info
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = fmnist.to_tensors(tiny_data[1])[0]
    assert torch.equal(trained(x), loaded(x))

    # another recipe or other data -> another cache file; retrain=True ignores the cache
    get_feature_classifier(**{**kwargs, "feature_dim": 8})
    x_train, y_train = fmnist.to_tensors(tiny_data[0])
    get_feature_classifier(**{**kwargs, "data": ((x_train[:100], y_train[:100]), None)})
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert any("-custom-" in p.name for p in tmp_path.glob("*.pt"))
    get_feature_classifier(**kwargs, retrain=True)
    assert "trained the feature classifier" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.pt"))) == 3 and not list(tmp_path.glob(".*tmp"))


def test_cache_dir_argument_wins_and_broken_files_are_rebuilt(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_LITE_CACHE", str(tmp_path / "env"))
    kwargs = dict(device="cpu", data=tiny_data, width=4, feature_dim=16, epochs=1, cache_dir=tmp_path / "arg")
    get_feature_classifier(**kwargs)
    (path,) = (tmp_path / "arg").glob("*.pt")
    assert not (tmp_path / "env").exists()
    path.write_bytes(b"not a checkpoint")
    model = get_feature_classifier(**kwargs)
    out = capsys.readouterr().out
    assert "ignoring unreadable cache file" in out and "trained the feature classifier" in out
    assert torch.isfinite(model(torch.zeros(1, 1, 28, 28))).all()
