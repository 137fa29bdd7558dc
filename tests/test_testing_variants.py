"""hybridiff_rt.testing.variants: every tiny pipeline variant builds offline, deterministically,
runs end to end, and calls its denoiser exactly as the module's table (INFO) says."""

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import variants as V
from hybridiff_rt.testing.variants import INFO, VARIANTS, build_variant, count_denoiser_calls

NAMES = list(VARIANTS)
STEPS = 4


def _call(pipe, kwargs, name, images=1):
    with count_denoiser_calls(pipe) as seen:
        out = pipe(prompt="a red fox", negative_prompt="blur", num_inference_steps=STEPS,
                   guidance_scale=5.0, num_images_per_prompt=images,
                   generator=torch.Generator().manual_seed(0),
                   output_type=INFO[name].output_type or "np", **kwargs)
    return out.images, seen


def _weights(pipe):
    return {(component, key): value
            for component, module in pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def _same(a, b) -> bool:
    """Equal call arguments: tensors element for element, PIL images pixel for pixel, lists
    item for item."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "tobytes"):
        return a.tobytes() == b.tobytes()
    return a == b


def test_names_and_info_agree():
    assert NAMES == [
        "sd", "sd-img2img", "sd-inpaint", "sd-controlnet", "sdxl", "sdxl-img2img", "sdxl-inpaint",
        "sdxl-controlnet", "sdxl-t2i-adapter", "sdxl-pag", "sdxl-ip-adapter", "sdxl-heun",
        "sdxl-denoising-end",
        "sdxl-img2img-denoising-start", "sd3", "sd3-img2img", "sd3-inpaint", "sd3-controlnet",
        "sd3-skip-layer-guidance", "sd3-ip-adapter"]
    assert set(INFO) == set(VARIANTS)
    table = V.__doc__
    for name, info in INFO.items():
        assert info.family in ("sd", "sdxl", "sd3")
        assert info.denoiser_attr == ("transformer" if info.family == "sd3" else "unet")
        assert len(info.batches_1_image) == info.calls_4_steps
        assert any(line.startswith(name + " ") and f" {info.calls_4_steps} " in line
                   for line in table.splitlines()), name


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="unknown variant 'sdxl-nope'.*sd3-controlnet"):
        build_variant("sdxl-nope")


@pytest.mark.parametrize("name", NAMES)
def test_variant_builds_deterministically_and_runs(name):
    info = INFO[name]
    pipe, kwargs = build_variant(name, seed=3)
    again, kwargs_again = build_variant(name, seed=3)
    assert type(pipe).__name__ == info.pipeline_class
    assert getattr(pipe, info.denoiser_attr) is V.denoiser(pipe)

    a, b = _weights(pipe), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "same seed must give the same weights"
    assert kwargs.keys() == kwargs_again.keys()
    for key, value in kwargs.items():
        assert _same(value, kwargs_again[key]), key

    pipe._num_timesteps = None
    images, seen = _call(pipe, kwargs, name)
    images = np.asarray(images if not torch.is_tensor(images) else images.numpy())
    assert images.shape[0] == 1 and np.isfinite(images).all()

    assert seen.calls == info.calls_4_steps
    assert tuple(seen.batches) == info.batches_1_image
    if not info.sets_num_timesteps:
        assert pipe._num_timesteps is None
    elif name == "sd3-skip-layer-guidance":
        # One call per timestep on [uncond; cond], plus a cond-only call on steps 1 and 2.
        assert pipe._num_timesteps == STEPS
        assert seen.batches.count(2) == pipe._num_timesteps and seen.batches.count(1) == 2
    else:
        assert seen.calls == pipe._num_timesteps


@pytest.mark.parametrize("name", ["sd-inpaint", "sdxl-pag", "sdxl-heun", "sd3-controlnet",
                                  "sd3-skip-layer-guidance"])
def test_two_images_per_prompt_double_every_batch(name):
    pipe, kwargs = build_variant(name)
    images, seen = _call(pipe, kwargs, name, images=2)
    assert len(images) == 2
    assert tuple(seen.batches) == tuple(2 * b for b in INFO[name].batches_1_image)


def test_seed_changes_weights_and_inputs():
    (p0, k0), (p1, k1) = build_variant("sdxl-controlnet", 0), build_variant("sdxl-controlnet", 1)
    assert not torch.equal(p0.controlnet.controlnet_mid_block.weight,
                           p1.controlnet.controlnet_mid_block.weight)
    assert k0["image"].tobytes() != k1["image"].tobytes()


def test_control_branches_are_not_zero():
    # Re-drawn zero convs: ControlNet residuals must change the result (scale 0 = the base run).
    pipe, kwargs = build_variant("sd-controlnet")
    outs = [pipe(prompt="a red fox", num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="latent",
                 controlnet_conditioning_scale=scale, **kwargs).images for scale in (0.0, 1.0)]
    assert not torch.allclose(outs[0], outs[1])


def test_add_ip_adapter_refuses_a_model_without_a_known_layout():
    from hybridiff_rt.testing import add_ip_adapter, dit_pipelines

    with pytest.raises(ValueError, match="no IP-Adapter layout for a PixArtTransformer2DModel; "
                                         "known: UNet2DConditionModel"):
        add_ip_adapter(dit_pipelines.pixart_transformer(), seed=0)
