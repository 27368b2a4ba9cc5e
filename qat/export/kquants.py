"""GGUF K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), vectorized over all blocks of a tensor.

Super-blocks of 256 values hold sub-blocks of 16 or 32 values. The numerics are the one numerics:
`QuantSpec(grid="ggml_k")` in `qat.primitives` quantizes each sub-block's scale (and minimum) under fp16
super-block scales and computes the codes with the quantized scales, as llama.cpp's reference quantizer
does; a model trained with that spec (recipes gguf_q*_k) holds exactly these codes. This module adds
(1) the fit of the sub-block ranges for export from float weights: symmetric types use the signed peak,
asymmetric types search `NSTEP` + 1 candidate scales around min-max with a weighted least-squares refit
of scale and minimum (the idea of llama.cpp's make_qkx2_quants, weights |x| + rms(x)), and (2) the bit
layout of the blocks. Decoded values are exactly d*sc*q - dmin*m in float32, gguf.quants.dequantize's math.
"""
from __future__ import annotations

import torch

from qat.grids import GRIDS, block_range, signed_peak
from qat.spec import GGML_K, QuantSpec

QK_K = 256
NSTEP = {"Q2_K": 8, "Q4_K": 4, "Q5_K": 4}  # candidates searched; more costs time for little gain


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1).to(torch.float16).contiguous().view(torch.uint8)


def _sums(w, L, x, wl, tmp):
    """sum w*L, sum w*L*L, sum w*L*x over sub-blocks, written through the scratch tensors wl and tmp: fresh
    megabyte temporaries per candidate cost page faults (glibc hands them back to the OS), more than the math."""
    torch.mul(w, L, out=wl)
    return (wl.sum(-1, keepdim=True), torch.mul(wl, L, out=tmp).sum(-1, keepdim=True),
            torch.mul(wl, x, out=tmp).sum(-1, keepdim=True))


def _wls(sw, sx, sxx, sl, sl2, sxl):
    """Weighted least-squares scale and minimum (clamped <= 0) for codes L, and the weighted squared error
    sum w (scale*L + min - x)^2, expanded in the sums so that no element-wise pass is needed."""
    det = sw * sl2 - sl * sl
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    scale, mn = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
    pos = mn > 0
    scale = torch.where(pos, sxl / sl2.clamp(min=1e-30), scale)
    mn = torch.where(pos, torch.zeros_like(mn), mn)
    err = scale * scale * sl2 + 2 * scale * mn * sl + mn * mn * sw - 2 * scale * sxl - 2 * mn * sx + sxx
    return scale, mn, err.masked_fill(~ok, float("inf"))


def fit_asym(x: torch.Tensor, nmax: int, nstep: int, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block (scale >= 0, minimum <= 0) for x [..., sub] so that x ~ scale * L + minimum.

    `importance` (broadcastable to x, e.g. an imatrix column statistic) weighs the error as llama.cpp does
    with an imatrix: imp * sqrt(sigma^2 + x^2); without it, the weights are rms(x) + |x|."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    if importance is None:
        w = torch.abs(x).add_(x.pow(2).mean(-1, keepdim=True).sqrt())
    else:
        sigma2 = 2 * x.pow(2).mean(-1, keepdim=True)
        w = importance * (sigma2 + x * x).sqrt()
    L, wl, tmp = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    torch.mul(w, x, out=tmp)
    sw, sx, sxx = w.sum(-1, keepdim=True), tmp.sum(-1, keepdim=True), tmp.mul_(x).sum(-1, keepdim=True)
    shifted = x - lo
    best_scale, best_min = rng / nmax, lo
    # 0 <= shifted <= rng, so round(shifted * f / rng) <= nmax for f < nmax + 0.5: clamping is a no-op there
    torch.mul(shifted, nmax / safe, out=L).round_()
    sl, sl2, sxl = _sums(w, L, x, wl, tmp)
    s, m = best_scale, best_min
    best_err = s * s * sl2 + 2 * s * m * sl + m * m * sw - 2 * s * sxl - 2 * m * sx + sxx
    sums = []
    for k in range(nstep + 1):
        torch.mul(shifted, (nmax - 1 + 0.1 * k) / safe, out=L).round_()
        if 0.1 * k >= 1.4:
            L.clamp_(0, nmax)
        sums.append(_sums(w, L, x, wl, tmp))
    # one least-squares solve for all candidates (element-wise, so each is what it would be alone)
    scales, mins, errs = _wls(sw, sx, sxx, *(torch.stack(c) for c in zip(*sums)))
    for scale, mn, err in zip(scales, mins, errs):  # in order: the first strictly better candidate wins
        better = err < best_err
        best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, mn, best_min)
        best_err = torch.where(better, err, best_err)
    return best_scale.clamp(min=0).squeeze(-1), (-best_min).squeeze(-1)


