"""A small CNN digit classifier: the "recognisability" judge and the feature extractor for the
Frechet distance in :mod:`hybridiff_rt.demo.quality`.

Trained on the 80% split of the upsampled scikit-learn digits (:mod:`.data`), with small random
shifts; about 90k parameters. Input: images ``[B, C, H, W]`` in [-1, 1] (ink bright, background
dark, as the bundled pipelines produce them); C = 1 or 3 (averaged to grey), any H, W (resized
bilinearly to 32 x 32). Output: logits ``[B, 10]``; :meth:`DigitClassifier.features` gives the
64-dimensional penultimate activations used for the Frechet distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IMAGE_SIZE

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv(16)-pool-conv(32)-pool-conv(64)-pool-fc(64)-fc(10) on 1 x 32 x 32 grey images."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * (IMAGE_SIZE // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Bring ``[B,C,H,W]`` (C in {1,3}, values in [-1,1]) to ``[B,1,32,32]`` float32."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1|3, H, W], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, 64]`` (after ReLU) for images in [-1, 1]."""
        x = self.convs(self.prepare(images))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]``."""
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels int64 ``[B]``."""
        self.eval()
        return torch.cat([self(images[i:i + batch_size]).argmax(-1)
                          for i in range(0, images.shape[0], batch_size)])

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (float16) into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(
            {"architecture": "DigitClassifier", "feature_dim": self.feature_dim,
             "num_classes": self.head.out_features, "image_size": IMAGE_SIZE,
             "input_range": [-1.0, 1.0]}, indent=2) + "\n")
        save_file({k: v.detach().to(torch.float16).contiguous()
                   for k, v in self.state_dict().items()}, str(folder / "model.safetensors"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "DigitClassifier":
        """Load what :meth:`save` wrote (weights upcast to float32), in eval mode."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
        if not w_path.is_file() or not cfg_path.is_file():
            raise FileNotFoundError(
                f"no classifier weights in {folder} (expected config.json and model.safetensors); "
                "train them with `python -m hybridiff_rt.demo.bundled.train --model classifier`")
        cfg = json.loads(cfg_path.read_text())
        model = cls(feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(w_path)).items()})
        return model.eval().requires_grad_(False)
