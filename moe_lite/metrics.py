"""Metrics: classification accuracy, and generation quality measured with the kit's own classifier.

Generation is scored with two numbers, both computed with a small Fashion-MNIST CNN that the kit
trains once and caches (:func:`get_feature_classifier`):

* ``fd_fmnist_classifier``: the Fréchet distance between Gaussians fitted to the classifier's
  penultimate features of generated and of real images. **It is not Inception FID**: the features
  come from a 28x28 Fashion-MNIST classifier, not from Inception-v3 on ImageNet, so its values are
  on another scale and cannot be compared with FIDs reported in papers; compare runs of the kit
  with each other only (same classifier cache key, same number of samples).
* ``conditional_accuracy``: the share of class-conditional samples that the classifier assigns
  to the class that was asked for.

Axis legend: ``n`` / ``m`` images, ``f`` feature width, ``c`` classes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import data as fmnist
from .settings import default_cache_root
from .train import ClassificationTask, TrainConfig, atomic_save, fit, pick_device

__all__ = [
    "FD_METRIC",
    "FD_NOTE",
    "CLASSIFIER_VERSION",
    "accuracy",
    "FeatureClassifier",
    "train_feature_classifier",
    "get_feature_classifier",
    "classifier_cache_dir",
    "classifier_outputs",
    "frechet_distance",
    "frechet_distance_from_stats",
    "conditional_accuracy",
    "generation_metrics",
    "real_fd_floor",
]

FD_METRIC = "fd_fmnist_classifier"
FD_NOTE = ("Fréchet distance on moe_lite's Fashion-MNIST classifier features "
           "(not Inception FID; comparable only between moe_lite runs)")
CLASSIFIER_VERSION = "fmnist-cnn-v1"  # bump when the architecture or the training recipe changes

TensorPair = Tuple[Tensor, Tensor]
Split = Union["fmnist.FashionMNIST", TensorPair]


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of rows whose argmax over ``logits [n, c]`` equals ``labels [n]``."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy needs logits [n, c] and labels [n], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


# ================================================================================================
# The feature classifier
# ================================================================================================


class FeatureClassifier(nn.Module):
    """A small CNN for 28x28 Fashion-MNIST whose penultimate layer gives the FD features.

    Three strided convolutions (``width``, ``2*width``, ``4*width`` channels, 28 -> 14 -> 7 -> 4
    pixels) with batch norm and ReLU, a ``feature_dim`` ReLU layer (the features), a linear head.
    Inputs are normalised like :func:`moe_lite.data.to_tensors`.
    """

    def __init__(self, width: int = 16, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.width, self.feature_dim, self.num_classes = width, feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.info: Dict[str, Any] = {}  # how it was trained (filled by training / the cache)

    def features(self, x: Tensor) -> Tensor:
        """``x [n, 1, 28, 28]`` -> penultimate features ``[n, feature_dim]``."""
        if x.dim() != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"FeatureClassifier expects images [n, 1, 28, 28], got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """``x [n, 1, 28, 28]`` -> logits ``[n, num_classes]``."""
        return self.head(self.features(x))

    def hyperparameters(self) -> Dict[str, int]:
        return {"width": self.width, "feature_dim": self.feature_dim, "num_classes": self.num_classes}


def _as_tensors(split: Split) -> TensorPair:
    """``(x float [n, 1, 28, 28] normalised, y long [n])`` from a FashionMNIST split or a pair."""
    if isinstance(split, fmnist.FashionMNIST):
        return fmnist.to_tensors(split)
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return split[0], split[1]
    raise TypeError(f"expected a moe_lite.data.FashionMNIST or an (images, labels) pair, got {type(split).__name__}")


def train_feature_classifier(train: Split, test: Optional[Split] = None, *, width: int = 16,
                             feature_dim: int = 128, epochs: int = 5, batch_size: int = 128,
                             lr: float = 3e-3, seed: int = 0, device: str = "auto",
                             progress: bool = False) -> FeatureClassifier:
    """Train a :class:`FeatureClassifier` with :func:`moe_lite.train.fit` (AdamW, warm-up + cosine).

    Returns it in eval mode with ``info``: ``train_time_s``, ``n_train``, ``test_accuracy`` (None
    without ``test``), ``epochs``, ``device``. Measured with the defaults: 91.6% test accuracy after
    training on the full set (46 s of CPU time on one core), 87.2% on the embedded 10k subset (8 s).
    """
    torch.manual_seed(seed)
    model = FeatureClassifier(width, feature_dim)
    train_loader = fmnist.make_loader(_as_tensors(train), batch_size=batch_size, seed=seed)
    test_loader = fmnist.make_loader(_as_tensors(test), batch_size=1000, shuffle=False) if test is not None else None
    config = TrainConfig(epochs=epochs, lr=lr, weight_decay=1e-4, warmup_fraction=0.1, min_lr_ratio=0.01,
                         batch_size=batch_size, seed=seed, device=device, progress=progress, log_routing=False,
                         eval_every=epochs * len(train_loader))  # evaluate once, at the end
    history = fit(model, ClassificationTask(), train_loader, test_loader, config)
    model.eval()
    model.info = {"train_time_s": round(history.wall_time_s, 1), "n_train": len(train_loader.dataset),
                  "test_accuracy": history.final().get("accuracy"), "epochs": epochs, "device": history.device}
    return model


# ---- the cache -------------------------------------------------------------------------------


def classifier_cache_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """``cache_dir`` (pass ``Settings.cache_root``: ``$MOE_LITE_CACHE`` when set), else ``~/.cache/moe_lite``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return default_cache_root()


