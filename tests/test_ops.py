"""Tests of hybridiff_rt.ops: the torch reference, the Triton kernel (interpreter / GPU), dispatch.

Three groups:
  * reference and API tests, run in this process (CPU);
  * Triton-interpreter tests (``INTERP``): they need TRITON_INTERPRET=1 set before triton is
    imported, so :func:`test_interpreter_suite` re-runs this file in a subprocess with the
    variable set (they also run directly when the whole session has TRITON_INTERPRET=1);
  * GPU tests (``@pytest.mark.gpu``): compiled kernel against the reference, skipped without CUDA.

Inputs are fresh random tensors; each test prints its seed on failure.

Tolerances (where bit equality is not promised):
  * stats vs an exactly rounded sum (math.fsum over the float32 |d| and |u|): relative 1e-6 for
    the reference (halving trees of depth <= 12 over non-negative terms: error <= 13 * 2**-24 of
    the sum) and 1e-5 for the kernel (tl.sum's order inside a block is not specified; bound
    chosen loose for blocks up to 4096 elements).
  * guidance_rescale vs diffusers' rescale_noise_cfg: float32 rtol 1e-5 (std computed in a
    different order), float16/bfloat16 4 * eps(dtype) relative (diffusers rounds five
    intermediates to the dtype, we keep them in float32; 200 random seeds x 3 factors gave at
    most 2.0 * eps).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from hybridiff_rt import ops
from hybridiff_rt.errors import ShapeError
from hybridiff_rt.ops import cfg_triton, reference

INTERP = cfg_triton.interpret_requested()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
CUDA = torch.cuda.is_available()

needs_interp = pytest.mark.skipif(
    not INTERP, reason="needs TRITON_INTERPRET=1 at process start; run by test_interpreter_suite")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def pair(shape, dtype, seed, device="cpu", scale_c=1.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float32)
    c = u + scale_c * torch.randn(shape, generator=g, dtype=torch.float32)
    return u.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


def exact_stats(u: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """Exactly rounded [sum|c - u|, sum|u|] of the float32 differences (math.fsum)."""
    u32 = u.detach().cpu().reshape(-1).float()
    d = c.detach().cpu().reshape(-1).float() - u32
    return (math.fsum(d.abs().double().tolist()), math.fsum(u32.abs().double().tolist()))


def assert_stats_close(stats, u, c, rtol, msg):
    want = exact_stats(u, c)
    got = stats.detach().cpu().double().tolist()
    for g, w in zip(got, want):
        assert abs(g - w) <= rtol * w + 1e-30, f"{msg}: stats {got} vs exact {want}"


def guided_exact64(u, c, w):
    u64, c64 = u.double(), c.double()
    return u64 + w * (c64 - u64)


# ------------------------------------------------------------------------------ reference
SHAPES = [(), (1,), (7,), (3, 5, 7), (2, 4, 33, 17), (4097,), (1, 4, 64, 65)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_against_exact(shape, dtype):
    seed = fresh_seed()
    u, c = pair(shape, dtype, seed)
    w = 5.0 + (seed % 1000) / 1000.0
    guided, stats = reference.cfg_combine_reference(u, c, w)
    msg = f"seed={seed} shape={shape} dtype={dtype}"
    assert guided.shape == u.shape and guided.dtype == dtype, msg
    assert stats.dtype == torch.float32 and stats.shape == (2,), msg
    assert_stats_close(stats, u, c, 1e-6, msg)
    # guided: float32 arithmetic (two roundings, error <= 2 ulp32 of the terms) then one dtype
    # rounding (half an ulp of the dtype).
    exact = guided_exact64(u, c, w)
    ulp_dtype = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    terms = u.double().abs() + abs(w) * (c.double() - u.double()).abs()
    bound = 0.5 * ulp_dtype + 4 * 2.0 ** -24 * terms
    assert bool(((guided.double() - exact).abs() <= bound).all()), msg


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_reference_float32_formula_bit_exact(dtype):
    """The documented arithmetic: float32 u + w*(c - u), each op rounded, then one cast."""
    seed = fresh_seed()
    u, c = pair((3, 129), dtype, seed)
    w = 7.5
    guided, _ = reference.cfg_combine_reference(u, c, w)
    u32, c32 = u.float(), c.float()
    d = c32 - u32
    want = (u32 + (d * torch.tensor(w, dtype=torch.float32))).to(dtype)
    assert torch.equal(guided, want), f"seed={seed}"


@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (131072,), (3, 4, 160, 161)], ids=str)
def test_reference_stats_thread_count_invariant(shape):
    """Same input, 1 thread vs 2 threads: bit-identical stats (and guided). At these sizes a
    plain torch.sum differs between 1 and 2 threads in about half of random inputs."""
    seed = fresh_seed()
    u, c = pair(shape, torch.float32, seed)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1, s1 = reference.cfg_combine_reference(u, c, 5.0)
        torch.set_num_threads(2)
        g2, s2 = reference.cfg_combine_reference(u, c, 5.0)
        s3 = reference.discrepancy_stats_reference(u, c)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(s1, s2) and torch.equal(s1, s3), f"seed={seed}: {s1.tolist()} {s2.tolist()}"
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_stats_run_to_run_identical_and_fresh_inputs_differ(dtype):
    seed = fresh_seed()
    u, c = pair((2, 4, 40, 41), dtype, seed)
    runs = [ops.discrepancy_stats(u, c) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), f"seed={seed}"
    _, stats = ops.cfg_combine(u, c, 3.0)
    assert torch.equal(stats, runs[0]), "cfg_combine and discrepancy_stats must agree bit for bit"
    u2, c2 = pair((2, 4, 40, 41), dtype, seed + 1)
    assert not torch.equal(ops.discrepancy_stats(u2, c2), runs[0])


def test_dispatch_cpu_uses_reference(monkeypatch):
    if INTERP:
        pytest.skip("the session runs with TRITON_INTERPRET=1 (CPU dispatch goes to the interpreter)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seed = fresh_seed()
    u, c = pair((2, 3, 17), torch.float16, seed)
    assert ops.backend(u) == "reference"
    g1, s1 = ops.cfg_combine(u, c, 4.0)
    g2, s2 = reference.cfg_combine_reference(u, c, 4.0)
    assert torch.equal(g1, g2) and torch.equal(s1, s2)


# ------------------------------------------------------------------------------ rel_mae
@pytest.mark.parametrize("stats, want", [
    ((3.0, 2.0), 1.5),
    ((0.0, 5.0), 0.0),
    ((0.0, 0.0), math.nan),
    ((2.0, 0.0), math.inf),
    ((math.nan, 1.0), math.nan),
    ((math.inf, 1.0), math.inf),
    ((math.inf, math.inf), math.nan),
    ((1.0, math.inf), 0.0),
])
def test_rel_mae_values(stats, want):
    for form in (stats, torch.tensor(stats, dtype=torch.float32)):
        got = ops.rel_mae(form)
        assert isinstance(got, float)
        assert (math.isnan(got) and math.isnan(want)) or got == want, (form, got)


def test_rel_mae_equals_mean_ratio():
    seed = fresh_seed()
    u, c = pair((2, 4, 33, 17), torch.float32, seed)
    su, sc = exact_stats(u, c)
    m = ops.rel_mae(ops.discrepancy_stats(u, c))
    want = (su / u.numel()) / (sc / u.numel())
    assert abs(m - want) <= 2e-6 * want, f"seed={seed}"


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 1), (1.0,), (1.0, 2.0, 3.0)], ids=str)
def test_rel_mae_rejects_wrong_shape(bad):
    with pytest.raises(ShapeError, match="2"):
        ops.rel_mae(bad)


def test_rel_mae_of_zero_uncond_is_inf_and_zero_zero_is_nan():
    z = torch.zeros(4, 5)
    assert math.isnan(ops.rel_mae(ops.discrepancy_stats(z, z)))
    assert ops.rel_mae(ops.discrepancy_stats(z, z + 1)) == math.inf


# ------------------------------------------------------------------------------ validation
def _bad_calls():
    u = torch.randn(2, 3)
    return [
        ("shape", lambda: ops.cfg_combine(u, torch.randn(3, 2), 1.0), "shape"),
        ("broadcast", lambda: ops.cfg_combine(u, torch.randn(1, 3), 1.0), "shape"),
        ("dtype", lambda: ops.cfg_combine(u, u.half(), 1.0), "dtype"),
        ("float64", lambda: ops.cfg_combine(u.double(), u.double(), 1.0), "float64"),
        ("int", lambda: ops.cfg_combine(u.int(), u.int(), 1.0), "int32"),
        ("device", lambda: ops.cfg_combine(u, u.to("meta"), 1.0), "device|meta"),
        ("not tensor", lambda: ops.cfg_combine(u.tolist(), u, 1.0), "torch.Tensor"),
        ("scale nan", lambda: ops.cfg_combine(u, u, math.nan), "finite"),
        ("scale bool", lambda: ops.cfg_combine(u, u, True), "float"),
        ("scale tensor", lambda: ops.cfg_combine(u, u, torch.tensor(2.0)), "float"),
        ("out shape", lambda: ops.cfg_combine(u, u, 1.0, out=torch.empty(3, 2)), "out"),
        ("out dtype", lambda: ops.cfg_combine(u, u, 1.0, out=torch.empty(2, 3).half()), "out"),
        ("out noncontig", lambda: ops.cfg_combine(u, u, 1.0, out=torch.empty(3, 2).t()), "contiguous"),
        ("rescale 1d", lambda: ops.cfg_combine(u[0], u[0], 1.0, guidance_rescale=0.7), "ndim"),
        ("rescale inf", lambda: ops.cfg_combine(u, u, 1.0, guidance_rescale=math.inf), "finite"),
        ("stats shape", lambda: ops.discrepancy_stats(u, u[:1]), "shape"),
        ("stats dtype", lambda: ops.discrepancy_stats(u, u.bfloat16()), "dtype"),
    ]


@pytest.mark.parametrize("name, call, pattern", _bad_calls(), ids=[b[0] for b in _bad_calls()])
def test_clear_errors(name, call, pattern):
    with pytest.raises(ShapeError, match=pattern):
        call()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_non_contiguous_inputs_are_copied_once(dtype):
    seed = fresh_seed()
    u, c = pair((6, 5, 4), dtype, seed)
    ut, ct = u.transpose(0, 2), c.transpose(0, 2)
    assert not ut.is_contiguous()
    g1, s1 = ops.cfg_combine(ut, ct, 5.0)
    g2, s2 = ops.cfg_combine(ut.contiguous(), ct.contiguous(), 5.0)
    assert torch.equal(g1, g2) and torch.equal(s1, s2), f"seed={seed}"
    assert g1.shape == ut.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_out_buffer_and_in_place(dtype):
    seed = fresh_seed()
    u, c = pair((2, 3, 11), dtype, seed)
    want, want_stats = ops.cfg_combine(u, c, 6.0)
    out = torch.empty_like(u)
    got, stats = ops.cfg_combine(u, c, 6.0, out=out)
    assert got is out and torch.equal(out, want) and torch.equal(stats, want_stats)
    for which in ("uncond", "cond"):
        uu, cc = u.clone(), c.clone()
        target = uu if which == "uncond" else cc
        got, stats = ops.cfg_combine(uu, cc, 6.0, out=target)
        assert got is target and torch.equal(target, want), which
        assert torch.equal(stats, want_stats), which


def test_empty_tensor():
    u = torch.empty(2, 0, 3)
    guided, stats = ops.cfg_combine(u, u, 5.0)
    assert guided.shape == (2, 0, 3)
    assert stats.tolist() == [0.0, 0.0]
    assert math.isnan(ops.rel_mae(stats))


def test_nonfinite_inputs_give_nonfinite_stats():
    u, c = pair((5, 7), torch.float32, fresh_seed())
    c[2, 3] = math.nan
    _, stats = ops.cfg_combine(u, c, 2.0)
    assert math.isnan(stats[0].item()) and math.isfinite(stats[1].item())
    assert math.isnan(ops.rel_mae(stats))


# ------------------------------------------------------------------------------ rescale
@pytest.fixture(scope="module")
def diffusers_rescale():
    mod = pytest.importorskip("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    return mod.rescale_noise_cfg


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("rescale", [0.7, 1.0, 0.25])
def test_guidance_rescale_matches_diffusers(diffusers_rescale, dtype, rescale):
    seed = fresh_seed()
    u, c = pair((2, 4, 24, 23), dtype, seed, scale_c=0.3)
    w = 7.0
    plain, plain_stats = ops.cfg_combine(u, c, w)
    got, stats = ops.cfg_combine(u, c, w, guidance_rescale=rescale)
    assert torch.equal(stats, plain_stats)  # stats are of the branches, not of the rescale
    want = diffusers_rescale(plain, c, guidance_rescale=rescale)
    assert got.dtype == dtype and got.shape == u.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")
    else:
        ulp = torch.finfo(dtype).eps
        err = (got.double() - want.double()).abs()
        bound = 4 * ulp * want.double().abs() + 4 * ulp * torch.finfo(dtype).tiny
        assert bool((err <= bound).all()), f"seed={seed}: max err {err.max().item()}"
    # and not a test that cannot fail: rescaling really changed the output
    assert not torch.equal(got, plain)


def test_guidance_rescale_zero_is_plain_and_deterministic_across_threads():
    seed = fresh_seed()
    u, c = pair((2, 4, 90, 91), torch.float32, seed)
    plain, _ = ops.cfg_combine(u, c, 5.0)
    g0, _ = ops.cfg_combine(u, c, 5.0, guidance_rescale=0.0)
    assert torch.equal(plain, g0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g1, _ = ops.cfg_combine(u, c, 5.0, guidance_rescale=0.7)
        torch.set_num_threads(2)
        g2, _ = ops.cfg_combine(u, c, 5.0, guidance_rescale=0.7)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(g1, g2), f"seed={seed}"


def test_guidance_rescale_in_place_on_cond():
    seed = fresh_seed()
    u, c = pair((2, 3, 8, 8), torch.float32, seed)
    want, _ = ops.cfg_combine(u, c, 5.0, guidance_rescale=0.7)
    cc = c.clone()
    got, _ = ops.cfg_combine(u, cc, 5.0, guidance_rescale=0.7, out=cc)
    assert got is cc and torch.equal(cc, want)


# ------------------------------------------------------------------------------ interpreter
def test_interpreter_suite():
    """Run this file's Triton-interpreter tests in a subprocess with TRITON_INTERPRET=1."""
    if INTERP:
        pytest.skip("already running under TRITON_INTERPRET=1: the interpreter tests run directly")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interp_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 30 and "skipped" not in summary, tail


