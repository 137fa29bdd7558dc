"""hr.parallelize / ParallelPipeline / hr.last_report (pipeline_adapter.py) in a world of one.

This process has no torchrun variables, so every wrapper is a serial wrapper: its denoiser proxy
runs the pipeline's batch-2 call through a HybridDenoiser, which must give the plain pipeline's
output bit for bit. Checked here: output equality, restore(), the refusals (wrapping twice, the
denoiser called outside a call of the wrapper, last_report of other objects), attribute
pass-through (methods that return the pipeline return the wrapper), pipelines sharing one
denoiser, the return_dict forms of the proxy (UNet and SD3 output classes) and calls without
classifier-free guidance. The two-rank behaviour of the same wrapper is in test_cbp.py and
test_hybrid.py.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt import testing
from hybridiff_rt.ops import discrepancy_stats, rel_mae
from hybridiff_rt.testing import all_ok, run_ranks

STEPS = 3


def _call(pipe, seed, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    kw.setdefault("output_type", "latent")
    kw.setdefault("prompt", "a lamp on a desk")
    out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    return out.images.detach().numpy().copy()


@pytest.fixture
def seed():
    return random.randrange(1 << 16)


class _MinimalPipeline:
    """What parallelize needs of a pipeline: a denoiser attribute, ``scheduler.timesteps``,
    ``guidance_scale`` and ``do_classifier_free_guidance``. A call makes the given denoiser calls
    (``(args, kwargs)`` pairs) in order and returns their outputs."""

    def __init__(self, model, attribute: str, guidance_scale: float) -> None:
        setattr(self, attribute, model)
        self.attribute = attribute
        self.scheduler = types.SimpleNamespace(timesteps=list(range(2)))
        self.guidance_scale = guidance_scale
        self.do_classifier_free_guidance = guidance_scale > 1

    def __call__(self, calls):
        model = getattr(self, self.attribute)
        return [model(*args, **kwargs) for args, kwargs in calls]


def _doubled_inputs(family: str, seed: int):
    """A denoiser's inputs for the CFG-doubled batch [uncond; cond] (batch 1 per branch)."""
    g = torch.Generator().manual_seed(seed)
    if family == "unet":
        model = testing.sd_pipeline(seed=seed).unet
        x = torch.randn(1, 4, 16, 16, generator=g)
        args = (torch.cat([x, x]), torch.tensor(500))
        kwargs = {"encoder_hidden_states": torch.randn(2, 8, 32, generator=g)}
        return model, "unet", args, kwargs
    model = testing.sd3_pipeline(seed=seed).transformer
    x = torch.randn(1, 16, 16, 16, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(2, 12, 32, generator=g),
              "pooled_projections": torch.randn(2, 32, generator=g),
              "timestep": torch.tensor([700.0, 700.0])}
    return model, "transformer", (torch.cat([x, x]),), kwargs


