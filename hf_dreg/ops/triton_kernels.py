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
    S, U, RG, RU, C, P, H, stride_s, stride_u, stride_h, n_cols,
    HAS_H: tl.constexpr, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """P[n] = (1/m) sum_i [q^2 RG + 2 q f C + f^2 RU], q = f'(g) u; H = f(g) u where the product is fused here."""
    row = tl.program_id(0).to(tl.int64)
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
    S, U, RG, RU, C, GP, GH, GG, GU, PART, n_rows, n_cols, n_programs,
    stride_s, stride_u, stride_gh, stride_gg, stride_gu,
    HAS_GH: tl.constexpr, ACT: tl.constexpr, K: tl.constexpr, LOW: tl.constexpr, HIGH: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """With k = 2 GP/m, q = f' u, e = q RG + f C: GG = k (f'' u e + f' (f RU + q C)) [+ GH u f'],
    GU = k f' e [+ GH f]; PART[0|1|2, program] = sums of k q^2/2, k f^2/2, k q f over its positions."""
    pid_rows = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < n_cols
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
def gated_row_stats_kernel(WG, WU, RG, RU, C, stride_g, stride_u, n_cols, BLOCK: tl.constexpr):
    """RG[i] = ||WG_i||^2, RU[i] = ||WU_i||^2, C[i] = <WG_i, WU_i>, one program per row."""
    row = tl.program_id(0).to(tl.int64)
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
    WG, WU, GRG, GRU, GC, GWG, GWU, stride_g, stride_u, stride_gg, stride_gu, n_cols, BLOCK: tl.constexpr
):
    """GWG_i = 2 GRG_i WG_i + GC_i WU_i,  GWU_i = 2 GRU_i WU_i + GC_i WG_i."""
    row = tl.program_id(0).to(tl.int64)
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
# (a product torch takes: the one pass over a base) and G = D D^T:
#     ||W_j,i||^2 = ||B_j,i||^2 + 2 V_j,i . Y_j,i + V_j,i G V_j,i,
#     <W_g,i, W_u,i> = <B_g,i, B_u,i> + V_g,i . Y_u,i + V_u,i . Y_g,i + V_g,i G V_u,i.
# One program per block of ROWS rows, one row at a time as vectors of the T columns (a LoRA rank is small).


@triton.jit
def _low_rank_rows(Y, U, row, stride_y, stride_u, t, t_mask, first, rank, scale, HAS: tl.constexpr, dtype: tl.constexpr):
    """(Y_j,i, V_j,i): V_j,i is s_j U_j,i at columns [first, first + rank) of T, zeros elsewhere."""
    y = tl.load(Y + row * stride_y + t, mask=t_mask, other=0.0).to(dtype)
    if HAS:
        inside = (t >= first) & (t < first + rank)
        v = tl.load(U + row * stride_u + (t - first), mask=inside, other=0.0).to(dtype) * scale
    else:
        v = y * 0.0
    return y, v


