"""The training/evaluation data: scikit-learn's bundled 8x8 handwritten digits, upsampled.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 images, 8x8, grey levels 0..16,
labels 0..9), so nothing is downloaded. Images are upsampled bilinearly to ``IMAGE_SIZE`` x
``IMAGE_SIZE`` and mapped to [-1, 1] (ink = +1, background = -1), one channel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
"""Side of the upsampled images in pixels (the pipelines' default height and width)."""

SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1,797 digits as ``(images, labels)``.

    images: float32 ``[N, 1, size, size]`` in [-1, 1] (bilinear upsampling of the 8x8 originals,
    ``align_corners=False``); labels: int64 ``[N]`` in 0..9. Deterministic.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def train_test_split(size: int = IMAGE_SIZE):
    """Fixed 80/20 split (seeded permutation): ``(x_train, y_train, x_test, y_test)``."""
    x, y = load_digit_images(size)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = int(round(TEST_FRACTION * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]
