"""GGUF K-quant encoders (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), vectorized over all blocks of a tensor.

Super-blocks of 256 values hold sub-blocks of 16 or 32. Each sub-block gets a float scale (and, for the
asymmetric types, a minimum) fitted here; those are then quantized under fp16 super-scales (`d`, `dmin`),
and the codes are recomputed with the quantized scales, as llama.cpp's reference quantizer does. The
decoded values are therefore exactly `dl * q - dm` with dl = fp16(d) * sc, dm = fp16(dmin) * m, in float32,
the arithmetic of `gguf.quants.dequantize`.

Fitting: symmetric types use the sub-block's signed absolute maximum; asymmetric types search
`nstep` + 1 candidate scales around min-max with a weighted least-squares refit of scale and minimum
(the idea of llama.cpp's make_qkx2_quants, weights |x| + rms(x)), keeping the best per sub-block.
"""
from __future__ import annotations

import torch

QK_K = 256
ASYM = {"Q2_K": (16, 3, 15), "Q4_K": (32, 15, 63), "Q5_K": (32, 31, 63)}  # sub-block, code max, scale max
SYM = {"Q3_K": (16, 4, 32), "Q6_K": (16, 32, 128)}  # sub-block, -code min, -scale min
NSTEP = {"Q2_K": 8, "Q4_K": 4, "Q5_K": 4}  # candidates searched; more costs time for little gain


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1).to(torch.float16).contiguous().view(torch.uint8)


def _sums(w, L, x):
    wl = w * L
    return wl.sum(-1, keepdim=True), (wl * L).sum(-1, keepdim=True), (wl * x).sum(-1, keepdim=True)


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


def fit_asym(x: torch.Tensor, nmax: int, nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block (scale >= 0, minimum <= 0) for x [..., sub] so that x ~ scale * L + minimum."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    w = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    sw, sx, sxx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True), (w * x * x).sum(-1, keepdim=True)
    shifted = x - lo
    best_scale, best_min = rng / nmax, lo
    L = torch.round(shifted * (nmax / safe)).clamp_(0, nmax)
    sl, sl2, sxl = _sums(w, L, x)
    s, m = best_scale, best_min
    best_err = s * s * sl2 + 2 * s * m * sl + m * m * sw - 2 * s * sxl - 2 * m * sx + sxx
    for k in range(nstep + 1):
        L = torch.round(shifted * ((nmax - 1 + 0.1 * k) / safe)).clamp_(0, nmax)
        scale, mn, err = _wls(sw, sx, sxx, *_sums(w, L, x))
        better = err < best_err
        best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, mn, best_min)
        best_err = torch.where(better, err, best_err)
    return best_scale.clamp(min=0).squeeze(-1), (-best_min).squeeze(-1)


