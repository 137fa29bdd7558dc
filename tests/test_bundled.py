"""The bundled digit models load from the package offline and run end to end in stock pipelines."""

from __future__ import annotations

import json
import math
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import hybridiff_rt.demo.bundled as B


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module", autouse=True)
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def test_model_names_resolve_to_their_folders_and_unknown_names_are_refused():
    classes = {"unet": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
    assert set(B.MODELS) == set(classes)
    for name, cls_name in classes.items():
        index = json.loads((B.weights_path(name) / "model_index.json").read_text())
        assert index["_class_name"] == cls_name
    assert B.weights_path("sdxl") == B.weights_path("unet") != B.weights_path("sd3")
    for bad in ("sd15", "SDXL", ""):
        with pytest.raises(ValueError, match=r"unknown bundled model .*expected one of"):
            B.load_pipeline(bad)
        with pytest.raises(ValueError, match="unknown bundled model"):
            B.weights_path(bad)


@pytest.mark.parametrize("name", B.MODELS)
def test_each_prompt_ends_with_the_token_of_its_label_for_both_tokenizers(name):
    """PROMPTS[i] asks for digit LABELS[i] in the shipped vocabularies, within the token limit."""
    from transformers import CLIPTokenizer

    assert len(B.PROMPTS) == len(B.LABELS) == 10
    for folder in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(B.weights_path(name) / folder, local_files_only=True)
        last = []
        for prompt, label in zip(B.PROMPTS, B.LABELS):
            ids = tok(prompt).input_ids
            assert len(ids) <= tok.model_max_length, (folder, prompt)
            assert tok.unk_token_id not in ids[1:-1], (folder, prompt)  # every word is known
            last.append(tok.convert_ids_to_tokens(ids)[-2])  # the word before <|endoftext|>
        assert last == [f"{label}</w>" for label in B.LABELS], (folder, last)


def test_shipped_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    files = list(B.WEIGHTS_DIR.rglob("*"))
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert total < 8 * 2 ** 20, f"bundled weights take {total / 2 ** 20:.1f} MiB"
    st = [f for f in files if f.suffix == ".safetensors"]
    assert len(st) == 9  # 2 x (denoiser, vae, 2 text encoders) + classifier
    for f in st:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert h.get_slice(k).get_dtype() in ("F16", "I64"), (f, k)
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".ckpt")]


def _denoiser_batch_sizes(pipe):
    """Record the batch size of every denoiser call: ``(sizes, hook_handle)``."""
    sizes = []
    den = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        sizes.append(x.shape[0])

    return sizes, den.register_forward_pre_hook(pre_hook, with_kwargs=True)


@pytest.mark.parametrize("name,cls_name,denoiser", [
    ("unet", "StableDiffusionXLPipeline", "UNet2DConditionModel"),
    ("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel"),
])
def test_pipeline_runs_end_to_end_offline(name, cls_name, denoiser):
    pipe = B.load_pipeline(name)
    assert type(pipe).__name__ == cls_name
    den = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    assert type(den).__name__ == denoiser and den.dtype == torch.float32
    sizes, h = _denoiser_batch_sizes(pipe)
    kw = dict(B.DEFAULTS[name], num_inference_steps=4)
    try:
        out = pipe(prompt=list(B.PROMPTS[:3]), output_type="pt",
                   generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw).images
    finally:
        h.remove()
    assert out.shape == (3, 1, kw["height"], kw["width"])
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05  # not a blank image
    assert sizes == [6] * 4  # CFG doubles the batch: [uncond; cond]
    # same seeds, same images (deterministic)
    pil = pipe(prompt=B.PROMPTS[3], generator=torch.Generator().manual_seed(0),
               **dict(kw, num_inference_steps=2)).images
    assert len(pil) == 1 and pil[0].size == (kw["width"], kw["height"]) and pil[0].mode == "L"


def test_sd3_robust_to_zero_t5_token_count():
    """No T5: the pipeline appends max_sequence_length zero tokens; 8 and 256 give ~same output.

    (At 50 steps, 30 images: about 35 dB PSNR between the two, same classifier accuracy.)"""
    pipe = B.load_pipeline("sd3")
    kw = dict(B.DEFAULTS["sd3"], num_inference_steps=6)
    outs = []
    for n in (8, 256):
        kw["max_sequence_length"] = n
        outs.append(pipe(prompt=list(B.PROMPTS[:2]), output_type="pt",
                         generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images)
    from hybridiff_rt.demo.quality import psnr

    assert psnr(outs[0], outs[1]) > 25.0
    assert (outs[0] - outs[1]).abs().mean() < 0.03


def test_tokenizer_reloads_from_folder_and_is_whole_word():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(B.weights_path("unet") / "tokenizer", local_files_only=True)
    assert tok.model_max_length == 8
    ids = tok("a handwritten digit 7", padding="max_length", max_length=8).input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:5] == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "7</w>"]


