"""Denoisers beyond the U-Net and SD3 families, in one process (no ranks).

* What the runtime reads from the model instead of a class list (engine/branch_layout.py): the
  sample argument, the output kind, the split of a stacked [uncond; cond] call with the shared
  per-token tables left whole, and the refusals (no diffusers convention, several outputs).
* The generic DiT stage adapter (stages/dit.py): running its units equals the model's own
  forward bit for bit for every described family, on fresh random inputs, also with ControlNet
  residuals added between blocks (Flux, Qwen-Image, Sana); the real blocks are back in place
  after a failed forward; refused inputs are refused.
* The two-call protocol's guards (two_call.py): unverified two-call pipelines and subclasses of
  verified ones are refused at parallelize; a denoiser call the pipeline loop did not make (one
  that breaks the cond/uncond pairing) is an error, not a silently wrong result.
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from test_dit_pipelines import TwoOutputs  # tests/ is on sys.path under pytest

import hybridiff_rt as hr
from hybridiff_rt.engine import model_family
from hybridiff_rt.engine.branch_layout import (
    SHARED_ARGUMENTS,
    denoiser_sample_key,
    first_output,
    split_branch_kwargs,
)
from hybridiff_rt.stages import has_stage_adapter
from hybridiff_rt.stages.base import prediction_of
from hybridiff_rt.testing import DIT_INFO, build_dit, dit_pipelines, sd_pipeline


@pytest.fixture
def seed():
    return random.randrange(1 << 16)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _sana(num_layers):
    """A tiny SanaTransformer2DModel (16 channels inside, 8 x 8 latents of 4 channels), drawn
    from the global generator."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                  attention_head_dim=8, num_layers=num_layers,
                                  num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=32, sample_size=8,
                                  patch_size=1)


def _denoiser_call(name, seed, size, pick=lambda calls: 0):
    """(transformer, forward kwargs) of one denoiser call of tiny pipeline ``name``, run for one
    step (Mochi's sigma schedule needs two): the call at index ``pick(number of calls)``."""
    pipe, kwargs = build_dit(name, seed=seed, size=size)
    model, seen = pipe.transformer, []
    handle = model.register_forward_pre_hook(
        lambda module, args, kw: seen.append((args, kw)), with_kwargs=True)
    pipe(num_inference_steps=2 if name == "mochi" else 1, output_type="latent",
         **DIT_INFO[name].guidance_kwargs, **kwargs)
    handle.remove()
    args, kw = seen[pick(len(seen))]
    call = dict(inspect.signature(model.forward).bind(*args, **kw).arguments)
    return model, {k: v for k, v in call.items() if k != "return_dict"}


