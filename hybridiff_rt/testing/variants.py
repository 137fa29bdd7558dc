"""Every diffusers pipeline variant of the supported families, tiny, random-init and offline.

Each builder in :data:`VARIANTS` takes a ``seed`` and returns ``(pipe, call_kwargs)``: ``pipe`` is a
stock diffusers pipeline made of the tiny components of :func:`~.pipelines.sdxl_pipeline`,
:func:`~.pipelines.sd_pipeline` or :func:`~.pipelines.sd3_pipeline` (plus a tiny ControlNet,
T2I-Adapter, IP-Adapter or another scheduler where the variant needs one), and ``call_kwargs`` holds the inputs
that variant needs besides prompt / steps / guidance / generator / output type (images, masks,
strength, ...). The same seed gives the same weights and inputs in every process, so a test can
build a variant on every rank and compare::

    pipe, kwargs = build_variant("sdxl-pag", seed=0)
    out = pipe(prompt="a red fox", negative_prompt="blur", num_inference_steps=4,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
               output_type="latent", **kwargs)

:data:`INFO` records per variant its family, which attribute holds the denoiser, and what the
table below measured (:func:`count_denoiser_calls` measures it). ControlNets and the SD3 ControlNet
get their zero-initialised output projections re-drawn small and random (seeded), so that the
control branch really changes the result (at diffusers' zero init it would add exactly nothing).

Denoiser forward calls per pipeline call, with ``num_inference_steps=4``, ``guidance_scale=5.0``
(classifier-free guidance on), measured with a forward pre-hook on ``pipe.unet`` /
``pipe.transformer``; "batch per call" is the leading dimension of the latents each call gets, with
``num_images_per_prompt`` 1 / 2; ``_num_timesteps`` is what the pipeline sets ("-" where it does not
set it):

============================== ============== ======================= ===============
variant                        denoiser calls batch per call (1 / 2)  _num_timesteps
                               for 4 steps    images
============================== ============== ======================= ===============
sd                             4              2 / 4                   4
sd-img2img  (strength 0.5)     2              2 / 4                   2
sd-inpaint  (strength 0.75)    3              2 / 4                   3
sd-controlnet                  4              2 / 4                   4
sdxl                           4              2 / 4                   4
sdxl-img2img  (strength 0.5)   2              2 / 4                   2
sdxl-inpaint  (strength 0.75)  3              2 / 4                   3
sdxl-controlnet                4              2 / 4                   4
sdxl-t2i-adapter               4              2 / 4                   - (not set)
sdxl-pag  (pag_scale 3)        4              3 / 6                   4
sdxl-ip-adapter                4              2 / 4                   4
sdxl-heun                      7              2 / 4                   7
sdxl-denoising-end  (0.6)      2              2 / 4                   2
sdxl-img2img-denoising-start   3              2 / 4                   3
sd3                            4              2 / 4                   4
sd3-img2img  (strength 0.5)    2              2 / 4                   2
sd3-inpaint  (strength 0.75)   3              2 / 4                   3
sd3-controlnet                 4              2 / 4                   4
sd3-skip-layer-guidance        6              2,2,1,2,1,2 / 4,4,2,... 4
sd3-ip-adapter                 4              2 / 4                   4
============================== ============== ======================= ===============

Notes for a runtime that splits the denoiser across ranks:

* PAG runs one call per step on ``[uncond; cond; perturbed]`` = 3B rows; for the perturbed third
  the ``mid`` block's self-attention uses an identity attention map (the pipeline swaps PAG
  attention processors into the U-Net for the duration of the call).
* Heun is second order: ``_num_timesteps`` = 2 * steps - 1 = 7 calls for 4 steps, and the
  scheduler's state alternates between the two half steps, so every call must run.
* Skip-layer guidance adds, on the steps with ``start * steps < i < stop * steps`` (here i = 1, 2),
  a second call on the conditional half only (batch B, not 2B) with ``skip_layers=[1]`` in the
  transformer's kwargs, so calls != ``_num_timesteps`` and batches alternate.
* img2img / inpaint with ``strength`` s run ``int(steps * s)`` calls; ``denoising_start`` /
  ``denoising_end`` cut the timestep list at a training timestep instead: of the 4 leading
  timesteps 751, 501, 251, 1, ``denoising_end=0.6`` keeps those >= 400 (2 calls) and
  ``denoising_start=0.4`` those < 600 (3 calls; ``strength`` is then ignored).
* ``sdxl-denoising-end`` is the base half of a base + refiner run, meant to be called with
  ``output_type="latent"`` (``INFO[name].output_type``); its ``call_kwargs`` do not hold the output
  type so that callers can pass their own.
* The T2I-Adapter pipeline does not set ``_num_timesteps``; it calls the U-Net once per step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .ip_adapters import add_ip_adapter
from .pipelines import (
    DEFAULT_IMAGE_SIZE,
    SDXL_BETAS,
    sd3_pipeline,
    sd_pipeline,
    sdxl_pipeline,
    seeded,
    unzero,
)

Builder = Callable[..., "tuple[Any, dict[str, Any]]"]


@dataclass(frozen=True)
class VariantInfo:
    """Facts about one variant.

    Attributes:
        family: "sd", "sdxl" or "sd3".
        denoiser_attr: the pipeline attribute holding the denoiser ("unet" or "transformer").
        pipeline_class: the diffusers pipeline class name.
        calls_4_steps: denoiser forward calls per pipeline call with 4 inference steps.
        batches_1_image: batch size of each of those calls with one image per prompt (CFG on).
        sets_num_timesteps: whether the pipeline sets ``_num_timesteps``.
        calls_per_step: a note where a step is not one call on [uncond; cond].
        output_type: the ``output_type`` the variant is meant to be called with, where it matters
            (None: any).
    """

    family: str
    denoiser_attr: str
    pipeline_class: str
    calls_4_steps: int
    batches_1_image: tuple[int, ...]
    sets_num_timesteps: bool = True
    calls_per_step: str = ""
    output_type: str | None = None


# ---------------------------------------------------------------------------------------------
# deterministic inputs

def _image(seed: int, size: int = DEFAULT_IMAGE_SIZE):
    """An RGB PIL image: a smooth colour ramp plus seeded noise, values in [0, 255]."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.0, 1.0, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        (ramp[None, :] * ramp[:, None])])
    img = (0.7 * base + 0.3 * torch.rand(3, size, size, generator=gen)).clamp(0, 1)
    array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