INTERP_CASES = [
    # shape, block: 1 element, odd sizes, exactly one block, multi-block with a ragged tail
    ((), None),
    ((1,), None),
    ((7,), 16),
    ((3, 5, 7), 32),
    ((1024,), None),
    ((2, 4, 33, 17), 256),
    ((2049,), None),
    ((1, 4, 32, 33), 512),
]


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape, block", INTERP_CASES, ids=[f"{s}-{b}" for s, b in INTERP_CASES])
def test_interp_kernel_matches_reference(shape, block, dtype):
    seed = fresh_seed()
    msg = f"seed={seed} shape={shape} block={block} dtype={dtype}"
    u, c = pair(shape, dtype, seed)
    w = 4.0 + (seed % 997) / 997.0
    g_ref, s_ref = reference.cfg_combine_reference(u, c, w)
    g1, s1 = cfg_triton.cfg_combine_triton(u, c, w, block=block)
    g2, s2 = cfg_triton.cfg_combine_triton(u, c, w, block=block)
    s3 = cfg_triton.discrepancy_stats_triton(u, c, block=block)
    assert torch.equal(g1, g_ref), msg  # bit for bit in every dtype
    assert torch.equal(s1, s2) and torch.equal(g1, g2), msg  # run to run
    assert torch.equal(s1, s3), msg  # stats-only form: same order, same bits
    assert_stats_close(s1, u, c, 1e-5, msg)
    torch.testing.assert_close(s1, s_ref, rtol=1e-5, atol=0, msg=msg)