def _dit_cases(seed):
    """(model, forward kwargs) per described DiT family, random weights and inputs."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batch = random.Random(seed).choice([1, 2])
    pixart = dit_pipelines.pixart_transformer(num_layers=3)
    sana = _sana(num_layers=2)
    wan = dit_pipelines.wan_transformer(num_layers=3)
    wan_i2v = dit_pipelines.wan_transformer(in_channels=12)
    cases = {}
    # dual-stream (and AuraFlow's, Chroma's and Flux 2's dual- then single-stream, Chroma's
    # per-block modulation, Lumina2's refiners before its layers, HunyuanDiT's long skip
    # connections, its sample and timestep passed positionally; the video DiTs CogVideoX, LTX,
    # Mochi, Allegro, HunyuanVideo and 1.5; HiDream's Llama layers appended to a stream around
    # every block): inputs as their pipelines make them
    # (CogView4: the uncond call's text is longer than the cond call's, a layout of its own)
    for name in ("qwen-image", "flux-true-cfg", "cogview4", "auraflow", "lumina2", "chroma",
                 "hunyuan-dit", "skyreels-v2", "ovis-image", "krea2", "nucleus-moe",
                 "wan2.1-i2v-clip", "flux2-klein", "cogvideox", "ltx-video", "mochi", "allegro",
                 "cogview3-plus", "lumina-next", "hunyuan-video", "hunyuan-video15",
                 "chronoedit", "wan-vace", "kandinsky5-t2v",
                 "hunyuan-video-i2v-token-replace", "cosmos2-v2w", "motif-video",
                 "cosmos2.5-t2w", "hunyuan-image", "hunyuan-image-refiner", "hidream"):
        small = ("chroma", "flux2-klein", "cogvideox", "ltx-video", "mochi", "allegro",
                 "cogview3-plus", "hunyuan-video", "hunyuan-video15",
                 "hunyuan-video-i2v-token-replace", "cosmos2-v2w", "motif-video")
        size = "small" if name in small else "tiny"
        # the cond or the uncond call
        cases[name] = _denoiser_call(name, seed, size, pick=random.Random(seed).randrange)
    # Lumina2 with texts of different lengths in one batch: its layers get an attention mask
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, random.Random(seed).randrange(1, 6):] = 0
    cases["lumina2-masked"] = (build_dit("lumina2", seed=seed)[0].transformer, {
        "hidden_states": _randn(gen, 2, 4, 8, 8), "timestep": torch.rand(2, generator=gen),
        "encoder_hidden_states": _randn(gen, 2, 6, 16), "encoder_attention_mask": mask})
    return cases | {
        "pixart": (pixart, {"hidden_states": _randn(gen, batch, 4, 8, 8),
                            "encoder_hidden_states": _randn(gen, batch, 6, 32),
                            "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                            "encoder_attention_mask": torch.ones(batch, 6)}),
        "sana": (sana, {"hidden_states": _randn(gen, batch, 4, 8, 8),
                        "encoder_hidden_states": _randn(gen, batch, 6, 32),
                        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                        "encoder_attention_mask": torch.ones(batch, 6)}),
        "wan": (wan, {"hidden_states": _randn(gen, batch, 4, 3, 8, 8),
                      "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                      "encoder_hidden_states": _randn(gen, batch, 6, 16)}),
        "wan-i2v": (wan_i2v, {"hidden_states": _randn(gen, batch, 12, 2, 8, 8),
                              "timestep": torch.randint(0, 1000, (batch,), generator=gen),
                              "encoder_hidden_states": _randn(gen, batch, 6, 16)}),
    }


# ------------------------------------------------------------------------- DiT stage adapter
def test_staged_dit_equals_the_models_forward_bit_for_bit(seed):
    for name, (model, kw) in _dit_cases(seed).items():
        staged = hr.stage_denoiser(model)
        lists = [getattr(model, attr) for attr in staged.family.blocks]
        assert [n for n in staged.unit_names if not n.startswith("into.")] == [
            f"{attr}.{i}" for attr, blocks in zip(staged.family.blocks, lists)
            for i in range(len(blocks))] + ["out"], name
        with torch.no_grad():
            expected = prediction_of(model(**kw, return_dict=False))
            ctx = staged.prepare(**kw)
            cut = random.Random(seed).randrange(1, len(staged.units))
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            got = staged.finish(staged.run(boundary, staged.prepare(**kw), cut, None), ctx)
        assert torch.equal(got, expected), f"{name} (seed {seed}, cut {cut})"
        # a cut before the out unit: the state a block list returns or takes, and the outputs
        # carried to later blocks ("<list>.<i>:<name>")
        carried = {k for k in boundary if ":" in k}
        assert all(k.split(":")[1] in staged.family.returns_of(k.split(".")[0])
                   for k in carried), boundary
        assert tuple(sorted(set(boundary) - carried)) in {
            tuple(sorted(names)) for attr in staged.family.blocks
            for names in (staged.family.flow_of(attr), staged.family.returns_of(attr))}, name
        for attr, blocks in zip(staged.family.blocks, lists):
            assert getattr(model, attr) is blocks  # the real blocks are back


@pytest.mark.parametrize("joint, single", [(2, 3), (2, 0), (0, 2)])
def test_auraflow_at_every_cut_and_with_a_block_list_left_empty(seed, joint, single):
    """AuraFlow joins text and image tokens between its two block lists (the into. unit makes
    that join with the model's own code); a list its configuration leaves empty is skipped."""
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(seed)
    model = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=joint,
        num_single_dit_layers=single, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, out_channels=4, pos_embed_max_size=64)
    gen = torch.Generator().manual_seed(seed)
    batch = random.Random(seed).choice([1, 2])
    kw = {"hidden_states": _randn(gen, batch, 4, 8, 8),
          "encoder_hidden_states": _randn(gen, batch, 6, 32),
          "timestep": torch.rand(batch, generator=gen) * 1000}
    staged = hr.stage_denoiser(model)
    expected_names = ([f"joint_transformer_blocks.{i}" for i in range(joint)]
                      + (["into.single_transformer_blocks"] if joint and single else [])
                      + [f"single_transformer_blocks.{i}" for i in range(single)] + ["out"])
    assert staged.unit_names == expected_names
    with torch.no_grad():
        expected = prediction_of(model(**kw, return_dict=False))
        for cut in range(len(staged.units) + 1):
            ctx = staged.prepare(**kw)
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            got = staged.finish(staged.run(boundary, staged.prepare(**kw), cut, None), ctx)
            assert torch.equal(got, expected), f"cut {cut} (seed {seed})"


def test_a_failed_forward_puts_the_real_blocks_back(seed):
    model, kw = _dit_cases(seed)["pixart"]
    staged = hr.stage_denoiser(model)
    blocks = model.transformer_blocks
    bad = dict(kw, encoder_hidden_states=kw["encoder_hidden_states"][..., :5])  # wrong width
    # the model's own error, named in the refusal (the runtime then runs CBP only, with a note)
    with pytest.raises(hr.UnsupportedModelError, match=r"forward failed .*\(RuntimeError: "), \
            torch.no_grad():
        staged.prepare(**bad)
    assert model.transformer_blocks is blocks
    with torch.no_grad():
        assert torch.equal(staged.forward(**kw), prediction_of(model(**kw, return_dict=False)))