def _mask(seed: int, size: int = DEFAULT_IMAGE_SIZE):
    """An "L" PIL mask: white (repaint) on a square of half the side, placed by the seed."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    side = size // 2
    top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[top:top + side, left:left + side] = 255
    return Image.fromarray(mask.numpy(), mode="L")


# ---------------------------------------------------------------------------------------------
# building blocks

def _derive(cls, base, **extra: Any):
    """``cls`` built from ``base``'s components (those its constructor takes), its pipeline
    config flags, and ``extra`` (new or replaced components and flags)."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in base.components.items() if k in params}
    for flag in ("force_zeros_for_empty_prompt", "requires_safety_checker"):
        if flag in params and flag in base.config:
            kwargs[flag] = base.config[flag]
    kwargs.update(extra)
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _make_controlnet(unet, seed: int):
    from diffusers import ControlNetModel

    # One stride-2 step in the conditioning embedding: 32 px images -> 16 x 16 latents.
    with seeded(seed):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    return unzero(net, seed + 1)


def _make_sd3_controlnet(transformer, seed: int):
    from diffusers import SD3ControlNetModel

    with seeded(seed):
        net = SD3ControlNetModel.from_transformer(transformer, num_layers=1,
                                                  num_extra_conditioning_channels=0)
    return unzero(net, seed + 1)