# ----------------------------------------------------------------------------- serial wrapper
def _rank_serial_wrapper(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build("sd3", seed=seed)
    plain = _call(pipe, seed, prompt="a lamp", guidance_scale=5.0)
    wrapped = hr.parallelize(pipe, hr.HybridConfig(k=0))
    out = _call(wrapped, seed, prompt="a lamp", guidance_scale=5.0)
    return plain, out, hr.last_report(wrapped).to_dict()


def test_world_size_one_is_a_serial_wrapper_with_report():
    """Under torchrun with WORLD_SIZE=1 (a spawned rank)."""
    plain, out, report = all_ok(run_ranks(_rank_serial_wrapper, random.randrange(1 << 16),
                                          world_size=1), world_size=1)[0]
    assert np.array_equal(plain, out)
    assert report["modes"] == ["serial"] * STEPS and report["world_size"] == 1
    assert all(m is not None for m in report["rel_mae"])


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_wrapper_output_equals_the_plain_pipeline_and_each_call_gets_a_new_report(family, seed):
    pipe = testing.build(family, seed=seed)
    plain = _call(pipe, seed + 1, guidance_scale=4.0)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    first = _call(parallel, seed + 1, guidance_scale=4.0)
    report = hr.last_report(parallel)
    np.testing.assert_array_equal(first, plain, err_msg=f"seed {seed}")
    assert report is parallel.report and report.modes == ["serial"] * STEPS
    assert report.num_steps == STEPS and report.world_size == 1
    assert all(0 < m < float("inf") for m in report.rel_mae)
    second = _call(parallel, seed + 2, guidance_scale=4.0, num_inference_steps=STEPS + 1)
    assert hr.last_report(parallel) is not report, "the second call reused the first report"
    assert hr.last_report(parallel).modes == ["serial"] * (STEPS + 1)
    assert report.modes == ["serial"] * STEPS  # the first call's report is left as it was
    assert not np.array_equal(second, first)
    parallel.restore()


# ---------------------------------------------------------------------------------- restore()
def test_restore_gives_back_a_working_plain_pipeline_that_can_be_wrapped_again(seed):
    pipe = testing.build("sd", seed=seed)
    plain = _call(pipe, seed, guidance_scale=3.0)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    direct = {"sample": x, "timestep": torch.tensor(10),
              "encoder_hidden_states": torch.randn(1, 8, 32)}
    with pytest.raises(hr.HybridError):
        pipe.unet(**direct)  # the proxy is in place
    assert parallel.restore() is pipe
    with torch.no_grad():  # the plain denoiser answers direct calls again
        assert pipe.unet(**direct).sample.shape == x.shape
    np.testing.assert_array_equal(_call(pipe, seed, guidance_scale=3.0), plain)
    assert parallel.restore() is pipe  # a second restore changes nothing
    again = hr.parallelize(pipe, hr.HybridConfig(k=0))
    parallel.restore()  # restoring the old wrapper must not remove the new one's proxy
    with pytest.raises(hr.HybridError):
        pipe.unet(**direct)
    np.testing.assert_array_equal(_call(again, seed, guidance_scale=3.0), plain)
    assert hr.last_report(again).modes == ["serial"] * STEPS
    again.restore()


# ------------------------------------------------------------------------------------ refusals
def test_parallelizing_an_already_parallelized_pipeline_is_refused(seed):
    pipe = testing.build("sd", seed=seed)
    parallel = hr.parallelize(pipe)
    with pytest.raises(hr.HybridError, match="already parallelized"):
        hr.parallelize(pipe)
    with pytest.raises(hr.HybridError, match="already parallelized"):
        hr.parallelize(parallel)  # the wrapper passes .unet through: same denoiser
    parallel.restore()
    hr.parallelize(pipe).restore()  # accepted once restored


def test_denoiser_called_outside_a_call_of_the_wrapper_is_refused(seed):
    pipe = testing.build("sd", seed=seed)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    kw = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor(10),
          "encoder_hidden_states": torch.randn(2, 8, 32)}
    with pytest.raises(hr.HybridError, match="called outside a call"):
        pipe.unet(**kw)
    with pytest.raises(hr.HybridError, match="called outside a call"):
        pipe(prompt="a cup", num_inference_steps=2, height=32, width=32, output_type="latent")

    class Stop(Exception):
        pass

    def stop(p, i, t, tensors):
        if i == 1:
            raise Stop("the user stopped the run")
        return tensors

    with pytest.raises(Stop):
        _call(parallel, seed, guidance_scale=3.0, callback_on_step_end=stop)
    assert hr.last_report(parallel).modes == ["serial"] * 2  # the steps that did run
    with pytest.raises(hr.HybridError, match="called outside a call"):
        pipe.unet(**kw)  # an interrupted call does not leave the proxy open
    _call(parallel, seed, guidance_scale=3.0)  # and the wrapper still works
    assert hr.last_report(parallel).modes == ["serial"] * STEPS
    parallel.restore()


def test_pipeline_without_a_denoiser_is_refused():
    for pipe in (types.SimpleNamespace(), types.SimpleNamespace(unet=None, transformer=None)):
        with pytest.raises(hr.UnsupportedModelError, match=r"no \.unet or \.transformer"):
            hr.parallelize(pipe)
    model = torch.nn.Linear(2, 2)  # a bare model: the message names the custom-loop API
    with pytest.raises(hr.UnsupportedModelError, match=r"takes a diffusers pipeline, got the "
                                                       r"model Linear.*hr\.HybridDenoiser"):
        hr.parallelize(model)