def test_a_description_that_does_not_fit_is_refused_at_first_use(seed, monkeypatch):
    from hybridiff_rt.stages import dit

    _, kw = _dit_cases(seed)["sana"]
    torch.manual_seed(seed)
    model = _sana(num_layers=3)
    # Sana's forward adds ControlNet residuals to the flow after its blocks 1.., which the units
    # do not reproduce between blocks unless the description names them (``between``; after
    # the last block the out unit does, as the forward): a description that neither reproduces
    # nor refuses them does not fit such a call
    monkeypatch.setitem(dit.DIT_FAMILIES, "SanaTransformer2DModel",
                        dit.DiTFamily(blocks=("transformer_blocks",)))
    staged = hr.stage_denoiser(model)
    blocks = model.transformer_blocks
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = model.patch_embed(kw["hidden_states"])
        residuals = tuple(torch.randn(hidden.shape, generator=gen) for _ in blocks)
        with pytest.raises(hr.UnsupportedModelError, match="description does not fit"):
            staged.prepare(**kw, controlnet_block_samples=residuals)
        staged.prepare(**kw)  # calls without residuals fit
    assert model.transformer_blocks is blocks  # the real blocks are back


def test_motif_video_with_decoder_layers_is_refused_at_first_use(seed):
    """Motif-Video's decoder layers run the last single-stream blocks on a copy of the flow made
    before the first block, with the flow as their text: not a flow the description carries.
    The first-use check finds the mismatch (the runtime then runs CBP only, with a note)."""
    gen = torch.Generator().manual_seed(seed)
    model = dit_pipelines.motif_video_transformer(num_decoder_layers=1, seed=seed)
    kw = {"hidden_states": _randn(gen, 1, 9, 2, 8, 8), "timestep": torch.rand(1, generator=gen),
          "encoder_hidden_states": _randn(gen, 1, 6, 16),
          "encoder_attention_mask": torch.ones(1, 6)}
    staged = hr.stage_denoiser(model)
    with pytest.raises(hr.UnsupportedModelError, match="staged MotifVideoTransformer3DModel .* "
                                                       "gave a different prediction"), \
            torch.no_grad():
        staged.prepare(**kw)
    with torch.no_grad():  # without decoder layers it stages exactly
        plain = dit_pipelines.motif_video_transformer(seed=seed)
        staged = hr.stage_denoiser(plain)
        ctx = staged.prepare(**kw)
        got = staged.finish(staged.run(ctx.initial_state, ctx, 0, None), ctx)
        assert torch.equal(got, prediction_of(plain(**kw, return_dict=False)))