def _make_t2i_adapter(unet, seed: int):
    from diffusers import T2IAdapter

    # "full_adapter_xl" (as diffusers' SDXL adapter tests): one feature per U-Net down block at
    # that block's output resolution. With downscale 4 a 32 px image gives features at 8 x 8, the
    # size of the tiny SDXL U-Net's down-block outputs (16 x 16 latents, one downsample).
    widths = list(unet.config.block_out_channels)
    with seeded(seed):
        return T2IAdapter(in_channels=3, channels=widths, num_res_blocks=1, downscale_factor=4,
                          adapter_type="full_adapter_xl")


# ---------------------------------------------------------------------------------------------
# SD 1.5-shaped

def _sd(seed: int = 0):
    return sd_pipeline(seed=seed), {}


def _sd_img2img(seed: int = 0):
    from diffusers import StableDiffusionImg2ImgPipeline

    return (_derive(StableDiffusionImg2ImgPipeline, sd_pipeline(seed=seed)),
            {"image": _image(seed), "strength": 0.5})


def _sd_inpaint(seed: int = 0):
    from diffusers import StableDiffusionInpaintPipeline

    # 4-channel U-Net: the pipeline's "legacy" inpainting (re-noised original outside the mask).
    return (_derive(StableDiffusionInpaintPipeline, sd_pipeline(seed=seed)),
            {"image": _image(seed), "mask_image": _mask(seed), "strength": 0.75})


def _sd_controlnet(seed: int = 0):
    from diffusers import StableDiffusionControlNetPipeline

    base = sd_pipeline(seed=seed)
    pipe = _derive(StableDiffusionControlNetPipeline, base,
                   controlnet=_make_controlnet(base.unet, seed))
    return pipe, {"image": _image(seed + 1)}


# ---------------------------------------------------------------------------------------------
# SDXL-shaped

def _sdxl(seed: int = 0):
    return sdxl_pipeline(seed=seed), {}


def _sdxl_img2img(seed: int = 0):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return (_derive(StableDiffusionXLImg2ImgPipeline, sdxl_pipeline(seed=seed)),
            {"image": _image(seed), "strength": 0.5})


def _sdxl_inpaint(seed: int = 0):
    from diffusers import StableDiffusionXLInpaintPipeline

    return (_derive(StableDiffusionXLInpaintPipeline, sdxl_pipeline(seed=seed)),
            {"image": _image(seed), "mask_image": _mask(seed), "strength": 0.75})


def _sdxl_controlnet(seed: int = 0):
    from diffusers import StableDiffusionXLControlNetPipeline

    base = sdxl_pipeline(seed=seed)
    pipe = _derive(StableDiffusionXLControlNetPipeline, base,
                   controlnet=_make_controlnet(base.unet, seed))
    return pipe, {"image": _image(seed + 1)}


def _sdxl_t2i_adapter(seed: int = 0):
    from diffusers import StableDiffusionXLAdapterPipeline

    base = sdxl_pipeline(seed=seed)
    pipe = _derive(StableDiffusionXLAdapterPipeline, base,
                   adapter=_make_t2i_adapter(base.unet, seed))
    return pipe, {"image": _image(seed + 1), "height": DEFAULT_IMAGE_SIZE,
                  "width": DEFAULT_IMAGE_SIZE}


def _sdxl_pag(seed: int = 0):
    from diffusers import StableDiffusionXLPAGPipeline

    pipe = _derive(StableDiffusionXLPAGPipeline, sdxl_pipeline(seed=seed),
                   pag_applied_layers=["mid"])
    return pipe, {"pag_scale": 3.0}


def _sdxl_ip_adapter(seed: int = 0):
    # precomputed image embeddings, [negative; positive] stacked as the pipeline expects them
    # with classifier-free guidance (an image encoder would produce them from an image)
    pipe = sdxl_pipeline(seed=seed)
    add_ip_adapter(pipe.unet, seed + 1)
    with seeded(seed + 2):
        embeds = torch.randn(2, 1, 16)
    return pipe, {"ip_adapter_image_embeds": [embeds]}