@needs_interp
def test_interp_dispatch_uses_interpreter():
    seed = fresh_seed()
    u, c = pair((3, 50), torch.bfloat16, seed)
    assert ops.backend(u) == "triton-interpret"
    g, s = ops.cfg_combine(u, c, 5.0)
    g_k, s_k = cfg_triton.cfg_combine_triton(u, c, 5.0)
    assert torch.equal(g, g_k) and torch.equal(s, s_k)
    assert torch.equal(ops.discrepancy_stats(u, c), s_k)


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_interp_masking_loads_and_stores(dtype):
    """Inputs are prefixes of buffers with a NaN tail, out a prefix of a sentinel buffer: an
    unmasked load would turn the stats into NaN, an unmasked store would hit the sentinel."""
    seed = fresh_seed()
    n, extra = 300, 77
    g = torch.Generator().manual_seed(seed)
    ubuf = torch.full((n + extra,), math.nan).to(dtype)
    cbuf = torch.full((n + extra,), math.nan).to(dtype)
    ubuf[:n] = torch.randn(n, generator=g).to(dtype)
    cbuf[:n] = torch.randn(n, generator=g).to(dtype)
    obuf = torch.full((n + extra,), 7.0, dtype=dtype)
    u, c, out = ubuf[:n].view(10, 30), cbuf[:n].view(10, 30), obuf[:n].view(10, 30)
    guided, stats = cfg_triton.cfg_combine_triton(u, c, 3.0, out=out, block=128)
    assert guided is out
    assert bool(torch.isfinite(stats).all()), f"seed={seed}: {stats.tolist()}"
    assert bool((obuf[n:] == 7.0).all()), f"seed={seed}"
    g_ref, s_ref = reference.cfg_combine_reference(u, c, 3.0)
    assert torch.equal(out, g_ref)
    torch.testing.assert_close(stats, s_ref, rtol=1e-5, atol=0)


