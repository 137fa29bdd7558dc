"""The engine's pure helpers: splitting a CFG-doubled batch (engine/batch.py) and the first-step
agreement check between ranks (engine/agreement.py).

The agreement check runs here against an in-memory torch.distributed HashStore with the ranks
called one after another in this process: a rank that publishes first and finds nobody else
raises PeerTimeoutError; the rank that comes second finds the first one's digests and compares.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.distributed import HashStore

import hybridiff_rt as hr
from hybridiff_rt.engine.agreement import ADVICE, CALL_ADVICE, check_agreement, digest
from hybridiff_rt.engine.batch import describe_shapes, join_cfg_batch, split_cfg_batch, tensors_in
from hybridiff_rt.engine.branch_layout import batch_axes, split_branch_kwargs
from hybridiff_rt.engine.images import take_branch_rows, take_rows

#: how long the first-called rank waits for a peer that is never coming (seconds)
SHORT_WAIT_S = 0.2


def _seeded():
    return torch.Generator().manual_seed(random.randrange(1 << 30))


# ----------------------------------------------------------------------------------- batch.py
def test_split_cfg_batch_splits_only_batch_shaped_arguments():
    b = random.randint(1, 4)
    x = torch.randn(2 * b, 3, 5, 5)
    kw = {"sample": x, "timestep": torch.tensor(7), "t_vec": torch.arange(2 * b),
          "other": torch.randn(3, 2), "added": {"text_embeds": torch.randn(2 * b, 4)},
          "residuals": (torch.randn(2 * b, 2), torch.randn(2 * b, 3)), "scale": 1.5, "none": None}
    pairs = {k: split_cfg_batch(v, 2 * b) for k, v in kw.items()}
    uncond = {k: p[0] for k, p in pairs.items()}
    cond = {k: p[1] for k, p in pairs.items()}
    assert torch.equal(join_cfg_batch(uncond["sample"], cond["sample"]), x)
    assert torch.equal(uncond["t_vec"], torch.arange(b))
    assert uncond["timestep"] is kw["timestep"] and cond["other"] is kw["other"]
    assert torch.equal(cond["added"]["text_embeds"], kw["added"]["text_embeds"][b:])
    assert isinstance(cond["residuals"], tuple) and cond["residuals"][1].shape[0] == b
    assert uncond["scale"] == 1.5 and cond["none"] is None
    with pytest.raises(hr.ShapeError, match="even"):
        split_cfg_batch(x, 3)
    assert describe_shapes(uncond) == describe_shapes(cond)


def test_split_keeps_lists_as_lists_and_halves_share_storage_with_the_input():
    g = _seeded()
    x = torch.randn(4, 3, generator=g)
    uncond, cond = split_cfg_batch([x, 2.0], 4)
    assert isinstance(uncond, list) and uncond[1] == 2.0 and cond[1] == 2.0
    assert torch.equal(uncond[0], x[:2]) and torch.equal(cond[0], x[2:])
    # views, not copies: the engine never pays for a split
    assert uncond[0].data_ptr() == x.data_ptr()
    assert cond[0].data_ptr() == x[2:].data_ptr()
    # a tensor whose leading size is the half batch is not batch-shaped for the doubled batch
    half = torch.randn(2, 3, generator=g)
    u, c = split_cfg_batch(half, 4)
    assert u is half and c is half


def test_per_frame_conditioning_is_split_and_dealt_by_video():
    """AnimateDiff-style conditioning: [uncond; cond] rows repeated per frame (2B x F rows)."""
    gen = _seeded()
    batch, frames = random.randint(1, 3), random.randint(2, 4)
    uncond, cond = torch.randn(batch, 3, 5, generator=gen), torch.randn(batch, 3, 5, generator=gen)
    per_frame = torch.cat([uncond, cond]).repeat_interleave(frames, dim=0)
    other = torch.randn(2 * batch * frames + 1, 5, generator=gen)  # no batch multiple: left whole
    kw = {"encoder_hidden_states": per_frame, "extra": {"table": other},
          "sample": torch.randn(2 * batch, 4, frames, 2, 2, generator=gen)}
    u_kw, c_kw = split_branch_kwargs(kw, 2 * batch, frames)
    assert torch.equal(u_kw["encoder_hidden_states"], uncond.repeat_interleave(frames, dim=0))
    assert torch.equal(c_kw["encoder_hidden_states"], cond.repeat_interleave(frames, dim=0))
    assert u_kw["extra"]["table"] is other and c_kw["extra"]["table"] is other
    assert u_kw["sample"].shape[0] == batch
    # without the frame count the per-frame rows are not the batch: passed whole
    assert split_branch_kwargs(kw, 2 * batch)[0]["encoder_hidden_states"] is per_frame
    # a share of videos [start, stop) takes exactly those videos' frames
    start = random.randrange(batch)
    stop = random.randint(start + 1, batch)
    rows = take_rows(c_kw, batch, start, stop, frames)
    assert torch.equal(rows["encoder_hidden_states"],
                       cond[start:stop].repeat_interleave(frames, dim=0))
    assert torch.equal(rows["sample"], c_kw["sample"][start:stop])


def test_arguments_with_another_batch_axis_are_split_and_dealt_along_it():
    """HiDream's stacked Llama 3 hidden states, (layers, 2B, tokens, dim) with [uncond; cond]
    along axis 1: split and dealt along that axis, also when the layer count equals 2B (where
    a split of the first axis would take layers for images)."""
    from diffusers import HiDreamImageTransformer2DModel

    gen = _seeded()
    batch = random.randint(1, 3)
    layers = random.choice([2 * batch, 2 * batch + 1])
    uncond, cond = (torch.randn(layers, batch, 5, 4, generator=gen) for _ in range(2))
    kw = {"encoder_hidden_states_llama3": torch.cat([uncond, cond], dim=1),
          "encoder_hidden_states_t5": torch.randn(2 * batch, 6, 8, generator=gen),
          "hidden_states": torch.randn(2 * batch, 4, 8, 8, generator=gen)}
    model = HiDreamImageTransformer2DModel.__new__(HiDreamImageTransformer2DModel)
    axes = batch_axes(model)
    assert axes == {"encoder_hidden_states_llama3": 1}
    assert batch_axes(torch.nn.Linear(2, 2)) == {}
    u_kw, c_kw = split_branch_kwargs(kw, 2 * batch, 1, axes)
    assert torch.equal(u_kw["encoder_hidden_states_llama3"], uncond)
    assert torch.equal(c_kw["encoder_hidden_states_llama3"], cond)
    assert torch.equal(c_kw["encoder_hidden_states_t5"], kw["encoder_hidden_states_t5"][batch:])
    # without the axis the layers are taken for the batch, or the tensor is passed whole
    plain = split_branch_kwargs(kw, 2 * batch)[1]["encoder_hidden_states_llama3"]
    assert plain.shape[1] == 2 * batch
    # a share of images [start, stop) takes those images along the axis, the rest as usual
    start = random.randrange(batch)
    stop = random.randint(start + 1, batch)
    rows = take_branch_rows(c_kw, batch, start, stop, 1, axes)
    assert torch.equal(rows["encoder_hidden_states_llama3"], cond[:, start:stop])
    assert torch.equal(rows["hidden_states"], c_kw["hidden_states"][start:stop])


def test_tensors_in_is_ordered_by_sorted_keys_and_describe_shapes_tells_structures_apart():
    g = _seeded()
    a, b, c = (torch.randn(2, generator=g) for _ in range(3))
    found = tensors_in({"z": a, "b": [b, {"y": c, "x": 1}], "m": None})
    assert [t is ref for t, ref in zip(found, (b, c, a))] == [True, True, True]
    assert len(found) == 3
    assert tensors_in(3.5) == [] and tensors_in(None) == []
    base = {"sample": torch.zeros(1, 4, 8, 8), "extra": None}
    assert describe_shapes(base) == describe_shapes({"extra": None,
                                                     "sample": torch.ones(1, 4, 8, 8)})
    assert describe_shapes(base) != describe_shapes({"sample": torch.zeros(1, 4, 8, 9),
                                                     "extra": None})
    assert describe_shapes(base) != describe_shapes(
        {"sample": torch.zeros(1, 4, 8, 8, dtype=torch.float16), "extra": None})
    assert describe_shapes(base) != describe_shapes({"sample": torch.zeros(1, 4, 8, 8),
                                                     "extra": 1.0})
    assert describe_shapes([torch.zeros(2)]) != describe_shapes((torch.zeros(2), None))


# ------------------------------------------------------------------------------- agreement.py
def test_digest_is_exact_for_tensors_and_stable_for_equal_content():
    g = _seeded()
    x = torch.randn(2, 7, 16, generator=g)
    assert digest(x) == digest(x.clone()) == digest(x.transpose(0, 2).contiguous().transpose(0, 2))  # layout-free
    one_off = x.clone()
    one_off.view(-1)[random.randrange(x.numel())] += 1e-6  # one element, one ulp-ish change
    assert digest(one_off) != digest(x)
    assert digest(x) != digest(x.flip(0))
    assert digest(x) != digest(x.double())  # dtype counts
    assert digest(x) != digest(x.reshape(7, 2, 16))  # shape counts
    assert digest(torch.zeros(0)) != digest(torch.zeros(0, 3))
    assert digest(torch.tensor([True, False])) != digest(torch.tensor([False, True]))


def test_digest_of_plain_values_containers_and_objects():
    assert digest({"a": 1, "b": [2.5, "x"]}) == digest({"b": [2.5, "x"], "a": 1})
    assert digest([1, 2]) != digest((1, 2))
    assert digest(0.1 + 0.2) != digest(0.3)  # floats exactly
    assert digest(1) != digest(1.0) and digest(True) != digest(1)
    assert digest(None) != digest("None")
    seed = random.randrange(1 << 30)
    assert digest(torch.Generator().manual_seed(seed)) == \
        digest(torch.Generator().manual_seed(seed))
    assert digest(torch.Generator().manual_seed(seed)) != \
        digest(torch.Generator().manual_seed(seed + 1))

    class Plain:  # default repr holds an address: equal objects in two processes must agree
        pass

    assert digest(Plain()) == digest(Plain())
    assert digest(len) == digest(len) and digest(len) != digest(print)
    import numpy as np

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert digest(arr) == digest(arr.copy()) and digest(arr) != digest(arr.T)


def _fields(seed, **changes):
    g = torch.Generator().manual_seed(seed)
    fields = {"config": "abc123", "num_steps": 6, "guidance_scale": 5.0,
              "sample": torch.randn(1, 4, 8, 8, generator=g),
              "cond": {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g)},
              "uncond": {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g)}}
    fields.update(changes)
    return fields


def test_agreement_check_passes_when_every_field_agrees():
    store, seed = HashStore(), random.randrange(1 << 30)
    with pytest.raises(hr.PeerTimeoutError, match="missing store keys.*k/0"):
        check_agreement(store, 1, 2, "k", _fields(seed), SHORT_WAIT_S)
    # rank 0 arrives late; its digests equal rank 1's, so it passes (returns None)
    assert check_agreement(store, 0, 2, "k", _fields(seed), SHORT_WAIT_S) is None


def test_agreement_check_names_each_differing_field_and_what_to_change():
    store, seed = HashStore(), random.randrange(1 << 30)
    other = _fields(seed + 1)
    rank1 = _fields(seed, guidance_scale=7.5, cond=other["cond"], **{"call.strength": 0.5})
    with pytest.raises(hr.PeerTimeoutError, match="first-call agreement check"):
        check_agreement(store, 1, 2, "run", rank1, SHORT_WAIT_S)
    with pytest.raises(hr.RankMismatchError) as info:
        check_agreement(store, 0, 2, "run", _fields(seed), SHORT_WAIT_S)
    message = str(info.value)
    assert message.startswith("rank 0: ranks disagree")
    # the first differing field in the order the fields were given comes first
    assert message.index("guidance_scale (") < message.index("cond (")
    assert f"guidance_scale (rank 0 vs rank 1): {ADVICE['guidance_scale']}" in message
    assert f"cond (rank 0 vs rank 1): {ADVICE['cond']}" in message
    # a field only one rank has is a disagreement too (e.g. guidance on one rank only)
    assert f"call.strength (rank 0 vs rank 1): {CALL_ADVICE}" in message
    for agreeing in ("sample", "uncond", "num_steps", "config"):
        assert f"{agreeing} (" not in message, message


def test_agreement_sees_latents_differing_in_one_element():
    store, seed = HashStore(), random.randrange(1 << 30)
    fields = _fields(seed)
    nudged = dict(fields, sample=fields["sample"].clone())
    nudged["sample"][0, 1, 2, 3] += 1e-3
    with pytest.raises(hr.PeerTimeoutError):
        check_agreement(store, 1, 2, "one", nudged, SHORT_WAIT_S)
    with pytest.raises(hr.RankMismatchError, match=r"on sample \(rank 0 vs rank 1\)"):
        check_agreement(store, 0, 2, "one", fields, SHORT_WAIT_S)


def test_agreement_check_keys_are_separate_per_run():
    """A second run under another key does not see the first run's digests."""
    store, seed = HashStore(), random.randrange(1 << 30)
    with pytest.raises(hr.PeerTimeoutError):
        check_agreement(store, 1, 2, "run/0", _fields(seed), SHORT_WAIT_S)
    check_agreement(store, 0, 2, "run/0", _fields(seed), SHORT_WAIT_S)
    with pytest.raises(hr.PeerTimeoutError, match="run/1/1"):
        check_agreement(store, 0, 2, "run/1", _fields(seed), SHORT_WAIT_S)