def test_last_report_refuses_anything_but_a_wrapper_or_a_denoiser(seed):
    pipe = testing.build("sd", seed=seed)
    for other in (pipe, pipe.unet, None, "report"):
        with pytest.raises(TypeError, match=f"got {type(other).__name__}$"):
            hr.last_report(other)
    den = hr.HybridDenoiser(pipe.unet)
    assert hr.last_report(den) is den.report
    parallel = hr.parallelize(pipe)
    assert hr.last_report(parallel) is parallel.report is parallel.engine.report
    parallel.restore()


# ------------------------------------------------------------------------ attribute pass-through
def test_attribute_reads_and_writes_go_to_the_wrapped_pipeline(seed):
    pipe = testing.build("sd", seed=seed)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    assert parallel.pipe is pipe
    assert parallel.scheduler is pipe.scheduler and parallel.vae is pipe.vae
    parallel.guidance_marker = 12
    assert pipe.guidance_marker == 12 and "guidance_marker" not in vars(parallel)
    new_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    parallel.scheduler = new_scheduler
    assert pipe.scheduler is new_scheduler
    _call(parallel, seed, guidance_scale=6.5)
    assert parallel.guidance_scale == 6.5  # the pipeline's own per-call state, read through
    embeds = parallel.encode_prompt("a kite", "cpu", 1, False)[0]
    assert torch.equal(embeds, pipe.encode_prompt("a kite", "cpu", 1, False)[0])
    with pytest.raises(AttributeError):
        parallel.no_such_attribute  # noqa: B018
    assert repr(parallel) == "ParallelPipeline(StableDiffusionPipeline, rank=0/1)"
    parallel.restore()


def test_methods_that_return_the_pipeline_return_the_wrapper(seed):
    """``pipe = pipe.to(device)`` after parallelize keeps the parallelized pipeline."""
    pipe = testing.build("sd", seed=seed)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    moved = parallel.to("cpu")
    assert moved is parallel
    assert parallel.to(dtype=torch.float32) is parallel and pipe.unet.dtype == torch.float32
    assert parallel.to.__name__ == "to"  # still the pipeline's method, wrapped
    embeds = parallel.encode_prompt("a kite", "cpu", 1, False)  # other results pass unchanged
    assert isinstance(embeds, tuple) and torch.is_tensor(embeds[0])
    np.testing.assert_array_equal(_call(moved, seed, guidance_scale=3.0),
                                  _call(parallel, seed, guidance_scale=3.0))
    assert hr.last_report(moved).modes == ["serial"] * STEPS
    parallel.restore()


