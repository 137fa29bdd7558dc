"""Staged denoisers: running all units equals the model's own forward, bit for bit (fp32, CPU).

Tiny random-init UNet2DConditionModel (SD1.5-, SD2.1-, SDXL-shaped and odd variants) and
SD3Transformer2DModel (SD3-, SD3.5-shaped) configs; fresh random inputs each run (the seed is
printed and shown in failure messages).
"""

from __future__ import annotations

import random

import pytest
import torch

# Every test here stages a diffusers model: skip the module (not fail collection) without it, so
# `pytest -m gpu tests/` still collects the GPU tests on a machine that lacks diffusers.
pytest.importorskip("diffusers")

from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D  # noqa: E402

import hybridiff_rt.stages as st  # noqa: E402
from hybridiff_rt.errors import ShapeError, UnsupportedModelError  # noqa: E402
from hybridiff_rt.stages.unet import skip_key  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def seed():
    s = random.randrange(2**31)
    print(f"seed={s}")
    torch.manual_seed(s)
    return s


# --------------------------------------------------------------------------- tiny UNet configs

UNET_BASE = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
)

UNET_CONFIGS = {
    # SD1.5 layout: cross-attention down blocks then a plain one, conv projections.
    "sd15": dict(UNET_BASE),
    # SD2.1 layout: linear projections, per-block head dims, upcast attention.
    "sd21": dict(
        UNET_BASE,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=24,
    ),
    # SDXL layout: plain first block, multi-layer transformers, text_time added embeddings.
    "sdxl": dict(
        UNET_BASE,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
    # No mid block, centred input, LCM-style timestep_cond, class labels.
    "nomid": dict(UNET_BASE, mid_block_type=None, center_input_sample=True, time_cond_proj_dim=16, num_class_embeds=5),
    # Plain mid block, timestep class embedding, text added embedding, encoder projection.
    "misc": dict(
        UNET_BASE,
        cross_attention_dim=24,
        mid_block_type="UNetMidBlock2D",
        class_embed_type="timestep",
        time_embedding_act_fn="silu",
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        encoder_hid_dim=20,
        encoder_hid_dim_type="text_proj",
    ),
}


def make_unet(name: str) -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIGS[name]).eval()


def unet_inputs(name: str, batch: int = 2, hw: tuple[int, int] = (16, 16), optional: bool = False) -> dict:
    """Random forward kwargs for a config; ``optional`` adds every optional input it accepts."""
    cfg = UNET_CONFIGS[name]
    text_dim = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    seq = 7
    kw = dict(
        sample=torch.randn(batch, 4, *hw),
        timestep=torch.randint(0, 1000, (batch,)),
        encoder_hidden_states=torch.randn(batch, seq, text_dim),
    )
    if cfg.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(batch, 32), time_ids=torch.rand(batch, 6) * 1024)
    if cfg.get("time_cond_proj_dim"):
        kw["timestep_cond"] = torch.randn(batch, cfg["time_cond_proj_dim"])
    if cfg.get("num_class_embeds"):
        kw["class_labels"] = torch.randint(0, cfg["num_class_embeds"], (batch,))
    if cfg.get("class_embed_type") == "timestep":
        kw["class_labels"] = torch.randint(0, 1000, (batch,))
    if optional:
        mask = torch.ones(batch, seq)
        mask[0, -3:] = 0
        kw["encoder_attention_mask"] = mask
        kw["cross_attention_kwargs"] = {"scale": 0.5}  # LoRA scale: a no-op without LoRA layers
        kw["timestep"] = torch.tensor(float(random.randrange(1000)))  # 0-d timestep, broadcast
    return kw


