"""Image-quality metrics for comparing two sets of images (the paper's protocol, scaled down).

The paper measures a parallel run by comparing its images with the single-device images of the
same seeds (FID, LPIPS, PSNR). This module provides what runs offline with no downloaded
weights:

- :func:`psnr` and :func:`ssim`: paired, per image, averaged;
- :func:`classifier_accuracy`: share of images the bundled digit classifier assigns to the
  intended digit (for the bundled digit models);
- :func:`frechet_distance`: the Frechet distance between Gaussian fits of two feature sets
  (by default the bundled classifier's 64-d penultimate features; on Inception-v3 pool features
  this is exactly FID);
- :func:`load_images` for a folder of PNG/JPEG files and :func:`compare`, which runs all of the
  above on two folders, tensors, arrays or lists of PIL images.

Image convention everywhere: float ``[N, C, H, W]`` with values in [0, 1] (what diffusers
pipelines return with ``output_type="pt"``), C = 1 (grey) or 3 (RGB). :func:`as_images` converts
other forms (folders, ``uint8``, NHWC numpy from ``output_type="np"``, PIL lists).

Adding LPIPS or FID with your own weights (nothing here downloads anything):

- FID: build an Inception-v3 feature extractor from weights you have installed (for example
  ``torchvision.models.inception_v3(weights=None)`` loaded from your own ``pt_inception`` file,
  ``fc = Identity``) and pass ``feature_fn=lambda x: model(resize_299(x))`` to :func:`compare`;
  the returned ``"frechet_distance"`` is then FID. (FID on fewer than a few thousand images is
  strongly biased upwards: compare numbers only at equal set sizes.)
- LPIPS: with the ``lpips`` package and its weights available locally,
  ``m = lpips.LPIPS(net="alex", pretrained=True)`` and
  ``compare(a, b, extra_metrics={"lpips": lambda x, y: m(2*x-1, 2*y-1).mean().item()})``
  (LPIPS expects [-1, 1] RGB; repeat grey channels to 3 first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------- loading

def image_files(folder: str | Path) -> list[Path]:
    """Image files (by suffix, case-insensitive) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _pil_to_array(img) -> np.ndarray:
    """PIL image -> float32 ``[C, H, W]`` in [0, 1]; grey stays 1 channel, alpha is dropped."""
    if img.mode in ("L", "I;16", "I", "F", "1"):
        a = np.asarray(img.convert("F"), dtype=np.float32)
        scale = 65535.0 if img.mode == "I;16" else (1.0 if img.mode == "F" else 255.0)
        return (a / scale)[None]
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return a.transpose(2, 0, 1)


def load_images(folder: str | Path) -> torch.Tensor:
    """Load every image of ``folder`` (sorted by file name) as float32 ``[N, C, H, W]`` in [0, 1].

    Grey files give C = 1, colour files C = 3 (alpha dropped). If the folder mixes grey and
    colour, all are returned as RGB. All images must have the same height and width.
    """
    from PIL import Image

    files = image_files(folder)
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(_pil_to_array(im))
    if len({a.shape[1:] for a in arrays}) != 1:
        raise ValueError(f"images in {folder} differ in size: {sorted({a.shape[1:] for a in arrays})}")
    if len({a.shape[0] for a in arrays}) != 1:
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays))


def as_images(x) -> torch.Tensor:
    """Convert ``x`` to float32 ``[N, C, H, W]`` in [0, 1] (C = 1 or 3).

    Accepts a folder path (:func:`load_images`); a tensor or array ``[N,C,H,W]`` / ``[C,H,W]``
    (float in [0, 1], or ``uint8`` in 0..255); an NHWC array with 1 or 3 channels last (what
    ``output_type="np"`` gives); a list of PIL images (the pipelines' default output).
    """
    if isinstance(x, (str, Path)):
        return load_images(x)
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("empty image list")
        if isinstance(x[0], (torch.Tensor, np.ndarray)):
            return as_images(torch.stack([torch.as_tensor(np.asarray(v)) if isinstance(v, np.ndarray)
                                          else v for v in x]))
        return torch.from_numpy(np.stack([_pil_to_array(im) for im in x]))
    if isinstance(x, np.ndarray):
        if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"cannot read images from {type(x).__name__}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.detach().float().cpu()


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_images(a), as_images(b)
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"image sets differ in count or size: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:  # grey vs colour: compare in grey
        a = a.mean(1, keepdim=True) if a.shape[1] == 3 else a
        b = b.mean(1, keepdim=True) if b.shape[1] == 3 else b
    return a.double(), b.double()