def _controlnet_cases(seed):
    """Per family whose forward adds ControlNet residuals between blocks: (model, forward
    kwargs with random residuals). Flux: 3 dual- and 3 single-stream blocks, 1 to 3 residuals
    per list, with or without ``controlnet_blocks_repeat``; Qwen-Image: 3 blocks; Sana: 3 blocks,
    a residual after each block but the first."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cases = {}
    flux, kw = _denoiser_call("flux-true-cfg", seed, "small")
    tokens = (*kw["hidden_states"].shape[:2], flux.inner_dim)
    cases["flux"] = (flux, dict(
        kw, controlnet_blocks_repeat=rng.choice([False, True]),
        controlnet_block_samples=[_randn(gen, *tokens) for _ in range(rng.randint(1, 3))],
        controlnet_single_block_samples=[_randn(gen, *tokens) for _ in range(rng.randint(1, 3))]))
    qwen, kw = _denoiser_call("qwen-image", seed, "small")
    tokens = (*kw["hidden_states"].shape[:2], qwen.inner_dim)
    cases["qwen-image"] = (qwen, dict(kw, controlnet_block_samples=[
        _randn(gen, *tokens) for _ in range(rng.randint(1, 3))]))
    _, kw = _dit_cases(seed)["sana"]
    torch.manual_seed(seed)
    sana = _sana(num_layers=3)
    batch, _, height, width = kw["hidden_states"].shape
    cases["sana"] = (sana, dict(kw, controlnet_block_samples=tuple(
        _randn(gen, batch, height * width, 16) for _ in range(2))))
    return cases


def test_controlnet_residuals_between_blocks_are_reproduced_at_every_cut(seed):
    """ControlNet residuals (the family's ``between`` arguments): the staged forward, cut before
    any unit, equals the model's own forward with them bit for bit, and they matter."""
    for name, (model, kw) in _controlnet_cases(seed).items():
        staged = hr.stage_denoiser(model)
        residuals = [k for k in staged.family.between if kw.get(k) is not None]
        assert residuals, name
        with torch.no_grad():
            expected = prediction_of(model(**kw, return_dict=False))
            without = model(**{k: v for k, v in kw.items() if k not in residuals},
                            return_dict=False)[0]
            ctx = staged.prepare(**kw)
            for cut in range(1, len(staged.units)):
                boundary = staged.run(ctx.initial_state, ctx, 0, cut)
                got = staged.finish(staged.run(boundary, staged.prepare(**kw), cut, None), ctx)
                assert torch.equal(got, expected), f"{name} (seed {seed}, cut {cut})"
        assert not torch.equal(without, expected), name
        # residuals are recorded between blocks only when a call passes them
        assert any(ctx.added[0]), name
        assert not any(any(block) for blocks in staged.prepare(
            **{k: v for k, v in kw.items() if k not in residuals}).added for block in blocks)


def test_class_conditional_dit_is_staged_though_its_forward_reads_block_0(seed):
    """DiTTransformer2DModel's forward takes its class-label embedding from
    ``transformer_blocks[0].norm1`` after the blocks: the stand-ins relay attribute reads to the
    block they stand in for, and the staged forward equals the model's at every cut."""
    from diffusers import DiTTransformer2DModel

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    batch = random.Random(seed).choice([1, 2])
    kw = {"hidden_states": _randn(gen, 2 * batch, 4, 8, 8),
          "timestep": torch.randint(0, 1000, (2 * batch,), generator=gen),
          "class_labels": torch.cat([torch.randint(0, 1000, (batch,), generator=gen),
                                     torch.full((batch,), 1000)])}
    staged = hr.stage_denoiser(model)
    with torch.no_grad():
        expected = prediction_of(model(**kw, return_dict=False))
        ctx = staged.prepare(**kw)
        for cut in range(1, len(staged.units)):
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            got = staged.finish(staged.run(boundary, staged.prepare(**kw), cut, None), ctx)
            assert torch.equal(got, expected), f"seed {seed}, cut {cut}"
    assert all(type(block).__name__ == "BasicTransformerBlock"
               for block in model.transformer_blocks)  # the real blocks are back


class _ArgsBlock(torch.nn.Module):
    """A block that takes more positional values than it names (``*args``), as HunyuanVideo's
    blocks do; this one uses them."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, temb, *args):
        scale, shift = args
        return self.lin(hidden_states) * scale + temb + shift


class ToyArgsDiT(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ArgsBlock() for _ in range(layers))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep, return_dict=True):
        temb = timestep[:, None, None] * 0.01
        for i, block in enumerate(self.blocks):
            hidden_states = block(hidden_states, temb, 1.0 + 0.5 * i, temb * i)
        return (self.proj(hidden_states),)


class ToyJoinDiT(torch.nn.Module):
    """Before each block, the forward joins that block's own tokens to the flow (after it, or
    before it with ``prepend``) and afterwards keeps the flow's own tokens (HiDream's pattern)."""

    def __init__(self, layers, prepend=False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(layers))
        self.prepend = prepend

    def forward(self, hidden_states, extra, return_dict=True):
        tokens = hidden_states.shape[1]
        for i, block in enumerate(self.blocks):
            joined = [extra[i], hidden_states] if self.prepend else [hidden_states, extra[i]]
            hidden_states = block(torch.cat(joined, dim=1))
            hidden_states = hidden_states[:, -tokens:] if self.prepend else \
                hidden_states[:, :tokens]
        return (hidden_states * 2,)


def test_tokens_appended_around_each_block_are_appended_again_at_every_cut(seed, monkeypatch):
    """A description's ``appended``: each unit keeps its output's own tokens and appends the next
    block's recorded ones, equal to the forward bit for bit at every cut; a forward that puts the
    tokens in front is refused at first use, naming the description."""
    from hybridiff_rt.stages import dit

    monkeypatch.setitem(dit.DIT_FAMILIES, "ToyJoinDiT", dit.DiTFamily(
        blocks=("blocks",), flow=("input",), returns=("input",),
        appended={"blocks": ("input",)}))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = random.Random(seed).randint(2, 4)
    kw = {"hidden_states": _randn(gen, 2, 5, 8),
          "extra": [_randn(gen, 2, random.Random(seed + i).randint(1, 4), 8)
                    for i in range(layers)]}
    model = ToyJoinDiT(layers)
    staged = hr.stage_denoiser(model)
    with torch.no_grad():
        expected = model(**kw)[0]
        ctx = staged.prepare(**kw)
        # unit i appends block i+1's tokens after the 5 kept; the last unit returns all of them
        assert [sorted(j) for j in ctx.joined[0]] == [["input"]] * (layers - 1) + [[]]
        for i, join in enumerate(ctx.joined[0][:-1]):
            kept, tokens = join["input"]
            assert kept == 5 and torch.equal(tokens, kw["extra"][i + 1])
        for cut in range(1, len(staged.units)):
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            got = staged.finish(staged.run(boundary, ctx, cut, None), ctx)
            assert torch.equal(got, expected), (seed, cut)
        with pytest.raises(hr.UnsupportedModelError, match="'appended' does not fit"):
            hr.stage_denoiser(ToyJoinDiT(layers, prepend=True)).prepare(**kw)


def test_blocks_given_values_through_their_star_args_get_them_back_at_every_cut(seed,
                                                                                 monkeypatch):
    """A block call's ``*args`` values are recorded with its other context and passed again,
    after the named parameters, when its unit runs (HunyuanVideo's blocks are called so)."""
    from hybridiff_rt.stages import dit

    monkeypatch.setitem(dit.DIT_FAMILIES, "ToyArgsDiT", dit.DiTFamily(blocks=("blocks",)))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyArgsDiT(random.Random(seed).randint(2, 4))
    kw = {"hidden_states": _randn(gen, 2, 5, 8), "timestep": torch.rand(2, generator=gen)}
    staged = hr.stage_denoiser(model)
    with torch.no_grad():
        expected = model(**kw)[0]
        ctx = staged.prepare(**kw)
        assert [call[dit.VAR_POSITIONAL][0] for call in ctx.block_kwargs[0]] == [
            1.0 + 0.5 * i for i in range(len(model.blocks))]
        for cut in range(1, len(staged.units)):
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            got = staged.finish(staged.run(boundary, staged.prepare(**kw), cut, None), ctx)
            assert torch.equal(got, expected), f"seed {seed}, cut {cut}"


def test_controlnet_residuals_the_forward_applies_otherwise_are_refused(seed):
    """HunyuanDiT adds its ControlNet residuals to the long skip connections (popping them off
    the caller's list) and Chroma writes its single-stream ones into a slice in place: refused
    by their descriptions, the model untouched."""
    cases = _dit_cases(seed)
    model, kw = cases["hunyuan-dit"]
    residuals = [torch.zeros_like(kw["hidden_states"])]
    with pytest.raises(hr.UnsupportedModelError, match="controlnet_block_samples"):
        hr.stage_denoiser(model).prepare(**kw, controlnet_block_samples=residuals)
    assert len(residuals) == 1
    model, kw = cases["chroma"]
    with pytest.raises(hr.UnsupportedModelError, match="controlnet_single_block_samples"):
        hr.stage_denoiser(model).prepare(**kw, controlnet_single_block_samples=[
            torch.zeros_like(kw["hidden_states"])])


def test_which_denoisers_have_a_stage_adapter(seed):
    cases = _dit_cases(seed)
    assert all(has_stage_adapter(model) for model, _ in cases.values())
    assert has_stage_adapter(sd_pipeline(seed=seed).unet)
    model = TwoOutputs()  # a denoiser of a class no adapter describes
    assert not has_stage_adapter(model)
    with pytest.raises(hr.UnsupportedModelError, match="cannot stage"):
        hr.stage_denoiser(model)


# ------------------------------------------------------------------ what is read from the model
def test_sample_key_and_family_come_from_the_forward_signature(seed):
    unet = sd_pipeline(seed=seed).unet
    assert denoiser_sample_key(unet) == "sample" and model_family(unet) == "unet"
    for model, _ in _dit_cases(seed).values():
        assert denoiser_sample_key(model) == "hidden_states"
        assert model_family(model) == "generic"
    for bad in (torch.nn.Linear(4, 4), "not a module"):
        with pytest.raises(hr.UnsupportedModelError, match="return_dict"
                           if isinstance(bad, torch.nn.Module) else "torch.nn.Module"):
            denoiser_sample_key(bad)


def test_wrapped_denoisers_are_refused_naming_the_model_inside(seed):
    unet = sd_pipeline(seed=seed).unet
    with pytest.raises(hr.UnsupportedModelError, match=r"torch.compile wrapper.*_orig_mod.*"
                                                       r"HybridConfig\(compile="):
        denoiser_sample_key(torch.compile(unet))  # lazy: nothing is compiled
    with pytest.raises(hr.UnsupportedModelError, match="DataParallel.*UNet2DConditionModel"):
        denoiser_sample_key(torch.nn.DataParallel(unet))
    pipe = sd_pipeline(seed=seed)
    pipe.unet = torch.compile(pipe.unet)
    with pytest.raises(hr.UnsupportedModelError, match="pipe.unet = pipe.unet._orig_mod"):
        hr.parallelize(pipe, hr.HybridConfig(k=0))


def test_first_output_reads_tuples_and_base_outputs_and_refuses_extra_outputs():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    x = torch.randn(2, 3)
    assert first_output((x,), "m")[0] is x and first_output((x,), "m")[1].cls is None
    assert first_output((x, None), "m")[0] is x
    pred, kind = first_output(Transformer2DModelOutput(sample=x), "m")
    assert pred is x and kind.cls is Transformer2DModelOutput and kind.field == "sample"
    wrapped = kind.wrap(x, return_dict=True)
    assert type(wrapped) is Transformer2DModelOutput and wrapped.sample is x
    assert kind.wrap(x, return_dict=False) == (x,)
    with pytest.raises(hr.UnsupportedModelError, match="returned 2 outputs"):
        first_output((x, torch.ones(1)), "m")
    with pytest.raises(hr.UnsupportedModelError, match="no prediction tensor"):
        first_output((None,), "m")


def test_split_leaves_shared_per_token_tables_whole(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 4  # two rows per branch; the rotary table has 4 tokens: the same leading size
    kw = {"hidden_states": _randn(gen, batch, 3), "timestep": torch.tensor(7.0),
          "image_rotary_emb": (_randn(gen, batch, 8), _randn(gen, batch, 8)),
          "added": {"style": torch.arange(batch)}}
    # Stable Audio's (cos, sin) table, of one token more than its latent length
    kw["rotary_embedding"] = (_randn(gen, batch, 8), _randn(gen, batch, 8))
    uncond, cond = split_branch_kwargs(kw, batch)
    for name in ("image_rotary_emb", "rotary_embedding"):
        assert name in SHARED_ARGUMENTS
        assert uncond[name] is kw[name] is cond[name], name
    assert torch.equal(uncond["hidden_states"], kw["hidden_states"][:2])
    assert torch.equal(cond["hidden_states"], kw["hidden_states"][2:])
    assert torch.equal(cond["added"]["style"], torch.tensor([2, 3]))
    assert uncond["timestep"] is kw["timestep"]


def test_a_denoiser_with_several_outputs_is_refused_at_its_first_call(seed):
    den = hr.HybridDenoiser(TwoOutputs(), hr.HybridConfig(k=0))
    x = torch.randn(1, 4)
    with pytest.raises(hr.UnsupportedModelError, match="returned 2 outputs"):
        den(x, None, cond={}, uncond={}, guidance_scale=3.0, step=0, num_steps=2)


def test_world_of_one_returns_the_models_own_output_class(seed):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    model = build_dit("pixart-sigma", seed=seed)[0].transformer
    gen = torch.Generator().manual_seed(seed)
    kw = {"hidden_states": _randn(gen, 2, 4, 8, 8), "encoder_hidden_states": _randn(gen, 2, 6, 32),
          "timestep": torch.tensor([400, 400]),
          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.no_grad():
        expected = model(**kw).sample

    class Minimal:  # what parallelize needs of a batched pipeline
        transformer = model
        scheduler = type("S", (), {"timesteps": [0, 1]})()
        do_classifier_free_guidance = True
        guidance_scale = 4.0

        def __call__(self):
            return [self.transformer(**kw), self.transformer(**kw, return_dict=False)]

    parallel = hr.parallelize(Minimal(), hr.HybridConfig(k=0))
    with torch.no_grad():
        as_dict, as_tuple = parallel()
    assert type(as_dict) is Transformer2DModelOutput and torch.equal(as_dict.sample, expected)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], expected)
    parallel.restore()


# ---------------------------------------------------------------------------- two-call guards
def test_unverified_two_call_pipelines_are_refused_at_parallelize(seed):
    from diffusers import ChromaInpaintPipeline, FluxPipeline

    chroma = build_dit("chroma", seed=seed)[0].transformer
    # the text-to-image and image-to-image Chroma loops are verified, the inpainting one is not
    pipe = ChromaInpaintPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=chroma)
    with pytest.raises(hr.UnsupportedModelError, match="ChromaInpaintPipeline calls its "
                                                       "denoiser once per guidance branch"):
        hr.parallelize(pipe)
    assert "forward" not in vars(chroma)  # nothing was wrapped

    flux = build_dit("flux-true-cfg", seed=seed)[0]

    class MyFlux(FluxPipeline):  # same loop today, but nothing verifies a subclass's loop
        pass

    sub = MyFlux(**flux.components)
    with pytest.raises(hr.UnsupportedModelError, match="subclasses FluxPipeline"):
        hr.parallelize(sub)

    class TrueCfgSomething:  # any pipeline taking true_cfg_scale calls once per branch
        transformer = flux.transformer

        def __call__(self, prompt=None, true_cfg_scale=4.0):
            raise AssertionError("never called")

    with pytest.raises(hr.UnsupportedModelError, match="takes true_cfg_scale"):
        hr.parallelize(TrueCfgSomething())