def controlnet_residuals(staged, kw) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Random ControlNet residuals shaped like the skips and the mid-block output."""
    ctx = staged.prepare(**kw)
    n_down = next(i for i, u in enumerate(staged.units) if not u.name.startswith(("conv_in", "down")))
    state = staged.run(ctx.initial_state, ctx, 0, n_down)
    skips = tuple(torch.randn_like(state[skip_key(i)]) for i in range(staged.num_skips))
    return skips, torch.randn_like(state[skip_key(staged.num_skips - 1)])


def reference(model, kw) -> torch.Tensor:
    return model(**kw, return_dict=False)[0]


def assert_bit_equal(ref: torch.Tensor, out: torch.Tensor, seed: int) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out, ref), f"seed={seed}: max |diff| {(out - ref).abs().max().item()}"


# --------------------------------------------------------------------------------- UNet tests


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
@pytest.mark.parametrize("optional", [False, True])
@torch.no_grad()
def test_unet_staged_forward_is_bit_exact(name, optional, seed):
    model = make_unet(name)
    staged = st.stage_denoiser(model)
    kw = unet_inputs(name, optional=optional, hw=(10, 14) if name == "nomid" else (16, 16))
    ref = reference(model, kw)
    assert_bit_equal(ref, staged.forward(**kw), seed)
    # return_dict is accepted and ignored; prepare + run + finish is the same thing.
    ctx = staged.prepare(**kw, return_dict=False)
    assert_bit_equal(ref, staged.finish(staged.run(ctx.initial_state, ctx), ctx), seed)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "nomid"])
@torch.no_grad()
def test_unet_controlnet_residuals_are_bit_exact(name, seed):
    model = make_unet(name)
    staged = st.stage_denoiser(model)
    kw = unet_inputs(name, hw=(10, 14) if name == "nomid" else (16, 16))
    down, mid = controlnet_residuals(staged, kw)
    kw.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    ref = reference(model, kw)
    out = staged.forward(**kw)
    assert_bit_equal(ref, out, seed)
    # the residuals matter (the test could not pass by ignoring them)
    kw.update(down_block_additional_residuals=None, mid_block_additional_residual=None)
    assert not torch.equal(staged.forward(**kw), out)


@torch.no_grad()
def test_unet_odd_latent_forces_upsample_size(seed):
    model = make_unet("sdxl")
    staged = st.stage_denoiser(model)
    kw = unet_inputs("sdxl", hw=(10, 6))  # not multiples of 2**num_upsamplers = 4
    assert staged.prepare(**kw).forward_upsample_size
    assert_bit_equal(reference(model, kw), staged.forward(**kw), seed)


@torch.no_grad()
def test_unet_freeu_is_bit_exact(seed):
    model = make_unet("sdxl")
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    staged = st.stage_denoiser(model)
    kw = unet_inputs("sdxl")
    out = staged.forward(**kw)
    assert_bit_equal(reference(model, kw), out, seed)
    model.disable_freeu()
    assert not torch.equal(staged.forward(**kw), out)


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_ip_adapter_is_bit_exact(name, seed):
    from hybridiff_rt.testing import add_ip_adapter

    model = add_ip_adapter(make_unet(name), seed % 1000, image_dim=16, tokens=4)
    staged = st.stage_denoiser(model)
    kw = unet_inputs(name)
    added = dict(kw.get("added_cond_kwargs") or {})
    kw["added_cond_kwargs"] = {**added, "image_embeds": [torch.randn(2, 1, 16)]}
    out = staged.forward(**kw)
    assert_bit_equal(reference(model, kw), out, seed)
    # the image tokens reach the cross-attention: other image embeddings, another prediction
    kw["added_cond_kwargs"] = {**added, "image_embeds": [torch.randn(2, 1, 16)]}
    assert not torch.equal(staged.forward(**kw), out)


@torch.no_grad()
def test_unet_mid_block_with_attention_is_bit_exact(seed):
    model = make_unet("misc")
    temb = model.time_embedding.linear_2.out_features
    model.mid_block = UNetMidBlock2D(
        in_channels=64, temb_channels=temb, num_layers=2, resnet_groups=8, attention_head_dim=16, add_attention=True
    ).eval()
    staged = st.stage_denoiser(model)
    assert [n for n in staged.unit_names if n.startswith("mid")] == ["mid.res0", "mid.attn0", "mid.attn1"]
    kw = unet_inputs("misc", optional=True)
    assert_bit_equal(reference(model, kw), staged.forward(**kw), seed)


def test_unet_unit_names_cut_inside_the_deepest_up_block():
    staged = st.stage_denoiser(make_unet("sdxl"))
    names = staged.unit_names
    assert len(set(names)) == len(names)
    assert names[0] == "conv_in" and names[-1] == "out"
    # SDXL's deepest up block (up0) has layers_per_block + 1 = 3 (resnet, transformer) pairs,
    # each its own unit, so a stage cut can fall between them.
    assert [n for n in names if n.startswith("up0.")] == ["up0.attn0", "up0.attn1", "up0.attn2", "up0.up"]
    assert names.index("mid.attn0") < names.index("up0.attn0")
    assert sum(n.startswith("down") and not n.endswith(".down") for n in names) == 6


@torch.no_grad()
def test_unet_state_holds_exactly_the_live_skips(seed):
    staged = st.stage_denoiser(make_unet("sdxl"))
    kw = unet_inputs("sdxl")
    ctx = staged.prepare(**kw)
    state = ctx.initial_state
    assert list(state) == ["sample"]
    produced, consumed = 0, 0
    for unit in staged.units:
        state = unit(state, ctx)
        if unit.name == "conv_in" or (unit.name.startswith("down")):
            produced += 1
        elif unit.name.startswith("up") and not unit.name.endswith(".up"):
            consumed += 1
        live = {skip_key(i) for i in range(produced - consumed)}
        expected = live if produced and unit.name.startswith(("conv_in", "down")) else live | {"hidden"}
        if unit.name == "out":
            expected = {"sample"}
        assert set(state) == expected, unit.name
    assert produced == staged.num_skips == consumed


@pytest.mark.parametrize("family", ["unet", "sd3"])
@torch.no_grad()
def test_layouts_depend_only_on_shapes(family, seed):
    """Same shapes, different values (and with/without optional inputs) -> same cut layouts."""
    if family == "unet":
        staged = st.stage_denoiser(make_unet("sdxl"))
        kws = [unet_inputs("sdxl"), unet_inputs("sdxl", optional=True)]
        down, mid = controlnet_residuals(staged, kws[0])
        kws.append(dict(unet_inputs("sdxl"), down_block_additional_residuals=down, mid_block_additional_residual=mid))
    else:
        staged = st.stage_denoiser(make_sd3("sd35"))
        kws = [sd3_inputs("sd35"), sd3_inputs("sd35", optional=True)]
    layouts = []
    for kw in kws:
        ctx = staged.prepare(**kw)
        state, per_unit = ctx.initial_state, [st.state_layout(ctx.initial_state)]
        for unit in staged.units:
            state = unit(state, ctx)
            per_unit.append(st.state_layout(state))
        layouts.append(per_unit)
    assert all(lay == layouts[0] for lay in layouts[1:])


@pytest.mark.parametrize("family", ["unet", "sd3"])
@torch.no_grad()
def test_units_leave_their_input_state_untouched(family, seed):
    if family == "unet":
        staged, kw = st.stage_denoiser(make_unet("sd15")), unet_inputs("sd15")
    else:
        staged, kw = st.stage_denoiser(make_sd3("sd3")), sd3_inputs("sd3")
    ctx = staged.prepare(**kw)
    state = ctx.initial_state
    for unit in staged.units:
        before = {k: v.clone() for k, v in state.items()}
        keys = list(state)
        new = unit(state, ctx)
        assert new is not state and list(state) == keys, unit.name
        assert all(torch.equal(before[k], state[k]) for k in keys), unit.name
        state = new


@pytest.mark.parametrize("family", ["unet", "sd3"])
@torch.no_grad()
def test_state_shipped_across_a_cut_gives_the_same_prediction(family, seed):
    """Every cut: flatten, copy into fresh buffers by layout, unflatten, finish the run."""
    if family == "unet":
        model = make_unet("sdxl")
        kw = unet_inputs("sdxl", optional=True)
    else:
        model = make_sd3("sd35")
        kw = sd3_inputs("sd35", optional=True)
    staged = st.stage_denoiser(model)
    ref = reference(model, kw)
    ctx = staged.prepare(**kw)
    for cut in range(len(staged.units) + 1):
        head = staged.run(ctx.initial_state, ctx, 0, cut)
        names, tensors = st.flatten_state(head)
        assert list(names) == sorted(names)
        buffers = st.empty_state_like(st.state_layout(head), "cpu")
        for (n, b), t in zip(buffers.items(), tensors):
            b.copy_(t)
        received = st.unflatten_state(list(buffers), list(buffers.values()))
        ctx2 = staged.prepare(**kw)  # the receiver prepares its own context
        out = staged.finish(staged.run(received, ctx2, cut, len(staged.units)), ctx2)
        assert_bit_equal(ref, out, seed)


def test_state_helpers_roundtrip_and_validate():
    state = {"skip01": torch.zeros(2, 3), "hidden": torch.ones(1, dtype=torch.float16), "skip00": torch.zeros(4)}
    names, tensors = st.flatten_state(state)
    assert names == ("hidden", "skip00", "skip01")
    back = st.unflatten_state(reversed(names), list(reversed(tensors)))
    assert list(back) == list(names) and all(back[n] is state[n] for n in names)
    assert st.state_nbytes(state) == 2 * 3 * 4 + 2 + 4 * 4
    layout = st.state_layout(state)
    assert [s.name for s in layout] == list(names) and layout[0].dtype == "float16"
    assert sum(s.nbytes for s in layout) == st.state_nbytes(state)
    with pytest.raises(ShapeError, match="names"):
        st.unflatten_state(["a", "b"], [torch.zeros(1)])
    with pytest.raises(ShapeError, match="repeated"):
        st.unflatten_state(["a", "a"], [torch.zeros(1)] * 2)


def test_run_rejects_out_of_range_slices():
    staged = st.stage_denoiser(make_sd3("sd3"))
    with pytest.raises(ShapeError, match="outside"):
        staged.run({}, None, 2, 1)
    with pytest.raises(ShapeError, match="outside"):
        staged.run({}, None, 0, len(staged.units) + 1)


# ------------------------------------------------------------------------------ UNet refusals


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel and SD3Transformer2DModel"):
        st.stage_denoiser(torch.nn.Linear(2, 2))


def test_unsupported_unet_block_type_is_refused():
    cfg = dict(UNET_BASE, down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D"))
    match = "ResnetDownsampleBlock2D.*supports DownBlock2D, CrossAttnDownBlock2D"
    with pytest.raises(UnsupportedModelError, match=match):
        st.stage_denoiser(UNet2DConditionModel(**cfg))


def test_wrapped_or_overridden_forward_is_refused():
    class MyUNet(UNet2DConditionModel):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(UnsupportedModelError, match="overrides forward"):
        st.stage_denoiser(MyUNet(**UNET_BASE))
    model = make_unet("sd15")
    model.forward = lambda *a, **k: None
    with pytest.raises(UnsupportedModelError, match="hook"):
        st.stage_denoiser(model)
    model = make_unet("sd15")
    model.register_forward_hook(lambda *a: None)
    with pytest.raises(UnsupportedModelError, match="forward .*hooks"):
        st.stage_denoiser(model)


@torch.no_grad()
def test_unet_unsupported_or_wrong_inputs_are_refused(seed):
    staged = st.stage_denoiser(make_unet("sd15"))
    kw = unet_inputs("sd15")
    down, mid = controlnet_residuals(staged, kw)
    with pytest.raises(UnsupportedModelError, match="T2I-Adapter"):
        staged.prepare(**kw, down_intrablock_additional_residuals=down)
    with pytest.raises(UnsupportedModelError, match="legacy T2I-Adapter"):
        staged.prepare(**kw, down_block_additional_residuals=down)
    with pytest.raises(ShapeError, match="one residual per skip"):
        staged.prepare(**kw, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


# ---------------------------------------------------------------------------- SD3 / MMDiT tests

SD3_CONFIGS = {
    "sd3": dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=16,
    ),
    # SD3.5-medium-like: qk RMS norm and dual attention in the first blocks; 16 latent channels.
    "sd35": dict(
        sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=24, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1),
    ),
    # SD3.5-large-like: qk norm without dual attention, out_channels from in_channels, patch 1.
    "sd35l": dict(
        sample_size=8, patch_size=1, in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=16, caption_projection_dim=24, pooled_projection_dim=12, out_channels=None,
        pos_embed_max_size=16, qk_norm="rms_norm",
    ),
}


def make_sd3(name: str) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**SD3_CONFIGS[name]).eval()


def sd3_inputs(name: str, batch: int = 2, hw: tuple[int, int] = (8, 12), optional: bool = False) -> dict:
    cfg = SD3_CONFIGS[name]
    kw = dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], *hw),
        encoder_hidden_states=torch.randn(batch, 5, cfg["joint_attention_dim"]),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"]),
        timestep=torch.rand(batch) * 1000,
    )
    if optional:
        inner = cfg["attention_head_dim"] * cfg["num_attention_heads"]
        tokens = hw[0] * hw[1] // cfg["patch_size"] ** 2
        kw["block_controlnet_hidden_states"] = [torch.randn(batch, tokens, inner) for _ in range(2)]
        kw["joint_attention_kwargs"] = {"scale": 1.0}
        kw["skip_layers"] = [1]
    return kw


@pytest.mark.parametrize("name", list(SD3_CONFIGS))
@pytest.mark.parametrize("optional", [False, True])
@torch.no_grad()
def test_sd3_staged_forward_is_bit_exact(name, optional, seed):
    model = make_sd3(name)
    staged = st.stage_denoiser(model)
    n = SD3_CONFIGS[name]["num_layers"]
    assert staged.unit_names == ["pos_embed"] + [f"blocks.{i}" for i in range(n)] + ["out"]
    kw = sd3_inputs(name, optional=optional)
    assert_bit_equal(reference(model, kw), staged.forward(**kw), seed)


@torch.no_grad()
@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_sd3_ip_adapter_is_bit_exact(name, seed):
    from hybridiff_rt.testing import add_ip_adapter

    model = add_ip_adapter(make_sd3(name), seed % 1000, image_dim=16, tokens=4)
    staged = st.stage_denoiser(model)
    kw = sd3_inputs(name)
    kw["joint_attention_kwargs"] = {"ip_adapter_image_embeds": torch.randn(2, 3, 16)}
    shared = dict(kw["joint_attention_kwargs"])
    out = staged.forward(**kw)
    # the caller's dict is left as it was (the model's forward works on a copy as well)
    assert kw["joint_attention_kwargs"].keys() == shared.keys()
    assert kw["joint_attention_kwargs"]["ip_adapter_image_embeds"] is shared["ip_adapter_image_embeds"]
    assert_bit_equal(reference(model, kw), out, seed)
    # the image tokens reach the joint attention: other image embeddings, another prediction
    kw["joint_attention_kwargs"] = {"ip_adapter_image_embeds": torch.randn(2, 3, 16)}
    assert not torch.equal(staged.forward(**kw), out)


@torch.no_grad()
def test_sd3_optional_inputs_matter_and_last_layer_skip_is_exact(seed):
    model = make_sd3("sd35")
    staged = st.stage_denoiser(model)
    kw = sd3_inputs("sd35")
    plain = staged.forward(**kw)
    one_controlnet = sd3_inputs("sd35", optional=True)["block_controlnet_hidden_states"][:1]
    for extra in (dict(skip_layers=[3]), dict(skip_layers=[0, 2]), dict(block_controlnet_hidden_states=one_controlnet)):
        kwx = dict(kw, **extra)
        out = staged.forward(**kwx)
        assert_bit_equal(reference(model, kwx), out, seed)
        assert not torch.equal(out, plain), extra


@torch.no_grad()
def test_sd3_state_names_and_shapes(seed):
    cfg = SD3_CONFIGS["sd3"]
    staged = st.stage_denoiser(make_sd3("sd3"))
    kw = sd3_inputs("sd3", batch=1, hw=(8, 12))
    ctx = staged.prepare(**kw)
    assert set(ctx.initial_state) == {"sample", "encoder"}
    state = staged.run(ctx.initial_state, ctx, 0, 1)
    d = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {"hidden": (1, 24, d), "encoder": (1, 5, d)}
    state = staged.run(state, ctx, 1, len(staged.units) - 1)
    assert set(state) == {"hidden"}  # the last block is context_pre_only
    assert staged.finish(staged.run(state, ctx, len(staged.units) - 1), ctx).shape == (1, 4, 8, 12)
    with pytest.raises(ShapeError, match="after the last unit"):
        staged.finish(state, ctx)


def test_sd3_unknown_block_is_refused():
    model = make_sd3("sd3")
    model.transformer_blocks[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="JointTransformerBlock"):
        st.stage_denoiser(model)