def test_classifier_recognises_real_digits():
    from hybridiff_rt.demo.bundled.data import train_test_split

    _, _, x_test, y_test = train_test_split()
    clf = B.load_classifier()
    acc = (clf.predict(x_test) == y_test).double().mean().item()
    assert acc > 0.95, acc
    feats = clf.features(x_test[:5])
    assert feats.shape == (5, 64) and torch.isfinite(feats).all()
    # the quality module reads [0, 1] images and reaches the same answer
    from hybridiff_rt.demo.quality import classifier_accuracy

    assert classifier_accuracy((x_test + 1) / 2, y_test) == pytest.approx(acc)


def test_sd3_training_processor_equals_repeated_tokens():
    """Training trick: one zero token with a log(n) logit bias == n zero tokens (exactly)."""
    from hybridiff_rt.demo.bundled import components as C
    from hybridiff_rt.demo.bundled.train import _RepeatedTokenJointAttnProcessor

    torch.manual_seed(0)
    m = C.build_sd3_transformer().eval()
    x, emb, pool = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 64), torch.randn(2, 64)
    t = torch.tensor([200.0, 800.0])
    with torch.no_grad():
        ref = m(hidden_states=x, encoder_hidden_states=torch.cat([emb, torch.zeros(2, 37, 64)], 1),
                pooled_projections=pool, timestep=t).sample
        proc = _RepeatedTokenJointAttnProcessor()
        m.set_attn_processor(proc)
        proc.log_n = torch.full((2,), math.log(37))
        got = m(hidden_states=x, encoder_hidden_states=torch.cat([emb, torch.zeros(2, 1, 64)], 1),
                pooled_projections=pool, timestep=t).sample
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_training_code_smoke(tmp_path):
    """The training entry points run (a few steps on a few digits) and write loadable pipelines."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from hybridiff_rt.demo.bundled import train as T

    det, nthreads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        _smoke(T, tmp_path, StableDiffusionXLPipeline, StableDiffusion3Pipeline)
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(nthreads)


def _smoke(T, tmp_path, StableDiffusionXLPipeline, StableDiffusion3Pipeline):
    T.train_vae(tmp_path, steps=1, batch=4, limit=32, threads=1)
    for kind, cls in (("unet", StableDiffusionXLPipeline), ("sd3", StableDiffusion3Pipeline)):
        T.train_diffusion(kind, tmp_path, steps=1, batch=4, limit=32, threads=1)
        folder = tmp_path / T.FOLDERS[kind]
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls.__name__
        extra = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
        pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **extra)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt="a handwritten digit 1", num_inference_steps=1, height=32, width=32,
                   output_type="pt").images
        assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", B.MODELS)
def test_guidance_makes_samples_follow_the_prompt(name):
    """The trained models need CFG: accuracy at w = 5 is high and above w = 1 (20 images each)."""
    from hybridiff_rt.demo.measure import DiscrepancyRecorder
    from hybridiff_rt.demo.quality import classifier_accuracy

    pipe = B.load_pipeline(name)
    clf = B.load_classifier()
    labels = list(B.LABELS) * 2
    acc = {}
    for w in (1.0, 5.0):
        kw = dict(B.DEFAULTS[name], num_inference_steps=25, guidance_scale=w)
        gens = [torch.Generator().manual_seed(100 * s + d) for s in range(2) for d in range(10)]
        with DiscrepancyRecorder(pipe, 20) as rec:
            imgs = pipe(prompt=list(B.PROMPTS) * 2, generator=gens, output_type="pt", **kw).images
        acc[w] = classifier_accuracy(imgs, labels, clf)
        if w > 1:
            assert len(rec.values) == 25 and all(v.shape == (20,) for v in rec.values)
            m = torch.tensor([float(v.mean()) for v in rec.values])
            assert torch.isfinite(m).all() and (m > 0).all() and (m < 1).all()
    assert acc[5.0] >= 0.9 and acc[5.0] >= acc[1.0] + 0.2, acc