def _sdxl_heun(seed: int = 0):
    from diffusers import HeunDiscreteScheduler

    scheduler = HeunDiscreteScheduler(**SDXL_BETAS, timestep_spacing="leading", steps_offset=1)
    base = sdxl_pipeline(seed=seed)
    return _derive(type(base), base, scheduler=scheduler), {}


def _sdxl_denoising_end(seed: int = 0):
    # The base half of a base + refiner run: meant for output_type="latent" (still noisy latents
    # for the refiner; INFO records it), though decoding them works too.
    return sdxl_pipeline(seed=seed), {"denoising_end": 0.6}


def _sdxl_img2img_denoising_start(seed: int = 0):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return (_derive(StableDiffusionXLImg2ImgPipeline, sdxl_pipeline(seed=seed)),
            {"image": _image(seed), "denoising_start": 0.4})


# ---------------------------------------------------------------------------------------------
# SD3-shaped

def _sd3(seed: int = 0):
    return sd3_pipeline(seed=seed), {}


def _sd3_img2img(seed: int = 0):
    from diffusers import StableDiffusion3Img2ImgPipeline

    return (_derive(StableDiffusion3Img2ImgPipeline, sd3_pipeline(seed=seed)),
            {"image": _image(seed), "strength": 0.5})


def _sd3_inpaint(seed: int = 0):
    from diffusers import StableDiffusion3InpaintPipeline

    return (_derive(StableDiffusion3InpaintPipeline, sd3_pipeline(seed=seed)),
            {"image": _image(seed), "mask_image": _mask(seed), "strength": 0.75})


def _sd3_controlnet(seed: int = 0):
    from diffusers import StableDiffusion3ControlNetPipeline

    base = sd3_pipeline(seed=seed)
    pipe = _derive(StableDiffusion3ControlNetPipeline, base,
                   controlnet=_make_sd3_controlnet(base.transformer, seed))
    return pipe, {"control_image": _image(seed + 1)}


def _sd3_skip_layer_guidance(seed: int = 0):
    # Steps i with 4 * 0.2 < i < 4 * 0.6, i.e. i = 1 and 2 of 4, get an extra call.
    return sd3_pipeline(seed=seed), {"skip_guidance_layers": [1],
                                     "skip_layer_guidance_start": 0.2,
                                     "skip_layer_guidance_stop": 0.6}


def _sd3_ip_adapter(seed: int = 0):
    # one tensor of image features, [negative; positive] stacked (SD3's pipeline chunks it in two)
    pipe = sd3_pipeline(seed=seed)
    add_ip_adapter(pipe.transformer, seed + 1)
    with seeded(seed + 2):
        embeds = torch.randn(2, 3, 16)
    return pipe, {"ip_adapter_image_embeds": embeds}


#: name -> builder ``fn(seed=0) -> (pipe, call_kwargs)``, in a stable order.
VARIANTS: OrderedDict[str, Builder] = OrderedDict([
    ("sd", _sd),
    ("sd-img2img", _sd_img2img),
    ("sd-inpaint", _sd_inpaint),
    ("sd-controlnet", _sd_controlnet),
    ("sdxl", _sdxl),
    ("sdxl-img2img", _sdxl_img2img),
    ("sdxl-inpaint", _sdxl_inpaint),
    ("sdxl-controlnet", _sdxl_controlnet),
    ("sdxl-t2i-adapter", _sdxl_t2i_adapter),
    ("sdxl-pag", _sdxl_pag),
    ("sdxl-ip-adapter", _sdxl_ip_adapter),
    ("sdxl-heun", _sdxl_heun),
    ("sdxl-denoising-end", _sdxl_denoising_end),
    ("sdxl-img2img-denoising-start", _sdxl_img2img_denoising_start),
    ("sd3", _sd3),
    ("sd3-img2img", _sd3_img2img),
    ("sd3-inpaint", _sd3_inpaint),
    ("sd3-controlnet", _sd3_controlnet),
    ("sd3-skip-layer-guidance", _sd3_skip_layer_guidance),
    ("sd3-ip-adapter", _sd3_ip_adapter),
])