@needs_interp
def test_interp_finalize_loop_over_many_partials():
    """More partials than lanes of the final reduction (its loop runs several times)."""
    seed = fresh_seed()
    u, c = pair((1000,), torch.float32, seed)
    s1 = cfg_triton.discrepancy_stats_triton(u, c, block=16, finalize_block=16)  # 63 partials
    s2 = cfg_triton.discrepancy_stats_triton(u, c, block=16, finalize_block=16)
    assert torch.equal(s1, s2)
    assert_stats_close(s1, u, c, 1e-5, f"seed={seed}")


@needs_interp
def test_interp_default_large_block_config():
    """Above 2**18 elements the launch config switches to 4096-element blocks."""
    seed = fresh_seed()
    n = (1 << 18) + 4097
    assert cfg_triton.launch_config(n)[0] == 4096
    u, c = pair((n,), torch.float16, seed)
    g_ref, s_ref = reference.cfg_combine_reference(u, c, 5.0)
    g, s = cfg_triton.cfg_combine_triton(u, c, 5.0)
    assert torch.equal(g, g_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0, msg=f"seed={seed}")


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_interp_rescale_out_and_non_contiguous(dtype):
    seed = fresh_seed()
    u, c = pair((2, 4, 8, 9), dtype, seed)
    g_ref, s_ref = reference.cfg_combine_reference(u, c, 6.0, guidance_rescale=0.7)
    g, s = cfg_triton.cfg_combine_triton(u, c, 6.0, guidance_rescale=0.7, block=64)
    assert torch.equal(g, g_ref), f"seed={seed}"
    cc = c.clone()
    g2, _ = cfg_triton.cfg_combine_triton(u, cc, 6.0, out=cc, guidance_rescale=0.7, block=64)
    assert g2 is cc and torch.equal(cc, g_ref)
    ut, ct = u.transpose(1, 3), c.transpose(1, 3)
    g3, s3 = cfg_triton.cfg_combine_triton(ut, ct, 6.0, block=64)
    g4, s4 = reference.cfg_combine_reference(ut.contiguous(), ct.contiguous(), 6.0)
    assert torch.equal(g3, g4)
    torch.testing.assert_close(s3, s4, rtol=1e-5, atol=0)


