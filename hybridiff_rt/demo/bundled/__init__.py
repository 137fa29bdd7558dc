"""Tiny trained text-to-image models that ship with hybridiff_rt (no GPU, no downloads).

Two classifier-free-guided diffusion models trained on scikit-learn's bundled 8x8 handwritten
digits (upsampled to 32 x 32, one grey channel), plus a digit classifier to judge them:

========  ============================================  =========================================
name      stock diffusers pipeline                      denoiser / scheduler
========  ============================================  =========================================
"unet"    ``StableDiffusionXLPipeline`` (2 CLIP text    SDXL-shaped ``UNet2DConditionModel``
          encoders, text_time added conditioning)       (epsilon), ``EulerDiscreteScheduler``
"sd3"     ``StableDiffusion3Pipeline`` (2 CLIP text     ``SD3Transformer2DModel`` (flow
          encoders with projection, no T5)              matching), ``FlowMatchEulerDiscrete...``
========  ============================================  =========================================

Both use the same kind of tiny ``AutoencoderKL`` (1x32x32 pixels <-> 4x8x8 latents) and frozen,
seeded random CLIP text encoders with an in-memory 8-token vocabulary. The prompts are
``PROMPTS`` ("a handwritten digit 0" .. "a handwritten digit 9"); other text tokenizes to
letters the models never saw and gives arbitrary digits.

Usage::

    from hybridiff_rt.demo.bundled import DEFAULTS, PROMPTS, load_classifier, load_pipeline
    pipe = load_pipeline("unet")                      # StableDiffusionXLPipeline, fp32, CPU
    out = pipe(prompt=list(PROMPTS), **DEFAULTS["unet"],
               generator=[torch.Generator().manual_seed(i) for i in range(10)])
    out.images                                        # 10 PIL "L" images, 32 x 32
    clf = load_classifier()                           # judge: clf.predict(x in [-1,1]) -> labels

Weights are fp16 safetensors in diffusers folder layout under ``weights/``; they are upcast to
the requested dtype on load. Training: ``python -m hybridiff_rt.demo.bundled.train --model all``;
measurements: ``python -m hybridiff_rt.demo.measure`` (see README.md in this folder).
This package never imports the runtime (``hybridiff_rt.engine``, ``hybridiff_rt.comm``,
``hybridiff_rt.pipeline_adapter``); an import-linter contract in pyproject.toml checks it.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

MODELS = ("unet", "sd3")
"""Names accepted by :func:`load_pipeline`."""

_FOLDERS = {"unet": "sdxl_digits", "sd3": "sd3_digits"}
_ALIASES = {"sdxl": "unet", "sd3": "sd3", "unet": "unet"}

PROMPTS: tuple[str, ...] = tuple(f"a handwritten digit {d}" for d in range(10))
"""The ten prompts the models were trained on; ``PROMPTS[d]`` asks for digit ``d``."""

LABELS: tuple[int, ...] = tuple(range(10))
"""``LABELS[i]`` is the digit that ``PROMPTS[i]`` asks for."""

DEFAULTS: dict[str, dict] = {
    "unet": dict(height=32, width=32, num_inference_steps=50, guidance_scale=5.0),
    "sd3": dict(height=32, width=32, num_inference_steps=50, guidance_scale=5.0,
                max_sequence_length=8),
}
"""Recommended keyword arguments for each pipeline call (pixels, steps, CFG scale w).

``max_sequence_length`` (sd3 only) is the number of all-zero "T5" context tokens the SD3
pipeline appends when it has no T5 encoder; the model was trained to give the same result for any
count 1..512, and 8 is much faster on a CPU than the pipeline's default 256.
"""


def _canonical(name: str) -> str:
    try:
        return _ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {MODELS}") from None


def weights_path(name: str) -> Path:
    """Folder of the diffusers pipeline ``name`` ("unet" | "sd3"); also accepts "sdxl"."""
    return WEIGHTS_DIR / _FOLDERS[_canonical(name)]


def load_pipeline(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  progress_bar: bool = False):
    """Load bundled model ``name`` as its stock diffusers pipeline, offline.

    name: "unet" (-> ``StableDiffusionXLPipeline``) or "sd3" (-> ``StableDiffusion3Pipeline``).
    dtype: parameter dtype (the files are fp16; float32 is the default and what the numbers in
    README.md were measured with). Only local files are read (``local_files_only=True``), so this
    works with ``HF_HUB_OFFLINE=1`` and no network. The progress bar is off unless asked for.
    """
    name = _canonical(name)
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    folder = weights_path(name)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"bundled pipeline {name!r} not found at {folder}; train it with "
            f"`python -m hybridiff_rt.demo.bundled.train --model all`")
    kw = dict(dtype=dtype, local_files_only=True, low_cpu_mem_usage=False)
    if name == "unet":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False, **kw)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
                                                        tokenizer_3=None, **kw)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)


def load_classifier(device: str | torch.device = "cpu"):
    """The bundled :class:`~.classifier.DigitClassifier` (float32, eval mode, no grad).

    Input ``[B, 1|3, H, W]`` in [-1, 1]; ``.predict(x)`` -> labels ``[B]``, ``.features(x)`` ->
    ``[B, 64]``. Held-out accuracy on the real digits: see README.md (about 99%).
    """
    from .classifier import DigitClassifier

    return DigitClassifier.from_folder(WEIGHTS_DIR / "classifier").to(device)


__all__ = ["DEFAULTS", "LABELS", "MODELS", "PROMPTS", "WEIGHTS_DIR", "load_classifier",
           "load_pipeline", "weights_path"]