# ------------------------------------------------------------------- pipelines sharing a denoiser
def test_pipelines_sharing_a_denoiser_can_each_be_parallelized(seed):
    """diffusers' from_pipe and Pipeline(**pipe.components) share the U-Net between pipelines:
    each wrapper gets the denoiser calls of its own calls, in any order, with its own report,
    and the last restore() puts the model's own forward back."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = testing.build("sd", seed=seed)
    sibling = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert sibling.unet is pipe.unet
    picture = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    img2img = dict(image=picture, strength=0.5, num_inference_steps=4)
    plain = _call(pipe, seed, guidance_scale=3.0)
    plain_sibling = _call(sibling, seed, guidance_scale=3.0, **img2img)

    text = hr.parallelize(pipe, hr.HybridConfig(k=0))
    image = hr.parallelize(sibling, hr.HybridConfig(k=0))
    for _ in range(2):  # interleaved calls
        np.testing.assert_array_equal(_call(image, seed, guidance_scale=3.0, **img2img),
                                      plain_sibling)
        np.testing.assert_array_equal(_call(text, seed, guidance_scale=3.0), plain)
    assert hr.last_report(text).modes == ["serial"] * STEPS
    assert hr.last_report(image).modes == ["serial"] * 2  # strength 0.5 of 4 steps
    with pytest.raises(hr.HybridError, match="already parallelized"):
        hr.parallelize(sibling)  # the same pipeline twice is still refused
    with pytest.raises(hr.HybridError, match="called outside a call"):
        sibling(prompt="a cup", num_inference_steps=2, output_type="latent", **{
            k: v for k, v in img2img.items() if k != "num_inference_steps"})
    text.restore()  # the sibling's wrapper keeps working
    np.testing.assert_array_equal(_call(image, seed, guidance_scale=3.0, **img2img),
                                  plain_sibling)
    with pytest.raises(hr.HybridError, match="called outside a call"):
        _call(pipe, seed, guidance_scale=3.0)  # the unwrapped pipeline meets the proxy
    image.restore()
    assert "forward" not in vars(pipe.unet) and not hasattr(pipe.unet, "_hybridiff_rt_pipeline")
    np.testing.assert_array_equal(_call(pipe, seed, guidance_scale=3.0), plain)


def test_restore_puts_back_an_instance_level_forward(seed):
    """A forward set on the model instance (as offloading hooks do) is what the engine runs and
    what restore() leaves in place; inspect.signature of the proxy is the model's."""
    import functools
    import inspect

    pipe = testing.build("sd", seed=seed)
    calls = []
    original = pipe.unet.forward

    @functools.wraps(original)  # as accelerate's hooks wrap it
    def hooked(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pipe.unet.forward = hooked
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    assert "added_cond_kwargs" in inspect.signature(pipe.unet.forward).parameters
    _call(parallel, seed, guidance_scale=3.0)
    assert len(calls) == STEPS
    parallel.restore()
    assert pipe.unet.forward is hooked


# ------------------------------------------------------------------------- the forward proxy
@pytest.mark.parametrize("family,output_class", [("unet", "UNet2DConditionOutput"),
                                                 ("sd3", "Transformer2DModelOutput")])
def test_proxy_honours_return_dict_with_the_models_output_class(family, output_class, seed):
    model, attribute, args, kwargs = _doubled_inputs(family, seed)
    with torch.no_grad():
        expected = model(*args, **kwargs, return_dict=False)[0]
    pipe = _MinimalPipeline(model, attribute, guidance_scale=4.0)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    with torch.no_grad():
        as_dict, as_tuple = parallel([(args, kwargs), (args, dict(kwargs, return_dict=False))])
    assert type(as_dict).__name__ == output_class
    assert torch.equal(as_dict.sample, expected)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], expected)
    report = hr.last_report(parallel)
    assert report.modes == ["serial", "serial"] and report.num_steps == 2
    assert report.rel_mae == [rel_mae(discrepancy_stats(*expected.chunk(2)))] * 2
    parallel.restore()


def test_a_guided_call_with_an_odd_batch_is_refused_naming_both_causes(seed):
    """A guided denoiser call of 2B + 1 rows is no [uncond; cond] pair (a third branch, or one
    call per branch of a pipeline with an odd number of images): refused at its first call."""
    model, attribute, args, kwargs = _doubled_inputs("unet", seed)
    rows = random.choice([1, 3])
    sample = torch.cat([args[0][:1]] * rows)
    kwargs = {"encoder_hidden_states": torch.cat([kwargs["encoder_hidden_states"][:1]] * rows)}
    pipe = _MinimalPipeline(model, attribute, guidance_scale=4.0)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    with torch.no_grad(), pytest.raises(hr.UnsupportedModelError,
                                        match=f"has {rows} rows.*once per guidance branch"):
        parallel([((sample, args[1]), kwargs)])
    parallel.restore()


def test_call_without_guidance_runs_the_model_on_the_batch_as_given(seed):
    model, attribute, args, kwargs = _doubled_inputs("unet", seed)
    args = (args[0][:1], args[1])  # one sample, no [uncond; cond] doubling
    kwargs = {"encoder_hidden_states": kwargs["encoder_hidden_states"][1:]}
    with torch.no_grad():
        expected = model(*args, **kwargs).sample
    pipe = _MinimalPipeline(model, attribute, guidance_scale=1.0)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    with torch.no_grad():
        outs = parallel([(args, kwargs), (args, dict(kwargs, return_dict=False))])
    assert torch.equal(outs[0].sample, expected) and torch.equal(outs[1][0], expected)
    report = hr.last_report(parallel)
    assert report.modes == ["serial", "serial"] and report.num_steps == 2
    assert report.to_dict()["rel_mae"] == [None, None]
    assert len(report.notes) == 1 and "no classifier-free guidance" in report.notes[0]
    parallel.restore()