# ----------------------------------------------------------------------------- paired metrics

def psnr(a, b, data_range: float = 1.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB, per image pair, then averaged.

    a, b: images ``[N, C, H, W]`` (or anything :func:`as_images` reads), paired by index.
    data_range: max minus min of the value range (1.0 for [0, 1], 255 for uint8 values given as
    floats, 2.0 for [-1, 1]). PSNR_i = 10 log10(data_range^2 / mean((a_i - b_i)^2)); identical
    pairs give ``inf`` (and a mean of ``inf``). reduction: "mean" -> float, "none" -> float64
    tensor ``[N]``.
    """
    a, b = _pair(a, b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    with np.errstate(divide="ignore"):
        vals = 10.0 * torch.log10(data_range ** 2 / mse)
    return _reduce(vals, reduction)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window ``[size, size]`` (float64), sums to 1."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a, b, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: str = "mean"):
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per image, averaged.

    a, b: images ``[N, C, H, W]`` paired by index, H and W >= ``window_size``. Local means,
    variances and covariance use the normalised Gaussian window (``window_size`` pixels,
    ``sigma`` pixels) over every position where it fits ("valid", no padding); the SSIM map is
    averaged over positions and channels. C1 = (k1 L)^2, C2 = (k2 L)^2 with L = data_range.
    Population (biased) local variances, as in the original paper. Result in [-1, 1]; 1 iff
    the pair is identical. reduction: "mean" -> float, "none" -> float64 tensor ``[N]``.
    """
    a, b = _pair(a, b)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(f"images {tuple(a.shape[-2:])} smaller than the SSIM window {window_size}")
    n, c = a.shape[:2]
    w = gaussian_window(window_size, sigma)[None, None].expand(c, 1, -1, -1)

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return _reduce(smap.flatten(1).mean(1), reduction)


def _reduce(vals: torch.Tensor, reduction: str):
    if reduction == "none":
        return vals
    if reduction == "mean":
        return float(vals.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------- classifier metrics

def _classifier(classifier):
    if classifier is None:
        from .bundled import load_classifier

        classifier = load_classifier()
    return classifier


@torch.no_grad()
def classifier_features(images, classifier=None, batch_size: int = 256) -> np.ndarray:
    """Features ``[N, D]`` (float64) of images in [0, 1] from ``classifier.features``.

    classifier: any module with ``features(x)`` taking ``[B, C, H, W]`` in [-1, 1]; default the
    bundled digit classifier (D = 64).
    """
    clf = _classifier(classifier)
    x = as_images(images) * 2.0 - 1.0
    return torch.cat([clf.features(x[i:i + batch_size]).double()
                      for i in range(0, x.shape[0], batch_size)]).numpy()


@torch.no_grad()
def classifier_predictions(images, classifier=None, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels int64 ``[N]`` for images in [0, 1] (``classifier(x in [-1,1])`` logits)."""
    clf = _classifier(classifier)
    x = as_images(images) * 2.0 - 1.0
    return torch.cat([clf(x[i:i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])


def classifier_accuracy(images, labels, classifier=None) -> float:
    """Fraction (0..1) of ``images`` (in [0, 1]) that ``classifier`` labels as ``labels`` ``[N]``."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
    pred = classifier_predictions(images, classifier)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.numel()} images but {labels.numel()} labels")
    return float((pred == labels).double().mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N_a, D]``, ``[N_b, D]``.

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with unbiased sample
    covariances S (N >= 2 each). The symmetric eigenvalue form is used for the matrix square
    root (equal to Tr sqrtm(S_a S_b) for PSD S; deterministic, never complex). Units: squared
    feature units. With Inception pool features this is FID; with few samples it is biased
    upwards (compare only at equal N).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected feature matrices [N, D] with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least 2 samples in each set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = _sqrtm_psd(s_a)
    cross = np.linalg.eigvalsh(r @ s_b @ r)
    tr_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_cross)
    return max(d, 0.0)


# ----------------------------------------------------------------------------- one call

def compare(a, b, labels=None, classifier=None, data_range: float = 1.0,
            feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
            extra_metrics: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] | None = None) -> dict:
    """Compare image set ``b`` (e.g. the parallel run) with reference set ``a`` (the serial run).

    a, b: folders (paired by sorted file name; the names must match), tensors/arrays or PIL lists
    (paired by index); values in [0, 1]. labels: optional intended digits ``[N]`` for the
    accuracy entries. classifier: module with ``features``/``forward`` on [-1, 1] input (default
    the bundled digit classifier). feature_fn: optional ``images [N,C,H,W] in [0,1] -> [N, D]``
    replacing the classifier features for the Frechet distance (give Inception features for FID).
    extra_metrics: ``{name: fn(a, b) -> float}`` added to the result (e.g. LPIPS).

    Returns a dict of floats/ints/None: ``n``; ``psnr_db`` (mean over pairs, in dB; ``inf`` as soon
    as one pair is bit-identical, which Python's ``json`` writes as ``Infinity``);
    ``psnr_db_finite_mean`` (mean over the non-identical pairs only; None if all are identical);
    ``ssim``; ``identical_fraction`` (pairs that are bit-equal); ``frechet_distance``;
    ``label_agreement`` (fraction of pairs the classifier puts in the same class); with labels,
    ``accuracy_a`` and ``accuracy_b``; plus ``extra_metrics``.
    """
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        na, nb = [p.name for p in image_files(a)], [p.name for p in image_files(b)]
        if na != nb:
            raise ValueError(f"file names differ between {a} and {b}: "
                             f"{sorted(set(na) ^ set(nb))[:5]}")
    ta, tb = _pair(a, b)
    ta, tb = ta.float(), tb.float()
    per = psnr(ta, tb, data_range, reduction="none")
    finite = per[torch.isfinite(per)]
    out: dict = {
        "n": int(ta.shape[0]),
        "psnr_db": float(per.mean()),
        "psnr_db_finite_mean": float(finite.mean()) if finite.numel() else None,
        "ssim": ssim(ta, tb, data_range) if min(ta.shape[-2:]) >= 11 else None,
        "identical_fraction": float((ta == tb).flatten(1).all(1).double().mean()),
    }
    if feature_fn is not None:
        with torch.no_grad():
            fa, fb = (np.asarray(torch.as_tensor(feature_fn(t)).double().cpu()) for t in (ta, tb))
    else:
        clf = _classifier(classifier)
        fa, fb = classifier_features(ta, clf), classifier_features(tb, clf)
    out["frechet_distance"] = frechet_distance(fa, fb) if ta.shape[0] >= 2 else None
    if feature_fn is None or classifier is not None:
        clf = _classifier(classifier)
        pa, pb = classifier_predictions(ta, clf), classifier_predictions(tb, clf)
        out["label_agreement"] = float((pa == pb).double().mean())
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
            out["accuracy_a"] = float((pa == lab).double().mean())
            out["accuracy_b"] = float((pb == lab).double().mean())
    for name, fn in (extra_metrics or {}).items():
        out[name] = float(fn(ta, tb))
    return out


__all__ = ["as_images", "classifier_accuracy", "classifier_features", "classifier_predictions",
           "compare", "frechet_distance", "gaussian_window", "image_files", "load_images", "psnr",
           "ssim"]
