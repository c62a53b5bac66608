"""Triton kernels of a DREG site: one launch per site and direction, the pattern of Liger Kernel's ``ops/``.

The formulas are those of :mod:`hf_dreg.ops.formulas`; here each pass over the site's positions is one
``@triton.jit`` kernel called directly from a plain ``torch.autograd.Function``
(:mod:`hf_dreg.ops.triton_functions`), with no ``torch.compile`` region per call:

- forward, one program per position (row): f'(z) (and f(z), u for a gated site) and the row's penalty p in
  one pass, looping over the m units in blocks; a gated MLP whose product f(g) * u is fused (Liger's MLPs)
  also writes that product in the same pass;
- backward, one program per block of ``ROWS`` positions and ``BLOCK`` units: the gradient of the site's
  input (the activation's own gradient added where the node is also the activation's output) and the
  column sums that the row statistics' gradient needs, as one partial sum per program (summed after);
- the row statistics ||W_i||^2 (and ||Wu_i||^2, <Wg_i, Wu_i> for a gated site) in one pass over the
  weight each way.

Arithmetic is in the dtype of the row statistics: float32, or float64 for float64 inputs. On a CPU the
kernels run under ``TRITON_INTERPRET=1`` (numpy), which is how the tests check them.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

# activation codes of the kernels (see ActivationSpec.kernel)
GELU, GELU_TANH, SIGMOID_LINEAR, RELU, TANH, GELU_CLIPPED = 0, 1, 2, 3, 4, 5


@triton.jit
def _derivatives(s, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr):
    """(f, f', f'') from the tensor the site keeps: z, or a = f(z) for ReLU and tanh."""
    if ACT == 0:  # exact GELU
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        f = s * cdf
        d1 = cdf + s * pdf
        d2 = pdf * (2.0 - s * s)
    elif ACT == 1:  # 0.5 z (1 + tanh(K (z + c z^3))); w = (1 + tanh) / 2 = sigmoid(2 K (z + c z^3))
        w = tl.sigmoid(2.0 * K * (s + 0.044715 * s * s * s))
        sech2 = 4.0 * w * (1.0 - w)
        du = K * (1.0 + 3.0 * 0.044715 * s * s)
        ddu = 6.0 * K * 0.044715 * s
        f = s * w
        d1 = w + 0.5 * s * sech2 * du
        d2 = sech2 * du + 0.5 * s * sech2 * (ddu - 2.0 * (2.0 * w - 1.0) * du * du)
    elif ACT == 2:  # z sigmoid(K z): SiLU (K = 1), QuickGELU (K = 1.702)
        sg = tl.sigmoid(K * s)
        ds = K * sg * (1.0 - sg)
        f = s * sg
        d1 = sg + s * ds
        d2 = ds * (2.0 + K * s * (1.0 - 2.0 * sg))
    elif ACT == 3:  # ReLU, from its output
        f = s
        d1 = tl.where(s > 0.0, 1.0, 0.0).to(s.dtype)
        d2 = s * 0.0
    elif ACT == 4:  # tanh, from its output
        f = s
        d1 = 1.0 - s * s
        d2 = -2.0 * s * (1.0 - s * s)
    else:  # clip(gelu(z), LOW, HIGH)
        cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        g = s * cdf
        inside = (g > LOW) & (g < HIGH)
        f = tl.minimum(tl.maximum(g, LOW), HIGH)
        d1 = tl.where(inside, cdf + s * pdf, 0.0)
        d2 = tl.where(inside, pdf * (2.0 - s * s), 0.0)
    return f, d1, d2


@triton.jit
def plain_forward_kernel(
    S, R, P, stride_s, n_cols,
    ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """P[n] = (1/m) sum_i f'(z_ni)^2 R_i, one program per position n."""
    row = tl.program_id(0).to(tl.int64)
    dtype = R.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(dtype)
        r = tl.load(R + cols, mask=mask, other=0.0)
        f, d1, d2 = _derivatives(s, ACT, K, LOW, HIGH)
        acc += d1 * d1 * r
    tl.store(P + row, tl.sum(acc, axis=0) / n_cols)


@triton.jit
def plain_backward_kernel(
    S, R, GP, GA, GZ, PART, n_rows, n_cols, stride_s, stride_ga, stride_gz,
    HAS_GA: tl.constexpr, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """GZ = GA f' + (GP/m) 2 f' f'' R and PART[program] = sum over its positions of (GP/m) f'^2."""
    pid_rows = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    dtype = R.dtype.element_ty
    r = tl.load(R + cols, mask=col_mask, other=0.0)
    acc = tl.zeros([BLOCK], dtype=dtype)
    for i in range(0, ROWS):
        row = pid_rows * ROWS + i
        mask = col_mask & ((cols * 0 + row) < n_rows)
        row_safe = tl.minimum(row, n_rows - 1)  # the last program's rows past the end read a valid row, weighted 0
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(dtype)
        weight = tl.where(row < n_rows, tl.load(GP + row_safe).to(dtype), 0.0) / n_cols
        f, d1, d2 = _derivatives(s, ACT, K, LOW, HIGH)
        gz = weight * (2.0 * d1 * d2 * r)
        if HAS_GA:
            gz += tl.load(GA + row * stride_ga + cols, mask=mask, other=0.0).to(dtype) * d1
        tl.store(GZ + row * stride_gz + cols, gz.to(GZ.dtype.element_ty), mask=mask)
        acc += tl.where(mask, weight * d1 * d1, 0.0)
    tl.store(PART + pid_rows * n_cols + cols, acc, mask=col_mask)


@triton.jit
def gated_forward_kernel(
    S, U, ST, P, H, stride_s, stride_u, stride_h, n_cols,
    HAS_H: tl.constexpr, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """P[n] = (1/m) sum_i [q^2 RG + 2 q f C + f^2 RU], q = f'(g) u; H = f(g) u where the product is fused here.
    ST: the row statistics (RG, RU, C) as the rows of one (3, m) tensor."""
    row = tl.program_id(0).to(tl.int64)
    RG, RU, C = ST, ST + n_cols, ST + 2 * n_cols
    dtype = RG.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(dtype)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(dtype)
        rg = tl.load(RG + cols, mask=mask, other=0.0)
        ru = tl.load(RU + cols, mask=mask, other=0.0)
        c = tl.load(C + cols, mask=mask, other=0.0)
        f, d1, d2 = _derivatives(s, ACT, K, LOW, HIGH)
        q = d1 * u
        acc += q * (q * rg + 2.0 * f * c) + f * f * ru
        if HAS_H:
            tl.store(H + row * stride_h + cols, (f * u).to(H.dtype.element_ty), mask=mask)
    tl.store(P + row, tl.sum(acc, axis=0) / n_cols)


@triton.jit
def gated_backward_kernel(
    S, U, ST, GP, GH, GG, GU, PART, n_rows, n_cols, n_programs,
    stride_s, stride_u, stride_gh, stride_gg, stride_gu,
    HAS_GH: tl.constexpr, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """With k = 2 GP/m, q = f' u, e = q RG + f C: GG = k (f'' u e + f' (f RU + q C)) [+ GH u f'],
    GU = k f' e [+ GH f]; PART[0|1|2, program] = sums of k q^2/2, k f^2/2, k q f over its positions."""
    pid_rows = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    RG, RU, C = ST, ST + n_cols, ST + 2 * n_cols  # the (3, m) statistics
    dtype = RG.dtype.element_ty
    rg = tl.load(RG + cols, mask=col_mask, other=0.0)
    ru = tl.load(RU + cols, mask=col_mask, other=0.0)
    c = tl.load(C + cols, mask=col_mask, other=0.0)
    acc_rg = tl.zeros([BLOCK], dtype=dtype)
    acc_ru = tl.zeros([BLOCK], dtype=dtype)
    acc_c = tl.zeros([BLOCK], dtype=dtype)
    for i in range(0, ROWS):
        row = pid_rows * ROWS + i
        mask = col_mask & ((cols * 0 + row) < n_rows)
        row_safe = tl.minimum(row, n_rows - 1)  # the last program's rows past the end read a valid row, weighted 0
        s = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(dtype)
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(dtype)
        k = tl.where(row < n_rows, tl.load(GP + row_safe).to(dtype), 0.0) * 2.0 / n_cols
        f, d1, d2 = _derivatives(s, ACT, K, LOW, HIGH)
        q = d1 * u
        e = q * rg + f * c
        gg = k * (d2 * u * e + d1 * (f * ru + q * c))
        gu = k * d1 * e
        if HAS_GH:
            gh = tl.load(GH + row * stride_gh + cols, mask=mask, other=0.0).to(dtype)
            gg += gh * u * d1
            gu += gh * f
        tl.store(GG + row * stride_gg + cols, gg.to(GG.dtype.element_ty), mask=mask)
        tl.store(GU + row * stride_gu + cols, gu.to(GU.dtype.element_ty), mask=mask)
        acc_rg += tl.where(mask, 0.5 * k * q * q, 0.0)
        acc_ru += tl.where(mask, 0.5 * k * f * f, 0.0)
        acc_c += tl.where(mask, k * q * f, 0.0)
    base = pid_rows * n_cols + cols
    plane = n_programs * n_cols
    tl.store(PART + base, acc_rg, mask=col_mask)
    tl.store(PART + plane + base, acc_ru, mask=col_mask)
    tl.store(PART + 2 * plane + base, acc_c, mask=col_mask)


@triton.jit
def row_stats_kernel(W, R, stride_w, n_cols, BLOCK: tl.constexpr):
    """R[i] = ||W_i||^2, one program per row."""
    row = tl.program_id(0).to(tl.int64)
    dtype = R.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = tl.load(W + row * stride_w + cols, mask=cols < n_cols, other=0.0).to(dtype)
        acc += w * w
    tl.store(R + row, tl.sum(acc, axis=0))


@triton.jit
def gated_row_stats_kernel(WG, WU, ST, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    """ST = (RG, RU, C), the rows of one (3, rows) tensor: RG[i] = ||WG_i||^2, RU[i] = ||WU_i||^2,
    C[i] = <WG_i, WU_i>, one program per row."""
    row = tl.program_id(0).to(tl.int64)
    n_rows = tl.num_programs(0)
    RG, RU, C = ST, ST + n_rows, ST + 2 * n_rows
    dtype = RG.dtype.element_ty
    acc_g = tl.zeros([BLOCK], dtype=dtype)
    acc_u = tl.zeros([BLOCK], dtype=dtype)
    acc_c = tl.zeros([BLOCK], dtype=dtype)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(WG + row * stride_g + cols, mask=mask, other=0.0).to(dtype)
        y = tl.load(WU + row * stride_u + cols, mask=mask, other=0.0).to(dtype)
        acc_g += x * x
        acc_u += y * y
        acc_c += x * y
    tl.store(RG + row, tl.sum(acc_g, axis=0))
    tl.store(RU + row, tl.sum(acc_u, axis=0))
    tl.store(C + row, tl.sum(acc_c, axis=0))


@triton.jit
def row_stats_backward_kernel(W, GR, GW, stride_w, stride_gw, n_cols, BLOCK: tl.constexpr):
    """GW_i = 2 GR_i W_i; programs over (rows, column blocks)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GR + row)
    w = tl.load(W + row * stride_w + cols, mask=mask, other=0.0).to(g.dtype)
    tl.store(GW + row * stride_gw + cols, (2.0 * g * w).to(GW.dtype.element_ty), mask=mask)


@triton.jit
def gated_row_stats_backward_kernel(
    WG, WU, GST, GWG, GWU, stride_g, stride_u, stride_gg, stride_gu, n_cols, BLOCK: tl.constexpr
):
    """GWG_i = 2 GRG_i WG_i + GC_i WU_i,  GWU_i = 2 GRU_i WU_i + GC_i WG_i; GST = (GRG, GRU, GC) as one (3, rows)."""
    row = tl.program_id(0).to(tl.int64)
    n_rows = tl.num_programs(0)
    GRG, GRU, GC = GST, GST + n_rows, GST + 2 * n_rows
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    grg = tl.load(GRG + row)
    gru = tl.load(GRU + row)
    gc = tl.load(GC + row)
    x = tl.load(WG + row * stride_g + cols, mask=mask, other=0.0).to(grg.dtype)
    y = tl.load(WU + row * stride_u + cols, mask=mask, other=0.0).to(grg.dtype)
    tl.store(GWG + row * stride_gg + cols, (2.0 * grg * x + gc * y).to(GWG.dtype.element_ty), mask=mask)
    tl.store(GWU + row * stride_gu + cols, (2.0 * gru * y + gc * x).to(GWU.dtype.element_ty), mask=mask)


# ---- a LoRA-fed site's row statistics, from the factors -------------------------------------------------
# The rows of a site's n weights (1: plain, 2: gated) are W_j = B_j + V_j D, D the present adapters' down factors
# stacked (T, in), V_j = s_j U_j placed at its own columns of T (zeros elsewhere). Per row i, with Y_j = B_j D^T
# and G = D D^T:
#     ||W_j,i||^2 = ||B_j,i||^2 + 2 V_j,i . Y_j,i + V_j,i G V_j,i,
#     <W_g,i, W_u,i> = <B_g,i, B_u,i> + V_g,i . Y_u,i + V_u,i . Y_g,i + V_g,i G V_u,i.
# Forward, one program per block of ROWS rows: one pass over the block's base rows gives the bases' own
# statistics, Y (tl.dot with the stacked D) and G, then the rows' statistics. Backward, one launch of two kinds
# of program: per block of rows, the up factors' gradients; per block of D's columns (and of rows, where a weight
# has many), D's gradient dY^T B + (V^T dY) D, its sum over the rows in the program. A LoRA rank is small: T
# (both adapters' ranks) is padded to BLOCK_T >= 16, the least a tl.dot takes.


@triton.jit
def _down(DG, DU, t, k, n_cols, rank_g, rank_u, stride_dg, stride_du, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
          dtype: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The stacked down factors D = [Dg; Du] at columns k, (BLOCK_T, BLOCK_K) in ``dtype``, zeros outside."""
    inside = k[None, :] < n_cols
    d = tl.zeros([BLOCK_T, BLOCK_K], dtype=dtype)
    if HAS_G:
        d += tl.load(DG + t[:, None] * stride_dg + k[None, :], mask=(t[:, None] < rank_g) & inside, other=0.0).to(dtype)
    if HAS_U:
        tu = tl.maximum(t - rank_g, 0)
        mask = (t[:, None] >= rank_g) & (t[:, None] < rank_g + rank_u) & inside
        d += tl.load(DU + tu[:, None] * stride_du + k[None, :], mask=mask, other=0.0).to(dtype)
    return d


@triton.jit
def _up(U, rows, row_mask, t, first, rank, scale, stride_u, HAS: tl.constexpr, dtype: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """V_j at the block's rows: s_j U_j at columns [first, first + rank) of T, zeros elsewhere; (ROWS, BLOCK_T)."""
    v = tl.zeros([ROWS, BLOCK_T], dtype=dtype)
    if HAS:
        tu = tl.maximum(t - first, 0)
        mask = row_mask[:, None] & (t[None, :] >= first) & (t[None, :] < first + rank)
        v += tl.load(U + rows[:, None] * stride_u + tu[None, :], mask=mask, other=0.0).to(dtype) * scale
    return v


@triton.jit
def _row_grads(GRG, GRU, GC, rows, row_mask, GATED: tl.constexpr, dtype: tl.constexpr):
    """2 grg, 2 gru, gc at the block's rows (zeros past the end; plain: gru = gc = 0)."""
    grg2 = 2.0 * tl.load(GRG + rows, mask=row_mask, other=0.0).to(dtype)
    if GATED:
        gru2 = 2.0 * tl.load(GRU + rows, mask=row_mask, other=0.0).to(dtype)
        gc = tl.load(GC + rows, mask=row_mask, other=0.0).to(dtype)
    else:
        gru2 = grg2 * 0.0
        gc = grg2 * 0.0
    return grg2, gru2, gc


@triton.jit
def low_rank_stats_kernel(
    BG, BU, UG, UU, DG, DU, OUT, Y, GM,
    n_rows, n_cols, rank_g, rank_u, scale_g, scale_u,
    stride_bg, stride_bu, stride_ug, stride_uu, stride_dg, stride_du,
    GATED: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """OUT[0] = RG = ||B_g||^2 + 2 Vg.Yg + Vg G Vg per row (plain: that alone); gated also OUT[1] = RU (the same
    for u) and OUT[2] = C = <B_g, B_u> + Vg.Yu + Vu.Yg + Vg G Vu. Kept for backward: Y[i] = (Yg_i, Yu_i) and G
    (stored by program 0). The products in the bases' dtype (D rounded to it, as torch's mm of the two would),
    accumulated in the statistics' dtype."""
    pid = tl.program_id(0).to(tl.int64)
    dtype = OUT.dtype.element_ty
    bdt = BG.dtype.element_ty
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    t = tl.arange(0, BLOCK_T)
    rank_t = rank_g + rank_u
    yg = tl.zeros([ROWS, BLOCK_T], dtype=dtype)
    yu = tl.zeros([ROWS, BLOCK_T], dtype=dtype)
    gm = tl.zeros([BLOCK_T, BLOCK_T], dtype=dtype)
    s0g = tl.zeros([ROWS], dtype=dtype)
    s0u = tl.zeros([ROWS], dtype=dtype)
    s0c = tl.zeros([ROWS], dtype=dtype)
    for start in range(0, n_cols, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (k[None, :] < n_cols)
        d = _down(DG, DU, t, k, n_cols, rank_g, rank_u, stride_dg, stride_du, HAS_G, HAS_U, dtype, BLOCK_T, BLOCK_K)
        gm = tl.dot(d, tl.trans(d), gm, input_precision="ieee")
        dt = tl.trans(d.to(bdt))
        bg = tl.load(BG + rows[:, None] * stride_bg + k[None, :], mask=mask, other=0.0)
        yg = tl.dot(bg, dt, yg, input_precision="ieee")
        bg = bg.to(dtype)
        s0g += tl.sum(bg * bg, axis=1)
        if GATED:
            bu = tl.load(BU + rows[:, None] * stride_bu + k[None, :], mask=mask, other=0.0)
            yu = tl.dot(bu, dt, yu, input_precision="ieee")
            bu = bu.to(dtype)
            s0u += tl.sum(bu * bu, axis=1)
            s0c += tl.sum(bg * bu, axis=1)
    vg = _up(UG, rows, row_mask, t, 0, rank_g, scale_g, stride_ug, HAS_G, dtype, ROWS, BLOCK_T)
    vg_gm = tl.dot(vg, gm, input_precision="ieee", out_dtype=dtype)
    t_mask = row_mask[:, None] & (t[None, :] < rank_t)
    y_at = Y + rows[:, None] * (2 * rank_t if GATED else rank_t) + t[None, :]
    tl.store(y_at, yg.to(Y.dtype.element_ty), mask=t_mask)
    tl.store(OUT + rows, s0g + tl.sum(vg * (2.0 * yg + vg_gm), axis=1), mask=row_mask)
    if GATED:
        vu = _up(UU, rows, row_mask, t, rank_g, rank_u, scale_u, stride_uu, HAS_U, dtype, ROWS, BLOCK_T)
        vu_gm = tl.dot(vu, gm, input_precision="ieee", out_dtype=dtype)
        tl.store(y_at + rank_t, yu.to(Y.dtype.element_ty), mask=t_mask)
        tl.store(OUT + n_rows + rows, s0u + tl.sum(vu * (2.0 * yu + vu_gm), axis=1), mask=row_mask)
        tl.store(OUT + 2 * n_rows + rows, s0c + tl.sum(vg * yu + vu * yg + vg_gm * vu, axis=1), mask=row_mask)
    if pid == 0:
        tl.store(GM + t[:, None] * rank_t + t[None, :], gm, mask=(t[:, None] < rank_t) & (t[None, :] < rank_t))


@triton.jit
def low_rank_stats_backward_kernel(
    BG, BU, UG, UU, DG, DU, Y, GM, GR, DUG, DUU, DDG, DDU, PART,
    n_rows, n_cols, rank_g, rank_u, scale_g, scale_u, row_programs, rows_per_split,
    stride_bg, stride_bu, stride_ug, stride_uu, stride_dg, stride_du, stride_dug, stride_duu, stride_ddg, stride_ddu,
    GATED: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, SPLIT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """With 2 Gamma = [[2 grg, gc], [gc, 2 gru]] per row (the statistics' gradients), A = Y + V G:
    programs [0, row_programs), a block of rows each: dV = 2 Gamma A, stored as s_j dV_j at U_j's columns (the up
    factors' gradients); the others, a block of D's columns and a range of rows each: with dY = 2 Gamma V,
    dD = sum over the rows of dY_j^T B_j + (V_j^T dY_j) D (G = D D^T), stored at Dg's and Du's rows, or as the
    range's part in PART (SPLIT: weights with many rows; summed after). GR: the statistics' gradients, (grg, gru,
    gc) as the rows of one (3, n_rows) tensor (plain: grg alone)."""
    pid = tl.program_id(0).to(tl.int64)
    GRG, GRU, GC = GR, GR + n_rows, GR + 2 * n_rows
    dtype = GM.dtype.element_ty
    bdt = BG.dtype.element_ty
    t = tl.arange(0, BLOCK_T)
    rank_t = rank_g + rank_u
    if pid < row_programs:
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_mask = rows < n_rows
        gm = tl.load(GM + t[:, None] * rank_t + t[None, :], mask=(t[:, None] < rank_t) & (t[None, :] < rank_t), other=0.0)
        t_mask = row_mask[:, None] & (t[None, :] < rank_t)
        y_at = Y + rows[:, None] * (2 * rank_t if GATED else rank_t) + t[None, :]
        grg2, gru2, gc = _row_grads(GRG, GRU, GC, rows, row_mask, GATED, dtype)
        vg = _up(UG, rows, row_mask, t, 0, rank_g, scale_g, stride_ug, HAS_G, dtype, ROWS, BLOCK_T)
        ag = tl.load(y_at, mask=t_mask, other=0.0).to(dtype) + tl.dot(vg, gm, input_precision="ieee", out_dtype=dtype)
        if GATED:
            vu = _up(UU, rows, row_mask, t, rank_g, rank_u, scale_u, stride_uu, HAS_U, dtype, ROWS, BLOCK_T)
            au = tl.load(y_at + rank_t, mask=t_mask, other=0.0).to(dtype) + tl.dot(vu, gm, input_precision="ieee", out_dtype=dtype)
            dvg = grg2[:, None] * ag + gc[:, None] * au
            if HAS_U:
                dvu = gc[:, None] * ag + gru2[:, None] * au
                tu = tl.maximum(t - rank_g, 0)
                inside = row_mask[:, None] & (t[None, :] >= rank_g) & (t[None, :] < rank_t)
                tl.store(DUU + rows[:, None] * stride_duu + tu[None, :], (scale_u * dvu).to(DUU.dtype.element_ty), mask=inside)
        else:
            dvg = grg2[:, None] * ag
        if HAS_G:
            inside = row_mask[:, None] & (t[None, :] < rank_g)
            tl.store(DUG + rows[:, None] * stride_dug + t[None, :], (scale_g * dvg).to(DUG.dtype.element_ty), mask=inside)
    else:
        q = pid - row_programs
        n_blocks = tl.cdiv(n_cols, BLOCK_K)
        split = q // n_blocks
        k = (q % n_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = k < n_cols
        first = split * rows_per_split
        last = tl.minimum(first + rows_per_split, n_rows)
        acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=dtype)
        acc_g = tl.zeros([BLOCK_T, BLOCK_T], dtype=dtype)
        for start in range(first, last, ROWS):
            rows = start + tl.arange(0, ROWS)
            row_mask = rows < last
            mask = row_mask[:, None] & k_mask[None, :]
            grg2, gru2, gc = _row_grads(GRG, GRU, GC, rows, row_mask, GATED, dtype)
            vg = _up(UG, rows, row_mask, t, 0, rank_g, scale_g, stride_ug, HAS_G, dtype, ROWS, BLOCK_T)
            bg = tl.load(BG + rows[:, None] * stride_bg + k[None, :], mask=mask, other=0.0)
            if GATED:
                vu = _up(UU, rows, row_mask, t, rank_g, rank_u, scale_u, stride_uu, HAS_U, dtype, ROWS, BLOCK_T)
                dyg = grg2[:, None] * vg + gc[:, None] * vu
                dyu = gc[:, None] * vg + gru2[:, None] * vu
                bu = tl.load(BU + rows[:, None] * stride_bu + k[None, :], mask=mask, other=0.0)
                acc = tl.dot(tl.trans(dyu.to(bdt)), bu, acc, input_precision="ieee")
                acc_g = tl.dot(tl.trans(vu), dyu, acc_g, input_precision="ieee")
            else:
                dyg = grg2[:, None] * vg
            acc = tl.dot(tl.trans(dyg.to(bdt)), bg, acc, input_precision="ieee")
            acc_g = tl.dot(tl.trans(vg), dyg, acc_g, input_precision="ieee")
        d = _down(DG, DU, t, k, n_cols, rank_g, rank_u, stride_dg, stride_du, HAS_G, HAS_U, dtype, BLOCK_T, BLOCK_K)
        acc = tl.dot(acc_g, d, acc, input_precision="ieee")
        if SPLIT:
            at = PART + split * rank_t * n_cols + t[:, None] * n_cols + k[None, :]
            tl.store(at, acc, mask=(t[:, None] < rank_t) & k_mask[None, :])
        else:
            if HAS_G:
                tl.store(DDG + t[:, None] * stride_ddg + k[None, :], acc.to(DDG.dtype.element_ty), mask=(t[:, None] < rank_g) & k_mask[None, :])
            if HAS_U:
                tu = tl.maximum(t - rank_g, 0)
                mask = (t[:, None] >= rank_g) & (t[:, None] < rank_t) & k_mask[None, :]
                tl.store(DDU + tu[:, None] * stride_ddu + k[None, :], acc.to(DDU.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def block_size(n_cols: int, limit: int = 1024) -> int:
    """The column block of a kernel: the next power of two of n_cols, at most ``limit`` (at least 16)."""
    return max(16, min(limit, triton.next_power_of_2(n_cols)))