def test_pipelines_that_guide_through_a_diffusers_guider_are_refused_at_parallelize(seed):
    """A guider (diffusers.guiders) runs the denoiser once per guidance batch and combines the
    batches itself: every diffusers pipeline class built with one whose loop is not verified is
    refused by name (in diffusers 0.42 all six are verified: a later release may add more), as is
    a user's pipeline that takes a ``*_guider``; nothing is wrapped."""
    import diffusers

    from hybridiff_rt.two_call import TWO_CALL_PIPELINES, guider_components, two_call_layout

    classes = [getattr(diffusers, n) for n in dir(diffusers) if n.endswith("Pipeline")]
    built_with_guider = {c for c in classes if isinstance(c, type)
                         and guider_components(object.__new__(c))}
    assert {"HunyuanImagePipeline", "HunyuanImageRefinerPipeline", "HunyuanVideo15Pipeline",
            "HunyuanVideo15ImageToVideoPipeline", "MotifVideoPipeline",
            "MotifVideoImage2VideoPipeline"} <= {c.__name__ for c in built_with_guider}
    for cls in [c for c in built_with_guider if c.__name__ not in TWO_CALL_PIPELINES]:
        with pytest.raises(hr.UnsupportedModelError, match=f"{cls.__name__} calls its denoiser "
                           "once per guidance branch and it guides through a diffusers guider"):
            two_call_layout(object.__new__(cls))
    flux = build_dit("flux-true-cfg", seed=seed)[0]

    class MyGuided:
        def __init__(self, transformer, style_guider=None):
            self.transformer, self.style_guider = transformer, style_guider

        def __call__(self, prompt=None):
            raise AssertionError("never called")

    with pytest.raises(hr.UnsupportedModelError, match=r"diffusers guider \(style_guider"):
        hr.parallelize(MyGuided(flux.transformer))
    assert "forward" not in vars(flux.transformer)  # nothing was wrapped


