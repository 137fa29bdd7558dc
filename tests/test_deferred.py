"""The deferred prediction of the two-call protocol (hybridiff_rt.deferred): what a loop computes
on a prediction before it exists is recorded and replayed at the fill, equal bit for bit to the
same computation on the real prediction; what cannot be replayed exactly is an error.

The two-rank runs of the pipelines whose loops compute on the first call's result (Cosmos 2:
an x0 estimate; Motif-Video: a clone) are in tests/test_dit_pipelines.py.
"""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch

from hybridiff_rt.deferred import DeferredPrediction
from hybridiff_rt.errors import HybridError

OWNER = "SomePipeline"


@pytest.fixture
def seed():
    return random.randrange(1 << 16)


def _inputs(seed, channels=4):
    gen = torch.Generator().manual_seed(seed)
    shape = (random.Random(seed).choice([1, 2]), channels, 2, 4, 4)
    latents = torch.randn(shape, generator=gen)
    prediction = torch.randn(shape, generator=gen).to(torch.bfloat16)
    sigma = torch.rand((), generator=gen, dtype=torch.float64)
    return latents, prediction, sigma


def _loop(prediction, latents, sigma):
    """What loops do with a prediction: Cosmos 2's x0 estimate (float64 scalars, a float32
    sample, a bf16 prediction), a clone changed in place, a reduction, a slice, a join with an
    ordinary tensor, a cast to the dtype it already has (the same tensor)."""
    c_skip, c_out = 1 - sigma, -sigma
    x0 = (c_skip * latents + c_out * prediction.float()).to(torch.bfloat16)
    doubled = x0.clone()
    doubled.mul_(2)
    same = x0.to(torch.bfloat16)
    return (x0, doubled, doubled.sum(), x0[:, :2], torch.cat([x0.float(), latents]), same,
            prediction)


def test_what_the_loop_computed_before_the_fill_equals_the_eager_computation(seed):
    latents, prediction, sigma = _inputs(seed)
    expected = _loop(prediction, latents, sigma)
    deferred = DeferredPrediction.make(latents.shape, torch.bfloat16, latents.device, OWNER)
    assert deferred.dtype == torch.bfloat16 and deferred.device == latents.device  # known
    got = _loop(deferred, latents, sigma)
    assert all(type(t) is DeferredPrediction and not t.is_filled for t in got)
    assert got[5] is got[0]  # the cast to its own dtype returned the same tensor, as eagerly
    # what was recorded: only the operations that take the prediction or what came of it
    assert deferred.fill(prediction) == ["float", "mul", "add", "to", "clone", "mul_", "to",
                                         "sum", "__getitem__", "float", "cat"]
    for name, want, have in zip(("x0", "doubled", "sum", "slice", "cat", "same", "prediction"),
                                expected, got):
        assert have.is_filled and have.shape == want.shape and have.dtype == want.dtype, name
        assert torch.equal(have, want), f"{name} (seed {seed})"
    # filled: ordinary tensors from here on, and the operations return ordinary tensors
    assert type(got[0] * 2) is torch.Tensor and torch.equal(got[0] * 2, expected[0] * 2)
    assert got[0].shape == expected[0].shape and got[0].data_ptr() != 0
    # a callback may keep a copy, or save it
    kept = copy.deepcopy(got[1])
    assert type(kept) is torch.Tensor and torch.equal(kept, expected[1])
    assert kept.data_ptr() != got[1].data_ptr()
    buffer = io.BytesIO()
    torch.save(got[0], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only: an ordinary tensor was saved
    assert type(loaded) is torch.Tensor and torch.equal(loaded, expected[0])


def test_a_prediction_of_another_shape_than_the_sample_replays_exactly(seed):
    """The stand-in has the sample's shape; a denoiser predicting fewer channels (the sample
    carries conditioning channels) still gets exactly what the loop computes on it."""
    latents, _, _ = _inputs(seed, channels=9)
    prediction = torch.randn(latents.shape[0], 4, *latents.shape[2:])
    deferred = DeferredPrediction.make(latents.shape, torch.float32, latents.device, OWNER)
    kept, head = deferred.clone(), deferred[:, :2]
    deferred.fill(prediction)
    assert torch.equal(kept, prediction) and torch.equal(head, prediction[:, :2])
    assert kept.shape == prediction.shape and kept.data_ptr() != prediction.data_ptr()


@pytest.mark.parametrize("read", ["shape", "size", "item", "bool", "format", "len", "iterate",
                                  "numpy", "equal"])
def test_reading_a_value_or_shape_before_the_fill_is_an_error(seed, read):
    latents, _, _ = _inputs(seed)
    deferred = DeferredPrediction.make(latents.shape, torch.float32, latents.device, OWNER)
    derived = (deferred * 2).sum()
    reads = {"shape": lambda: deferred.shape, "size": lambda: deferred.size(1),
             "item": lambda: derived.item(), "bool": lambda: bool(derived > 0),
             "format": lambda: f"{derived:.3f}", "len": lambda: len(deferred),
             "iterate": lambda: list(deferred), "numpy": lambda: deferred.numpy(),
             "equal": lambda: torch.equal(deferred, latents)}
    with pytest.raises(HybridError, match=f"^{OWNER}'s loop .*before its second denoiser call"):
        reads[read]()
    with pytest.raises(HybridError, match=r"copies the first call's prediction \(`deepcopy`\)"):
        copy.deepcopy(derived)
    # printing it (a debugger, an error message) says what it is
    assert repr(derived) == str(deferred) == (
        f"<deferred prediction of {OWNER}: computed at the step's second denoiser call>")


@pytest.mark.parametrize("write", ["in-place on an ordinary tensor", "out=", "setitem"])
def test_writing_it_into_another_tensor_before_the_fill_is_an_error(seed, write):
    latents, _, _ = _inputs(seed)
    deferred = DeferredPrediction.make(latents.shape, torch.float32, latents.device, OWNER)
    target = latents.clone()
    writes = {"in-place on an ordinary tensor": lambda: target.add_(deferred),
              "out=": lambda: torch.add(latents, deferred, out=target),
              "setitem": lambda: deferred.__setitem__(0, 1.0)}
    with pytest.raises(HybridError, match="writes the first call's prediction into a tensor"):
        writes[write]()
    assert torch.equal(target, latents)


def test_an_input_changed_in_place_before_the_fill_is_an_error(seed):
    latents, prediction, _ = _inputs(seed)
    deferred = DeferredPrediction.make(latents.shape, torch.bfloat16, latents.device, OWNER)
    sample = latents.clone()
    mixed = deferred.float() + sample
    sample.mul_(2)  # the eager sum would have read the old values
    with pytest.raises(HybridError, match="changed in place a tensor that `add`"):
        deferred.fill(prediction)
    assert deferred.is_filled and not mixed.data_ptr()  # nothing half-made passes for a value


def test_a_fill_of_another_dtype_and_a_second_fill_are_errors(seed):
    latents, prediction, _ = _inputs(seed)
    deferred = DeferredPrediction.make(latents.shape, torch.float32, latents.device, OWNER)
    with pytest.raises(HybridError, match="torch.bfloat16 prediction on cpu cannot fill a "
                                          "deferred torch.float32 one"):
        deferred.fill(prediction)
    deferred.fill(prediction.float())
    with pytest.raises(HybridError, match="already filled"):
        deferred.fill(prediction.float())
    assert torch.equal(deferred, prediction.float())
