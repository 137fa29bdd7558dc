"""Raw Triton kernel bodies (not decorated). Imported only by :mod:`.cfg_triton`, which wraps
them in ``JITFunction`` (compiled, CUDA) or ``InterpretedFunction`` (``TRITON_INTERPRET=1``).

Importing this module imports triton; never import it from code that must run without triton.
"""

import triton.language as tl


def cfg_partials_kernel(
    u_ptr,  # *T [n] uncond, contiguous
    c_ptr,  # *T [n] cond, contiguous
    g_ptr,  # *T [n] guided output (ignored unless WRITE_GUIDED)
    part_ptr,  # *f32 [2 * num_programs]: [0:P] sum|c-u| per program, [P:2P] sum|u| per program
    n,  # number of elements
    num_programs,  # P = cdiv(n, BLOCK)
    w,  # guidance scale (fp32)
    BLOCK: tl.constexpr,
    WRITE_GUIDED: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # guided is bfloat16: round on the bits (see below)
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Load in the storage dtype, convert to float32 before any arithmetic (bf16 included).
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = c - u
    if WRITE_GUIDED:
        g = u + w * d  # launched with enable_fp_fusion=False: a rounded mul then a rounded add
        if ROUND_BF16:
            # float32 -> bfloat16 round-to-nearest-even done on the bits (as torch does), so the
            # interpreter (whose own cast truncates) and the GPU give torch's exact result.
            bits = g.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(g != g, 0x7FC0, rounded)  # NaN stays NaN (quiet, positive)
            tl.store(g_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    # Masked lanes hold u = c = 0, so they add exactly 0 to both sums.
    sum_d = tl.sum(tl.abs(d), axis=0)
    sum_u = tl.sum(tl.abs(u), axis=0)
    tl.store(part_ptr + pid, sum_d)
    tl.store(part_ptr + num_programs + pid, sum_u)


def cfg_finalize_kernel(
    part_ptr,  # *f32 [2 * num_programs]
    stats_ptr,  # *f32 [2]: [sum|c-u|, sum|u|]
    num_programs,
    RBLOCK: tl.constexpr,
):
    # One program. Lane j accumulates partials j, j + RBLOCK, j + 2*RBLOCK, ... in float64, in
    # that order; then one tl.sum across the RBLOCK lanes. Fixed order: no atomics, no timing.
    acc_d = tl.zeros([RBLOCK], dtype=tl.float64)
    acc_u = tl.zeros([RBLOCK], dtype=tl.float64)
    for start in range(0, num_programs, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        m = idx < num_programs
        acc_d += tl.load(part_ptr + idx, mask=m, other=0.0).to(tl.float64)
        acc_u += tl.load(part_ptr + num_programs + idx, mask=m, other=0.0).to(tl.float64)
    tl.store(stats_ptr, tl.sum(acc_d, axis=0).to(tl.float32))
    tl.store(stats_ptr + 1, tl.sum(acc_u, axis=0).to(tl.float32))