@needs_interp
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_interp_empty_and_nan():
    e = torch.empty(0, 4, dtype=torch.float16)
    g, s = cfg_triton.cfg_combine_triton(e, e, 5.0)
    assert g.shape == (0, 4) and s.tolist() == [0.0, 0.0]
    u, c = pair((40,), torch.float32, fresh_seed())
    u[5] = math.inf
    _, s = cfg_triton.cfg_combine_triton(u, c, 5.0, block=16)
    assert math.isnan(ops.rel_mae(s))


# ------------------------------------------------------------------------------ GPU
GPU_SHAPES = [(1,), (3, 5, 7), (1, 4, 128, 128), (1, 16, 128, 131), (2, 4, 256, 256)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_kernel_matches_reference(shape, dtype):
    seed = fresh_seed()
    msg = f"seed={seed} shape={shape} dtype={dtype}"
    u, c = pair(shape, dtype, seed, device="cuda")
    assert ops.backend(u) == "triton"
    g_ref, s_ref = reference.cfg_combine_reference(u.cpu(), c.cpu(), 5.0)
    g1, s1 = ops.cfg_combine(u, c, 5.0)
    runs = [ops.cfg_combine(u, c, 5.0)[1] for _ in range(5)]
    s_only = ops.discrepancy_stats(u, c)
    assert g1.device == u.device and s1.device == u.device
    assert torch.equal(g1.cpu(), g_ref), msg  # no FMA: bit-identical to the CPU reference
    assert all(torch.equal(s1, r) for r in runs), msg
    assert torch.equal(s1, s_only), msg
    assert_stats_close(s1, u, c, 1e-5, msg)
    torch.testing.assert_close(s1.cpu(), s_ref, rtol=1e-5, atol=0, msg=msg)


@gpu
@needs_cuda
def test_gpu_stats_identical_across_streams():
    """Launch timing must not matter: the same input on another stream gives the same bits."""
    seed = fresh_seed()
    u, c = pair((1, 16, 128, 128), torch.bfloat16, seed, device="cuda")
    s_default = ops.discrepancy_stats(u, c)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s_side = ops.discrepancy_stats(u, c)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(s_default, s_side)


@gpu
@needs_cuda
def test_gpu_rescale_and_out(diffusers_rescale):
    seed = fresh_seed()
    u, c = pair((2, 4, 64, 64), torch.float16, seed, device="cuda", scale_c=0.3)
    out = torch.empty_like(u)
    got, _ = ops.cfg_combine(u, c, 7.0, out=out, guidance_rescale=0.7)
    ref, _ = reference.cfg_combine_reference(u.cpu(), c.cpu(), 7.0, guidance_rescale=0.7)
    assert got is out
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-3, atol=1e-5)