def test_a_verified_guider_pipeline_with_another_guider_is_refused(seed):
    """HunyuanVideo 1.5 is verified with ClassifierFreeGuidance and AdaptiveProjectedGuidance:
    another guider (other combinations, or more batches per step) is refused at parallelize (for
    HunyuanImage, also as its OCR guider), and one swapped in afterwards at the first denoiser
    call; both name the guider and the fix."""
    from diffusers.guiders import PerturbedAttentionGuidance, TangentialClassifierFreeGuidance

    pipe, kwargs = build_dit("hunyuan-video15", seed=seed)
    cfg = pipe.guider
    pipe.guider = TangentialClassifierFreeGuidance(guidance_scale=6.0)
    with pytest.raises(hr.UnsupportedModelError,
                       match="guider is TangentialClassifierFreeGuidance; .* Set pipe.guider = "
                             r"ClassifierFreeGuidance\(guidance_scale=...\)"):
        hr.parallelize(pipe)
    assert "forward" not in vars(pipe.transformer)  # nothing was wrapped
    pipe.guider = cfg
    image = build_dit("hunyuan-image", seed=seed)[0]  # each guider its loop may pick is checked
    image.ocr_guider = TangentialClassifierFreeGuidance(guidance_scale=6.0)
    with pytest.raises(hr.UnsupportedModelError, match="HunyuanImagePipeline.ocr_guider is "
                       r"TangentialClassifierFreeGuidance; .* Set pipe.ocr_guider = "):
        hr.parallelize(image)
    runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
    pipe.guider = PerturbedAttentionGuidance(guidance_scale=6.0, perturbed_guidance_layers=[0])
    with pytest.raises(hr.UnsupportedModelError, match="guider is PerturbedAttentionGuidance"):
        runner(**kwargs, num_inference_steps=2, output_type="latent")
    runner.restore()