def kquant_spec(name: str) -> QuantSpec:
    """The QuantSpec (grid="ggml_k") whose numerics are GGUF K-quant type `name`.

    Example:
        >>> kquant_spec("Q4_K").describe()
        'int4 asym g32 ggml_k'
    """
    bits = next((b for b, v in GGML_K.items() if v[0] == name), None)
    if bits is None:
        raise KeyError(f"{name!r} is not a K-quant; choose from {[v[0] for v in GGML_K.values()]}")
    _, sym, sub = GGML_K[bits][:3]
    return QuantSpec(bits=bits, symmetric=sym, granularity="per_group", group_size=sub, scale_dtype="fp16", grid="ggml_k")


def fitted_range(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per sub-block for `choose_qparams`: from the weighted search for the asymmetric types
    (weighted by `importance` [cols] when given), from `compute_range` (the signed peak) for the symmetric ones."""
    if spec.symmetric:
        return block_range(w.reshape(w.shape[0], -1, spec.group_size), spec)
    nmax = spec.qmax
    imp = None if importance is None else importance.float().reshape(1, -1, spec.group_size)
    nstep = NSTEP[GGML_K[spec.bits][0]] + (8 if imp is not None else 0)
    scale, mins = fit_asym(w.reshape(w.shape[0], -1, spec.group_size), nmax, nstep, imp)
    lo = -mins
    return lo.unsqueeze(-1), (lo + scale * nmax).unsqueeze(-1)


def _levels(values: torch.Tensor, smax: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective sub-block values d*code [nb, n] -> (d [nb, 1], integer codes): undoes `choose_qparams`'s
    second level exactly (the peak sub-block holds code smax, or -smax when signed)."""
    peak = signed_peak(values)
    d = peak / (-smax if signed else smax)
    codes = torch.round(values / torch.where(d != 0, d, torch.ones_like(d)))
    return d, torch.where(d != 0, codes, torch.zeros_like(codes))


def kquant_parts(codes, scale, zero_point, name):
    """(d, dmin, sc, m, q) of K-quant blocks from the codes and qparams `qat.primitives` gives."""
    spec = kquant_spec(name)
    smax, per = GGML_K[spec.bits][3], QK_K // spec.group_size
    d, sc = _levels(scale.reshape(-1, per), smax, spec.symmetric)
    dmin = m = None
    if zero_point is not None:
        dmin, m = _levels(zero_point.reshape(-1, per), smax, False)
    return d, dmin, sc, m, codes.reshape(-1, QK_K).to(torch.int16)


def _shift_or(parts: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """OR of parts.select(dim, i) << shifts[i] (integer parts; uint8 shifts drop the bits above 7)."""
    out = torch.zeros_like(parts.select(dim, 0))
    for i, s in enumerate(shifts):
        out |= parts.select(dim, i) << s
    return out


def _scales_k4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K 12-byte packing of eight 6-bit scales and eight 6-bit minimums."""
    sc, m = sc.int(), m.int()
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], 1)


def _qs_2bit(u: torch.Tensor) -> torch.Tensor:
    """[nb, 256] 2-bit values -> [nb, 64]: element 128h + 32s + i at bits 2s of byte 32h + i."""
    return _shift_or((u & 3).reshape(-1, 2, 4, 32), [0, 2, 4, 6], 2).reshape(-1, 64)


def _qs_4bit(u: torch.Tensor) -> torch.Tensor:
    """[nb, 256] nibbles -> [nb, 128]: element 64c + i low, 64c + 32 + i high nibble of byte 32c + i."""
    return _shift_or((u & 0xF).reshape(-1, 4, 2, 32), [0, 4], 2).reshape(-1, 128)


def _bitplane(u: torch.Tensor, bit: int) -> torch.Tensor:
    """[nb, 256] -> [nb, 32]: bit `bit` of element 32k + i at bit k of byte i."""
    return _shift_or(((u >> bit) & 1).reshape(-1, 8, 32), list(range(8)), 1)


def _blocks(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], 1).reshape(rows, -1)


def kquant_blocks(codes, scale, zero_point, name: str) -> torch.Tensor:
    """GGUF blocks [rows, bytes] of K-quant type `name` from codes [rows, cols] and qparams of `kquant_spec(name)`."""
    rows = codes.shape[0]
    d, dmin, sc, m, q = kquant_parts(codes, scale, zero_point, name)
    # bit fields are cut from uint8 codes (0..63 once offset): byte ops are the cheapest tensor ops
    q = (q + {"Q3_K": 4, "Q6_K": 32}.get(name, 0)).to(torch.uint8)
    if name == "Q2_K":
        parts = [sc.int() | (m.int() << 4), _qs_2bit(q), _half_bytes(d), _half_bytes(dmin)]
    elif name == "Q4_K":
        parts = [_half_bytes(d), _half_bytes(dmin), _scales_k4(sc, m), _qs_4bit(q)]
    elif name == "Q5_K":
        parts = [_half_bytes(d), _half_bytes(dmin), _scales_k4(sc, m), _bitplane(q, 4), _qs_4bit(q)]
    elif name == "Q3_K":
        u, s6 = q, (sc + 32).int()
        low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
        high = _shift_or(((s6 >> 4) & 3).reshape(-1, 4, 4), [0, 2, 4, 6], 1)
        parts = [_bitplane(u, 2), _qs_2bit(u), low, high, _half_bytes(d)]
    else:  # Q6_K
        u = q
        ql = _shift_or((u & 0xF).reshape(-1, 2, 2, 64), [0, 4], 2).reshape(-1, 128)
        qh = _shift_or(((u >> 4) & 3).reshape(-1, 2, 4, 32), [0, 2, 4, 6], 2).reshape(-1, 64)
        parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), _half_bytes(d)]
    return _blocks(parts, rows)


def _encoder(name: str):
    def encode_k(x: torch.Tensor, importance: torch.Tensor | None = None, values: bool = True):
        """Blocks and (when `values`) decoded values of one chunk of rows: the grid of `kquant_spec(name)`
        (`qat.grids`, what `qat.primitives` computes) on the fitted sub-block ranges."""
        spec = kquant_spec(name)
        grid = GRIDS["ggml_k"]
        view = x.reshape(x.shape[0], -1, spec.group_size)
        scale, zero_point = grid.qparams(*fitted_range(x, spec, importance), spec)
        codes, _ = grid.codes(view, scale, zero_point, spec)
        blocks = kquant_blocks(codes.reshape(x.shape), scale, zero_point, name)
        return blocks, grid.values(codes, scale, zero_point).reshape(x.shape) if values else None
    encode_k.__name__ = f"encode_{name.lower()}"
    return encode_k


ENCODERS = {v[0]: _encoder(v[0]) for v in GGML_K.values()}