def _info(family: str, cls: str, calls: int, batches: tuple[int, ...] | None = None,
          **kw: Any) -> VariantInfo:
    return VariantInfo(family=family, denoiser_attr="transformer" if family == "sd3" else "unet",
                       pipeline_class=cls, calls_4_steps=calls,
                       batches_1_image=batches if batches is not None else (2,) * calls, **kw)


#: name -> :class:`VariantInfo` (the table in this module's docstring, as data).
INFO: dict[str, VariantInfo] = {
    "sd": _info("sd", "StableDiffusionPipeline", 4),
    "sd-img2img": _info("sd", "StableDiffusionImg2ImgPipeline", 2),
    "sd-inpaint": _info("sd", "StableDiffusionInpaintPipeline", 3),
    "sd-controlnet": _info("sd", "StableDiffusionControlNetPipeline", 4),
    "sdxl": _info("sdxl", "StableDiffusionXLPipeline", 4),
    "sdxl-img2img": _info("sdxl", "StableDiffusionXLImg2ImgPipeline", 2),
    "sdxl-inpaint": _info("sdxl", "StableDiffusionXLInpaintPipeline", 3),
    "sdxl-controlnet": _info("sdxl", "StableDiffusionXLControlNetPipeline", 4),
    "sdxl-t2i-adapter": _info("sdxl", "StableDiffusionXLAdapterPipeline", 4,
                              sets_num_timesteps=False),
    "sdxl-pag": _info("sdxl", "StableDiffusionXLPAGPipeline", 4, (3,) * 4,
                      calls_per_step="one call on [uncond; cond; perturbed] = 3B rows"),
    "sdxl-ip-adapter": _info("sdxl", "StableDiffusionXLPipeline", 4),
    "sdxl-heun": _info("sdxl", "StableDiffusionXLPipeline", 7,
                       calls_per_step="second order: 2 * steps - 1 calls"),
    "sdxl-denoising-end": _info("sdxl", "StableDiffusionXLPipeline", 2, output_type="latent"),
    "sdxl-img2img-denoising-start": _info("sdxl", "StableDiffusionXLImg2ImgPipeline", 3),
    "sd3": _info("sd3", "StableDiffusion3Pipeline", 4),
    "sd3-img2img": _info("sd3", "StableDiffusion3Img2ImgPipeline", 2),
    "sd3-inpaint": _info("sd3", "StableDiffusion3InpaintPipeline", 3),
    "sd3-controlnet": _info("sd3", "StableDiffusion3ControlNetPipeline", 4),
    "sd3-skip-layer-guidance": _info(
        "sd3", "StableDiffusion3Pipeline", 6, (2, 2, 1, 2, 1, 2),
        calls_per_step="steps 1 and 2 add a cond-only call (batch B) with skip_layers=[1]"),
    "sd3-ip-adapter": _info("sd3", "StableDiffusion3Pipeline", 4),
}


def build_variant(name: str, seed: int = 0):
    """Build variant ``name``: ``(pipe, call_kwargs)``, same seed -> same weights and inputs."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    return VARIANTS[name](seed=seed)


def denoiser(pipe, name: str | None = None) -> torch.nn.Module:
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer``."""
    if name is not None:
        return getattr(pipe, INFO[name].denoiser_attr)
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


@dataclass
class DenoiserCalls:
    """What :func:`count_denoiser_calls` saw: the batch size of each forward call, in order."""

    batches: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.batches)


@contextlib.contextmanager
def count_denoiser_calls(pipe) -> Iterator[DenoiserCalls]:
    """Within the block, record every forward call of the pipeline's denoiser and the leading
    dimension of the latents it gets (``sample`` / ``hidden_states``)."""
    seen = DenoiserCalls()

    def hook(module, args, kwargs):
        latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        seen.batches.append(int(latents.shape[0]))

    handle = denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
