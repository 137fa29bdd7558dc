"""Properties of hybridiff_rt.demo.quality (PSNR, SSIM, Frechet distance, loading, compare)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybridiff_rt.demo import quality as Q


def _images(n=3, c=1, h=24, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images in [0, 1]: upsampled noise
    x = torch.rand(n, c, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def _noisy(x, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------- PSNR

def test_psnr_known_values():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full((2, 1, 8, 8), 0.1)
    assert Q.psnr(a, b, 1.0) == pytest.approx(20.0, abs=1e-5)  # mse 0.01 (0.1 in float32)
    assert Q.psnr(a * 255, b * 255, 255.0) == pytest.approx(20.0, abs=1e-5)
    assert Q.psnr(a, a, 1.0) == math.inf
    per = Q.psnr(a, torch.cat([a[:1], b[1:]]), 1.0, reduction="none")
    assert per.shape == (2,) and per[0] == math.inf and per[1] == pytest.approx(20.0)


def test_psnr_symmetric_and_decreasing_with_noise():
    x = _images()
    vals = [Q.psnr(x, _noisy(x, s)) for s in (0.01, 0.05, 0.2)]
    assert vals[0] > vals[1] > vals[2]
    y = _noisy(x, 0.05)
    assert Q.psnr(x, y) == pytest.approx(Q.psnr(y, x))


# ----------------------------------------------------------------------------- SSIM

def _ssim_reference(a: np.ndarray, b: np.ndarray, data_range=1.0, size=11, sigma=1.5):
    """Direct transcription of Wang et al. (2004): loop over every valid window position."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma ** 2))
    win = np.outer(g, g)
    win /= win.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for ai, bi in zip(a, b):  # images
        chans = []
        for x, y in zip(ai, bi):  # channels
            vals = []
            for i in range(x.shape[0] - size + 1):
                for j in range(x.shape[1] - size + 1):
                    px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
                    mx, my = (win * px).sum(), (win * py).sum()
                    vx = (win * (px - mx) ** 2).sum()
                    vy = (win * (py - my) ** 2).sum()
                    cxy = (win * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
            chans.append(np.mean(vals))
        out.append(np.mean(chans))
    return np.array(out)


def test_ssim_matches_reference_implementation():
    a = _images(n=2, c=3, h=16, w=18, seed=3)
    b = _noisy(a, 0.1, seed=4)
    got = Q.ssim(a, b, reduction="none").numpy()
    ref = _ssim_reference(a.double().numpy(), b.double().numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    got2 = Q.ssim(a * 2 - 1, b * 2 - 1, data_range=2.0, reduction="none").numpy()
    np.testing.assert_allclose(got2, _ssim_reference(a.double().numpy() * 2 - 1, b.double().numpy() * 2 - 1, 2.0),
                               rtol=1e-9, atol=1e-12)


def test_ssim_properties():
    x = _images()
    assert Q.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    y = _noisy(x, 0.05)
    assert Q.ssim(x, y) == pytest.approx(Q.ssim(y, x), abs=1e-12)
    vals = [Q.ssim(x, _noisy(x, s)) for s in (0.01, 0.05, 0.2, 0.5)]
    assert all(v1 > v2 for v1, v2 in zip(vals, vals[1:])), vals
    assert all(-1.0 <= v <= 1.0 for v in vals)
    assert Q.ssim(x, 1 - x) < 0.0  # inverted structure correlates negatively
    with pytest.raises(ValueError):
        Q.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))  # smaller than the window


# ----------------------------------------------------------------------------- Frechet distance

def _fd_scipy(a, b):
    linalg = pytest.importorskip("scipy.linalg")

    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb).real
    return float(mu @ mu + np.trace(sa + sb - 2 * covmean))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1.0
    assert Q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert Q.frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-6)
    assert Q.frechet_distance(a, b) == pytest.approx(Q.frechet_distance(b, a), rel=1e-9)
    shift = np.arange(6.0)
    assert Q.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    with pytest.raises(ValueError):
        Q.frechet_distance(a, b[:, :5])
    with pytest.raises(ValueError):
        Q.frechet_distance(a[:1], b)


# ----------------------------------------------------------------------------- loading, compare

def _write_pngs(folder, images, names=None):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / (names[i] if names else f"{i:03d}.png"))


def test_load_images_grey_and_rgb(tmp_path):
    grey, rgb = _images(4, 1), _images(2, 3, seed=5)
    _write_pngs(tmp_path / "g", grey)
    _write_pngs(tmp_path / "c", rgb)
    g = Q.load_images(tmp_path / "g")
    assert g.shape == (4, 1, 24, 24) and g.dtype == torch.float32
    assert (g - grey).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit quantisation only
    c = Q.load_images(tmp_path / "c")
    assert c.shape == (2, 3, 24, 24)
    with pytest.raises(FileNotFoundError):
        Q.load_images(tmp_path / "missing")
    _write_pngs(tmp_path / "mixed", [grey[0], _images(1, 1, 16, 16)[0]])
    with pytest.raises(ValueError):
        Q.load_images(tmp_path / "mixed")


def test_as_images_forms():
    x = _images(2, 3)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    assert torch.allclose(Q.as_images(nhwc), x)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(Q.as_images(u8), u8.float() / 255)
    with pytest.raises(ValueError):
        Q.as_images(torch.zeros(2, 5, 8, 8))


class _ToyClassifier(torch.nn.Module):
    """Predicts 0 for dark images, 1 for bright ones; features = mean and std."""

    def features(self, x):
        return torch.stack([x.flatten(1).mean(1), x.flatten(1).std(1)], 1)

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([-m, m], 1)


def test_classifier_accuracy_with_any_classifier():
    dark, bright = torch.full((3, 1, 12, 12), 0.1), torch.full((2, 1, 12, 12), 0.9)
    x = torch.cat([dark, bright])
    assert Q.classifier_accuracy(x, [0, 0, 0, 1, 1], _ToyClassifier()) == 1.0
    assert Q.classifier_accuracy(x, [0, 0, 1, 1, 1], _ToyClassifier()) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        Q.classifier_accuracy(x, [0, 1], _ToyClassifier())


def test_compare_folders_and_tensors(tmp_path):
    x = _images(5, 1, seed=7)
    y = _noisy(x, 0.1)
    _write_pngs(tmp_path / "a", x)
    _write_pngs(tmp_path / "b", x)
    clf = _ToyClassifier()
    same = Q.compare(tmp_path / "a", tmp_path / "b", classifier=clf)
    assert same["n"] == 5 and same["psnr_db"] == math.inf and same["psnr_db_finite_mean"] is None
    assert same["ssim"] == pytest.approx(1.0) and same["identical_fraction"] == 1.0
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["label_agreement"] == 1.0
    diff = Q.compare(x, y, labels=[0] * 5, classifier=clf,
                     extra_metrics={"l1": lambda p, q: float((p - q).abs().mean())})
    assert diff["psnr_db"] == pytest.approx(Q.psnr(x, y)) and diff["ssim"] < 1.0
    assert diff["l1"] > 0 and 0.0 <= diff["accuracy_a"] <= 1.0
    import json

    json.dumps(diff)  # serialisable
    fd = Q.compare(x, y, feature_fn=lambda t: t.flatten(1)[:, :3])
    assert fd["frechet_distance"] > 0 and "label_agreement" not in fd
    _write_pngs(tmp_path / "c", x, names=[f"z{i}.png" for i in range(5)])
    with pytest.raises(ValueError):
        Q.compare(tmp_path / "a", tmp_path / "c", classifier=clf)