def _source_name(split: Split) -> str:
    if isinstance(split, fmnist.FashionMNIST):
        return "full" if split.full else "embedded"
    return "custom"


def _fingerprint(split: Split) -> str:
    """A short hash of the training images and labels (so another data set gets another cache file)."""
    tensors = (split.images, split.labels) if isinstance(split, fmnist.FashionMNIST) else _as_tensors(split)
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def _cache_key(train: Split, hyper: Dict[str, Any]) -> str:
    """``<version>-<source>-<data hash>-<hyperparameters>``: what decides the classifier's weights."""
    recipe = "-".join(f"{k[0]}{v}" for k, v in sorted(hyper.items()))
    return f"{CLASSIFIER_VERSION}-{_source_name(train)}-{_fingerprint(train)}-{recipe}"


def _load_cached(path: Path, key: str) -> Optional[FeatureClassifier]:
    """The classifier stored at ``path`` if it is there and has ``key``, else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a broken cache file is rebuilt, with a note
        print(f"[moe_lite.metrics] ignoring unreadable cache file {path} ({type(err).__name__}: {err})")
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    model = FeatureClassifier(**payload["hyperparameters"])
    model.load_state_dict(payload["state_dict"])
    model.info = dict(payload.get("info", {}))
    return model.eval()


def get_feature_classifier(device: Union[str, torch.device] = "auto", cache_dir: Optional[Union[str, Path]] = None,
                           data: Optional[Tuple[Split, Optional[Split]]] = None, retrain: bool = False, *,
                           width: int = 16, feature_dim: int = 128, epochs: int = 5, seed: int = 0,
                           progress: bool = False, verbose: bool = True) -> FeatureClassifier:
    """The kit's Fashion-MNIST feature classifier: loaded from the cache, or trained and cached.

    Args:
        device: where to put it (``"auto"``: cuda, mps, cpu; training also runs there).
        cache_dir: folder of the cache file: ``Settings.cache_root`` (from ``$MOE_LITE_CACHE``), default
            ``~/.cache/moe_lite`` (:func:`classifier_cache_dir`).
        data: ``(train, test)``, each a :class:`moe_lite.data.FashionMNIST` or an ``(x, y)`` pair
            (``test`` may be None); default :func:`moe_lite.data.load_splits` (the full set when
            there is one, else the embedded subset).
        retrain: train again even when a cached file matches.
        width, feature_dim, epochs, seed: the recipe (part of the cache key).
        progress: show the training bar; verbose: print whether it was loaded or trained.

    The cache file is ``<cache_dir>/<key>.pt`` where the key holds :data:`CLASSIFIER_VERSION`,
    the data source (``full``/``embedded``/``custom``), a hash of the training data and the recipe.
    Returns the classifier in eval mode on ``device``, with ``info`` (test accuracy, training time...).
    """
    train, test = data if data is not None else fmnist.load_splits(verbose=verbose)
    hyper = {"width": width, "feature_dim": feature_dim, "epochs": epochs, "seed": seed}
    key = _cache_key(train, hyper)
    path = classifier_cache_dir(cache_dir) / f"{key}.pt"
    device = pick_device(device)
    model = None if retrain else _load_cached(path, key)
    if model is not None:
        _say(verbose, f"loaded the feature classifier from {path} ({_describe(model)})")
        return model.to(device)
    model = train_feature_classifier(train, test, width=width, feature_dim=feature_dim, epochs=epochs,
                                     seed=seed, device=str(device), progress=progress)
    model.info["source"] = _source_name(train)
    atomic_save({"key": key, "version": CLASSIFIER_VERSION, "hyperparameters": model.hyperparameters(),
                  "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "info": model.info}, path)
    _say(verbose, f"trained the feature classifier in {model.info['train_time_s']} s on {device} "
                  f"({_describe(model)}); saved to {path}")
    return model


def _describe(model: FeatureClassifier) -> str:
    info = model.info
    acc = info.get("test_accuracy")
    acc_text = f"test accuracy {100 * acc:.1f}%" if isinstance(acc, float) else "no test split"
    return f"{info.get('source', '?')} data, {info.get('n_train', '?')} training images, {acc_text}"


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(f"[moe_lite.metrics] {message}")


# ================================================================================================
# Fréchet distance and generation metrics
# ================================================================================================


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, images: Tensor, batch_size: int = 500) -> TensorPair:
    """``(features [n, f], logits [n, c])`` of ``images [n, 1, 28, 28]``, float32 on the CPU.

    ``classifier`` is a :class:`FeatureClassifier` or any module with ``features(x)`` and ``head(f)``.

    Runs in eval mode on the classifier's device, ``batch_size`` images at a time; the
    classifier's train/eval mode is restored afterwards.
    """
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    try:
        for chunk in images.split(batch_size):
            f = classifier.features(chunk.to(device).float())
            feats.append(f.float().cpu())
            logits.append(classifier.head(f).float().cpu())
    finally:
        classifier.train(was_training)
    if not feats:
        raise ValueError("classifier_outputs got no images")
    return torch.cat(feats), torch.cat(logits)


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64.

    ``||mu_a - mu_b||² + Tr(cov_a + cov_b - 2 (cov_a cov_b)^{1/2})``, where the trace of the matrix
    square root is taken as ``Tr((sqrt(cov_a) cov_b sqrt(cov_a))^{1/2})`` (the same eigenvalues,
    but of a symmetric matrix: ``eigh`` then, with negative rounding noise clamped to 0). The
    result is clamped at 0.
    """
    mu_a, mu_b, cov_a, cov_b = (t.detach().to(torch.float64).cpu() for t in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.numel(), mu_a.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu_a.shape)} / {tuple(mu_b.shape)}, "
                         f"cov {tuple(cov_a.shape)} / {tuple(cov_b.shape)}")
    root_a = _sqrt_psd((cov_a + cov_a.T) / 2)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(0.0, float(distance))


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance on moe_lite classifier features (not Inception FID) between two sets.

    Fits a Gaussian (mean, unbiased covariance) to ``feats_a [n, f]`` and to ``feats_b [m, f]`` and
    returns :func:`frechet_distance_from_stats`. Needs n, m >= 2; with fewer samples than features
    the covariances are rank-deficient and the distance is biased upwards, so compare values
    computed from the same numbers of samples.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"frechet_distance needs [n, f] and [m, f] features, got "
                         f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 samples in each set")
    a, b = feats_a.detach().to(torch.float64).cpu(), feats_b.detach().to(torch.float64).cpu()
    return frechet_distance_from_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def conditional_accuracy(classifier: nn.Module, samples: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Share of ``samples [n, 1, 28, 28]`` that ``classifier`` puts in the class asked for (``labels [n]``)."""
    _, logits = classifier_outputs(classifier, samples, batch_size)
    return accuracy(logits, labels.cpu())


def _valid_pixel_range() -> Tuple[float, float]:
    """The normalised values of pixels 0 and 1 (see :func:`moe_lite.data.to_tensors`)."""
    return (0.0 - fmnist.MEAN) / fmnist.STD, (1.0 - fmnist.MEAN) / fmnist.STD


def generation_metrics(samples: Tensor, labels: Tensor, reference: Tensor, classifier: nn.Module, *,
                       clamp: bool = True, batch_size: int = 500) -> Dict[str, float]:
    """Quality of class-conditional samples, measured with the kit's classifier (not Inception).

    Args:
        samples: generated images ``[n, 1, 28, 28]`` in the data's normalised range (what
            :func:`moe_lite.data.to_tensors` gives and the DiT is trained on).
        labels: the classes asked for, long ``[n]``.
        reference: real images ``[m, 1, 28, 28]``, normalised the same way (e.g. the test split).
        classifier: from :func:`get_feature_classifier`.
        clamp: clip samples to the range of real pixels (0..1 before normalisation) first, as
            saving them as images would.

    Returns:
        ``{"fd_fmnist_classifier": Fréchet distance on moe_lite classifier features (NOT Inception
        FID), "conditional_accuracy": share of samples classified as their label, "num_samples": n,
        "num_reference": m}``. Report the FD with :data:`FD_NOTE`.
    """
    if samples.dim() != 4 or labels.shape != samples.shape[:1]:
        raise ValueError(f"samples must be [n, 1, 28, 28] with labels [n], got {tuple(samples.shape)} "
                         f"and {tuple(labels.shape)}")
    if clamp:
        samples = samples.clamp(*_valid_pixel_range())
    sample_feats, sample_logits = classifier_outputs(classifier, samples, batch_size)
    reference_feats, _ = classifier_outputs(classifier, reference, batch_size)
    return {
        FD_METRIC: frechet_distance(sample_feats, reference_feats),
        "conditional_accuracy": accuracy(sample_logits, labels.cpu()),
        "num_samples": float(samples.shape[0]),
        "num_reference": float(reference.shape[0]),
    }


def real_fd_floor(real: Tensor, reference: Tensor, classifier: nn.Module, num_samples: int, *, draws: int = 3,
                  seed: int = 0, batch_size: int = 500) -> Dict[str, float]:
    """The Fréchet distance of *real* images against ``reference``, at the sample count a generator is
    scored with: the noise floor under every generated-image FD.

    An FD computed from ``num_samples`` images is biased upwards and varies from draw to draw even
    for perfect samples; a generator's FD means something only next to this number.

    Args:
        real: a pool of real images ``[m, 1, 28, 28]`` (normalised), other than ``reference``
            (e.g. the training split, when ``reference`` is the test split).
        reference: the real images generated samples are compared with ``[r, 1, 28, 28]``.
        classifier: from :func:`get_feature_classifier`.
        num_samples: images per draw (the number of generated samples being judged).
        draws: independent draws of ``num_samples`` images from ``real``.

    Returns:
        ``{"mean": ..., "std": ..., "min": ..., "max": ..., "draws": draws, "num_samples": n}``
        (``std`` is the sample standard deviation over draws; 0 for one draw).
    """
    if num_samples < 2 or num_samples > real.shape[0]:
        raise ValueError(f"num_samples must be in [2, {real.shape[0]}] (the real pool), got {num_samples}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    reference_feats, _ = classifier_outputs(classifier, reference, batch_size)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        pick = torch.randperm(real.shape[0], generator=gen)[:num_samples]
        feats, _ = classifier_outputs(classifier, real[pick], batch_size)
        values.append(frechet_distance(feats, reference_feats))
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if draws > 1 else 0.0, "min": float(t.min()),
            "max": float(t.max()), "draws": float(draws), "num_samples": float(num_samples)}