@triton.jit
def low_rank_stats_kernel(
    YG, YU, UG, UU, GM, S0G, S0U, S0C, RG, RU, C,
    n_rows, rank_t, rank_g, rank_u, scale_g, scale_u, stride_yg, stride_yu, stride_ug, stride_uu,
    GATED: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """RG = S0G + 2 Vg.Yg + Vg G Vg (plain: that alone); gated also RU (the same for u) and
    C = S0C + Vg.Yu + Vu.Yg + Vg G Vu. S0*: the bases' own statistics; the up factors' columns follow the gate's."""
    pid = tl.program_id(0).to(tl.int64)
    dtype = RG.dtype.element_ty
    t = tl.arange(0, BLOCK_T)
    t_mask = t < rank_t
    gm = tl.load(GM + t[:, None] * rank_t + t[None, :], mask=t_mask[:, None] & t_mask[None, :], other=0.0).to(dtype)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        ok = row < n_rows
        row = tl.minimum(row, n_rows - 1)  # the last program's rows past the end: a valid row, not stored
        yg, vg = _low_rank_rows(YG, UG, row, stride_yg, stride_ug, t, t_mask, 0, rank_g, scale_g, HAS_G, dtype)
        vg_gm = tl.sum(vg[:, None] * gm, axis=0)
        rg = tl.load(S0G + row).to(dtype) + tl.sum(vg * (2.0 * yg + vg_gm), axis=0)
        tl.store(RG + row, rg, mask=ok)
        if GATED:
            yu, vu = _low_rank_rows(YU, UU, row, stride_yu, stride_uu, t, t_mask, rank_g, rank_u, scale_u, HAS_U, dtype)
            vu_gm = tl.sum(vu[:, None] * gm, axis=0)
            ru = tl.load(S0U + row).to(dtype) + tl.sum(vu * (2.0 * yu + vu_gm), axis=0)
            c = tl.load(S0C + row).to(dtype) + tl.sum(vg * yu + vu * yg + vg_gm * vu, axis=0)
            tl.store(RU + row, ru, mask=ok)
            tl.store(C + row, c, mask=ok)


@triton.jit
def low_rank_stats_backward_kernel(
    YG, YU, UG, UU, GM, GRG, GRU, GC, DUG, DUU, DYG, DYU, PART,
    n_rows, rank_t, rank_g, rank_u, scale_g, scale_u,
    stride_yg, stride_yu, stride_ug, stride_uu, stride_dug, stride_duu, stride_dyg, stride_dyu,
    GATED: tl.constexpr, HAS_G: tl.constexpr, HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """With the statistics' gradients (grg, gru, gc) per row, 2 Gamma = [[2 grg, gc], [gc, 2 gru]]:
    dV = 2 Gamma (Y + V G) (stored as s_j dV_j at U_j's columns: the up factors' gradients), dY = 2 Gamma V,
    and PART[program] = sum over its rows of Vg (x) dYg + Vu (x) dYu = 2 dG (G = D D^T: dD gets PART D)."""
    pid = tl.program_id(0).to(tl.int64)
    dtype = PART.dtype.element_ty
    t = tl.arange(0, BLOCK_T)
    t_mask = t < rank_t
    gm = tl.load(GM + t[:, None] * rank_t + t[None, :], mask=t_mask[:, None] & t_mask[None, :], other=0.0).to(dtype)
    acc = tl.zeros([BLOCK_T, BLOCK_T], dtype=dtype)
    for i in range(0, ROWS):
        row = pid * ROWS + i
        ok = row < n_rows
        ok_t = t_mask & (tl.zeros_like(t) + row < n_rows)  # a vector mask: the interpreter's broadcast of a scalar one is int32
        row = tl.minimum(row, n_rows - 1)
        yg, vg = _low_rank_rows(YG, UG, row, stride_yg, stride_ug, t, t_mask, 0, rank_g, scale_g, HAS_G, dtype)
        ag = yg + tl.sum(vg[:, None] * gm, axis=0)
        grg2 = tl.where(ok, 2.0 * tl.load(GRG + row).to(dtype), 0.0)
        if GATED:
            yu, vu = _low_rank_rows(YU, UU, row, stride_yu, stride_uu, t, t_mask, rank_g, rank_u, scale_u, HAS_U, dtype)
            au = yu + tl.sum(vu[:, None] * gm, axis=0)
            gru2 = tl.where(ok, 2.0 * tl.load(GRU + row).to(dtype), 0.0)
            gc = tl.where(ok, tl.load(GC + row).to(dtype), 0.0)
            dvg = grg2 * ag + gc * au
            dvu = gc * ag + gru2 * au
            dyg = grg2 * vg + gc * vu
            dyu = gc * vg + gru2 * vu
            tl.store(DYU + row * stride_dyu + t, dyu.to(DYU.dtype.element_ty), mask=ok_t)
            acc += vg[:, None] * dyg[None, :] + vu[:, None] * dyu[None, :]
            if HAS_U:
                inside = (t >= rank_g) & (t < rank_g + rank_u) & ok_t
                tl.store(DUU + row * stride_duu + (t - rank_g), (scale_u * dvu).to(DUU.dtype.element_ty), mask=inside)
        else:
            dvg = grg2 * ag
            dyg = grg2 * vg
            acc += vg[:, None] * dyg[None, :]
        tl.store(DYG + row * stride_dyg + t, dyg.to(DYG.dtype.element_ty), mask=ok_t)
        if HAS_G:
            tl.store(DUG + row * stride_dug + t, (scale_g * dvg).to(DUG.dtype.element_ty), mask=(t < rank_g) & ok_t)
    tl.store(PART + pid * rank_t * rank_t + t[:, None] * rank_t + t[None, :], acc, mask=t_mask[:, None] & t_mask[None, :])


@functools.lru_cache(maxsize=None)
def block_size(n_cols: int, limit: int = 1024) -> int:
    """The column block of a kernel: the next power of two of n_cols, at most ``limit`` (at least 16)."""
    return max(16, min(limit, triton.next_power_of_2(n_cols)))