def _second_level(values: torch.Tensor, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values [nb, n] -> (fp16-rounded super-scale [nb, 1], integer codes 0..smax)."""
    vmax = values.amax(-1, keepdim=True)
    inv = torch.where(vmax > 0, smax / vmax, torch.zeros_like(vmax))
    codes = torch.round(inv * values).clamp_(0, smax)
    return _f16(vmax / smax), codes


def quantize_asym(x: torch.Tensor, name: str):
    """Q2_K / Q4_K / Q5_K: (d, dmin [nb,1] fp16-exact, sc, m [nb, nsub], q [nb, nsub, sub], values)."""
    sub, nmax, smax = ASYM[name]
    xb = x.reshape(-1, QK_K // sub, sub)
    scale, mins = fit_asym(xb, nmax, NSTEP[name])
    d, sc = _second_level(scale, smax)
    dmin, m = _second_level(mins, smax)
    dl, dm = (d * sc).unsqueeze(-1), (dmin * m).unsqueeze(-1)
    q = torch.round((xb + dm) / torch.where(dl > 0, dl, torch.ones_like(dl))).clamp_(0, nmax)
    q = torch.where(dl > 0, q, torch.zeros_like(q))
    return d, dmin, sc, m, q, (dl * q - dm).reshape(x.shape)


def quantize_sym(x: torch.Tensor, name: str):
    """Q3_K / Q6_K: (d [nb,1] fp16-exact, sc [nb, 16] signed, q [nb, 16, 16] signed, values)."""
    sub, nmax, smax = SYM[name]
    xb = x.reshape(-1, QK_K // sub, sub)
    idx = xb.abs().argmax(-1, keepdim=True)
    scale = xb.gather(-1, idx).squeeze(-1) / -nmax
    idx2 = scale.abs().argmax(-1, keepdim=True)
    max_scale = scale.gather(-1, idx2)
    nz = max_scale != 0
    iscale = torch.where(nz, -smax / torch.where(nz, max_scale, torch.ones_like(max_scale)), torch.zeros_like(max_scale))
    sc = torch.round(iscale * scale).clamp_(-smax, smax - 1)
    d = torch.where(nz, _f16(1 / torch.where(nz, iscale, torch.ones_like(iscale))), torch.zeros_like(iscale))
    dl = (d * sc).unsqueeze(-1)
    q = torch.round(xb / torch.where(dl != 0, dl, torch.ones_like(dl))).clamp_(-nmax, nmax - 1)
    q = torch.where(dl != 0, q, torch.zeros_like(q))
    return d, sc, q, (dl * q).reshape(x.shape)


def _shift_or(parts: torch.Tensor, shifts: list[int], dim: int) -> torch.Tensor:
    """OR of parts.select(dim, i) << shifts[i] (parts int32)."""
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


def encode_q2_k(x):
    d, dmin, sc, m, q, values = quantize_asym(x, "Q2_K")
    u = q.reshape(-1, QK_K).int()
    parts = [sc.int() | (m.int() << 4), _qs_2bit(u), _half_bytes(d), _half_bytes(dmin)]
    return _blocks(parts, x.shape[0]), values


def encode_q4_k(x):
    d, dmin, sc, m, q, values = quantize_asym(x, "Q4_K")
    u = q.reshape(-1, QK_K).int()
    parts = [_half_bytes(d), _half_bytes(dmin), _scales_k4(sc, m), _qs_4bit(u)]
    return _blocks(parts, x.shape[0]), values


def encode_q5_k(x):
    d, dmin, sc, m, q, values = quantize_asym(x, "Q5_K")
    u = q.reshape(-1, QK_K).int()
    parts = [_half_bytes(d), _half_bytes(dmin), _scales_k4(sc, m), _bitplane(u, 4), _qs_4bit(u)]
    return _blocks(parts, x.shape[0]), values


def encode_q3_k(x):
    d, sc, q, values = quantize_sym(x, "Q3_K")
    u = (q.reshape(-1, QK_K) + 4).int()
    s6 = (sc + 32).int()
    low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
    high = _shift_or(((s6 >> 4) & 3).reshape(-1, 4, 4), [0, 2, 4, 6], 1)
    parts = [_bitplane(u, 2), _qs_2bit(u), low, high, _half_bytes(d)]
    return _blocks(parts, x.shape[0]), values


def encode_q6_k(x):
    d, sc, q, values = quantize_sym(x, "Q6_K")
    u = (q.reshape(-1, QK_K) + 32).int()
    ql = _shift_or((u & 0xF).reshape(-1, 2, 2, 64), [0, 4], 2).reshape(-1, 128)
    qh = _shift_or(((u >> 4) & 3).reshape(-1, 2, 4, 32), [0, 2, 4, 6], 2).reshape(-1, 64)
    parts = [ql, qh, sc.to(torch.int8).view(torch.uint8), _half_bytes(d)]
    return _blocks(parts, x.shape[0]), values


ENCODERS = {"Q2_K": encode_q2_k, "Q3_K": encode_q3_k, "Q4_K": encode_q4_k, "Q5_K": encode_q5_k, "Q6_K": encode_q6_k}