def test_every_pipeline_named_in_the_two_call_lists_is_a_diffusers_pipeline():
    """The verified and the refused two-call lists name classes of the installed diffusers
    (a misspelt name would verify or refuse nothing)."""
    import diffusers

    from hybridiff_rt.two_call import TWO_CALL_PIPELINES, UNVERIFIED_TWO_CALL

    for name in list(TWO_CALL_PIPELINES) + list(UNVERIFIED_TWO_CALL):
        assert inspect.isclass(getattr(diffusers, name, None)), name
    assert not set(TWO_CALL_PIPELINES) & set(UNVERIFIED_TWO_CALL)


def _extra_call(when, embeds):
    """A callback that makes one denoiser call the Wan loop does not make, at step ``when``."""
    def callback(pipe, i, t, tensors):
        if i == when:
            latents = tensors["latents"]
            pipe.transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                             encoder_hidden_states=embeds, return_dict=False)
        return tensors
    return callback


@pytest.mark.parametrize("when, message", [(0, "is not the partner of the first"),
                                           (2, "without its partner call")])
def test_a_call_outside_the_pairing_is_an_error(seed, when, message):
    pipe, kwargs = build_dit("wan2.1", seed=seed)
    parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
    with pytest.raises(hr.HybridError, match=message):
        parallel(num_inference_steps=3, output_type="latent", guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(seed),
                 callback_on_step_end=_extra_call(when, kwargs["prompt_embeds"]), **kwargs)
    parallel.restore()


class _BranchRecorder:
    """Stands in for the adapter and engine around TwoCallSteps: records the per-branch
    arguments a step is run with and predicts ``sample + sum of the image embeddings``."""

    sample_key, output_kind, _next_step = "hidden_states", None, 0

    def __init__(self) -> None:
        self.engine, self.model = self, torch.nn.Linear(2, 2)
        self.pipe = type("ChromaLike", (), {"do_classifier_free_guidance": True})()
        self.report = type("Report", (), {"note": staticmethod(lambda text: None)})()
        self.branches: list[tuple[dict, dict]] = []

    def _planned_calls(self) -> int:
        return 1

    def predict_branches(self, uncond_kw, cond_kw, **_):
        self.branches.append((uncond_kw, cond_kw))
        return tuple(kw["hidden_states"] + sum(e.sum() for e in
                                               kw["joint_attention_kwargs"]["image_embeds"])
                     for kw in (uncond_kw, cond_kw))


class _CroppingRecorder(_BranchRecorder):
    """A :class:`_BranchRecorder` whose denoiser predicts only the first 2 tokens."""

    def predict_branches(self, uncond_kw, cond_kw, **kw):
        return tuple(p[:, :2] for p in super().predict_branches(uncond_kw, cond_kw, **kw))


def test_a_slice_taken_before_the_fill_reads_the_cond_prediction_whatever_its_shape(seed):
    """Kontext-like loops slice the first call's result before the second call: the slice is
    recorded and, once the second call returned, holds that slice of the cond prediction, also
    for a denoiser whose prediction is not shaped like its sample (as the plain loop would)."""
    from hybridiff_rt.two_call import TWO_CALL_PIPELINES, TwoCallSteps

    def forward(hidden_states, timestep, encoder_hidden_states, joint_attention_kwargs=None,
                return_dict=True):
        raise AssertionError("the protocol runs the branches through the engine")

    gen = torch.Generator().manual_seed(seed)
    sample, timestep = torch.randn(1, 4, 2, generator=gen), torch.tensor([0.5])
    positive, negative = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    for recorder, tokens in ((_BranchRecorder(), 4), (_CroppingRecorder(), 2)):
        steps = TwoCallSteps(recorder, TWO_CALL_PIPELINES["FluxKontextPipeline"], [forward])
        steps.begin({"true_cfg_scale": 4.0, "negative_prompt": "x"})
        calls = [{"hidden_states": sample, "timestep": timestep, "return_dict": False,
                  "encoder_hidden_states": torch.ones(1, 2, 8),
                  "joint_attention_kwargs": {"image_embeds": [embeds]}}
                 for embeds in (positive, negative)]
        (first,) = steps.forward(0, (), calls[0])
        early = first[:, 1:3]  # the loop's slice, taken before the second call
        (second,) = steps.forward(0, (), calls[1])
        cond, uncond = ((sample + e.sum())[:, :tokens] for e in (positive, negative))
        assert torch.equal(early, cond[:, 1:3]) and early.shape == cond[:, 1:3].shape
        assert torch.equal(first, cond) and torch.equal(second, uncond)
        steps.end()


def test_a_deferred_call_keeps_its_arguments_as_the_loop_passed_them(seed):
    """Chroma's loop writes the negative IP-Adapter embeddings into the dict it passes to both
    calls between them; the deferred cond call must still run with the positive ones."""
    from hybridiff_rt.deferred import DeferredPrediction
    from hybridiff_rt.two_call import TWO_CALL_PIPELINES, TwoCallSteps

    def forward(hidden_states, timestep, encoder_hidden_states, joint_attention_kwargs=None,
                return_dict=True):
        raise AssertionError("the protocol runs the branches through the engine")

    gen = torch.Generator().manual_seed(seed)
    sample, timestep = torch.randn(1, 4, 2, generator=gen), torch.tensor([0.5])
    positive, negative = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    recorder = _BranchRecorder()
    steps = TwoCallSteps(recorder, TWO_CALL_PIPELINES["ChromaPipeline"], [forward])
    steps.begin({"guidance_scale": 4.0})
    shared = {"image_embeds": [positive], "scale": 1.0}
    (first,) = steps.forward(0, (), {"hidden_states": sample, "timestep": timestep,
                                     "encoder_hidden_states": torch.ones(1, 2, 8),
                                     "joint_attention_kwargs": shared, "return_dict": False})
    assert isinstance(first, DeferredPrediction) and not first.is_filled
    shared["image_embeds"][0] = negative  # in place, in the list both calls were given
    shared["scale"] = 0.0
    (second,) = steps.forward(0, (), {"hidden_states": sample, "timestep": timestep,
                                      "encoder_hidden_states": torch.zeros(1, 2, 8),
                                      "joint_attention_kwargs": shared, "return_dict": False})
    (uncond_kw, cond_kw), = recorder.branches
    assert cond_kw["joint_attention_kwargs"]["image_embeds"][0] is positive
    assert cond_kw["joint_attention_kwargs"]["scale"] == 1.0
    assert uncond_kw["joint_attention_kwargs"]["image_embeds"][0] is negative
    assert torch.equal(cond_kw["encoder_hidden_states"], torch.ones(1, 2, 8))
    assert torch.equal(first, sample + positive.sum())  # the buffer holds the cond prediction
    assert torch.equal(second, sample + negative.sum())
    steps.end()


def test_a_first_call_asking_for_return_dict_gets_the_annotated_output_class(seed):
    """Kandinsky 5's loops call the denoiser with return_dict=True: before the model has run,
    the deferred first call returns the output class its forward's return annotation names,
    holding the buffer the second call fills; a forward whose annotation names no single output
    class is an error asking for return_dict=False."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from hybridiff_rt.engine.branch_layout import OutputKind
    from hybridiff_rt.two_call import TWO_CALL_PIPELINES, TwoCallSteps

    def annotated(hidden_states, timestep, encoder_hidden_states, joint_attention_kwargs=None,
                  return_dict=True):
        raise AssertionError("the protocol runs the branches through the engine")

    def unannotated(hidden_states, timestep, encoder_hidden_states, joint_attention_kwargs=None,
                    return_dict=True):
        raise AssertionError("the protocol runs the branches through the engine")

    # as evaluated objects (this module's annotations are strings, its names local)
    annotated.__annotations__["return"] = Transformer2DModelOutput | torch.Tensor
    unannotated.__annotations__["return"] = torch.Tensor | dict[str, torch.Tensor]

    assert OutputKind.from_annotation(annotated) == OutputKind(Transformer2DModelOutput, "sample")
    assert OutputKind.from_annotation(unannotated) is None
    gen = torch.Generator().manual_seed(seed)
    sample, timestep = torch.randn(1, 4, 2, generator=gen), torch.tensor([0.5])
    positive, negative = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    calls = [{"hidden_states": sample, "timestep": timestep, "return_dict": True,
              "encoder_hidden_states": torch.ones(1, 2, 8),
              "joint_attention_kwargs": {"image_embeds": [embeds]}}
             for embeds in (positive, negative)]
    steps = TwoCallSteps(_BranchRecorder(), TWO_CALL_PIPELINES["ChromaPipeline"], [annotated])
    steps.begin({"guidance_scale": 4.0})
    first = steps.forward(0, (), calls[0])
    assert type(first) is Transformer2DModelOutput and not first.sample.is_filled
    second = steps.forward(0, (), calls[1])
    assert type(second) is Transformer2DModelOutput
    assert torch.equal(first.sample, sample + positive.sum())
    assert torch.equal(second.sample, sample + negative.sum())
    steps.end()
    steps = TwoCallSteps(_BranchRecorder(), TWO_CALL_PIPELINES["ChromaPipeline"], [unannotated])
    steps.begin({"guidance_scale": 4.0})
    with pytest.raises(hr.HybridError, match="names no single diffusers output class; .* "
                                             "return_dict=False"):
        steps.forward(0, (), calls[0])
