"""GGUF K-quants Q2_K..Q6_K (grid="ggml_k"): two-level scales over super-blocks of 256 values.

Super-blocks of 256 values hold sub-blocks of 16 or 32 values (the spec's group_size). Each sub-block's scale
(and minimum) is quantized to an integer code under an fp16 super-block scale (x^ = d*sc*q - dmin*m), and the
codes are computed with the quantized scales, as llama.cpp's reference quantizer does; a model trained on
`kquant_spec(name)` (recipes gguf_q*_k) holds exactly the codes its GGUF blocks store.

Besides the grid, this module holds (1) the fit of the sub-block ranges used when encoding float weights
(`fitted_range`): symmetric types use the signed peak, asymmetric types search `NSTEP` + 1 candidate scales
around min-max with a weighted least-squares refit of scale and minimum (the idea of llama.cpp's
make_qkx2_quants, weights |x| + rms(x), or an imatrix), and (2) the blocks (`kquant_blocks`; bit layout in
`kquant_layout`). Decoded values are exactly d*sc*q - dmin*m in float32, gguf.quants.dequantize's math.

Storage of a converted weight: the codes at `bits` bits; per row and super-block the fp16 d (and dmin) and
the packed integer sub-block scales (and minimums): the GGUF block's bytes (Q2_K 2.625, Q3_K 3.4375,
Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625 bits per weight). A row that is not a multiple of 256 ends in a partial
super-block (padded; GGUF cannot store it, and the GGUF writer falls back to another type, as llama.cpp; recipe
key gguf_fallback: such modules train on that type instead).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qat.errors import ConfigError
from qat.formats.base import Format, GGUFType, register_format
from qat.formats.common import block_range, divide, fixed_sum, mean_square, run_sums, signed_peak
from qat.formats.kquant_layout import layout_blocks
from qat.packing import pack, packed_numel, unpack
from qat.spec import QuantSpec

QK_K = 256
NSTEP = {"Q2_K": 8, "Q4_K": 4, "Q5_K": 4}  # candidates searched; more costs time for little gain


class KType(NamedTuple):
    name: str
    symmetric: bool
    sub: int  # sub-block size (the spec's group_size)
    smax: int  # largest sub-block scale code
    nbytes: int  # bytes per super-block of 256 values
    sc_bits: int  # bits of a stored sub-block scale code (sc - sc_min)
    sc_min: int


GGML_K = {2: KType("Q2_K", False, 16, 15, 84, 4, 0), 3: KType("Q3_K", True, 16, 32, 110, 6, -32),
          4: KType("Q4_K", False, 32, 63, 144, 6, 0), 5: KType("Q5_K", False, 32, 63, 176, 6, 0),
          6: KType("Q6_K", True, 16, 128, 210, 8, -128)}


def kquant_spec(name: str) -> QuantSpec:
    """The QuantSpec (grid="ggml_k") whose numerics are GGUF K-quant type `name`.

    Example:
        >>> kquant_spec("Q4_K").describe()
        'int4 asym g32 ggml_k'
    """
    bits = next((b for b, v in GGML_K.items() if v.name == name), None)
    if bits is None:
        raise KeyError(f"{name!r} is not a K-quant; choose from {[v.name for v in GGML_K.values()]}")
    k = GGML_K[bits]
    return QuantSpec(bits=bits, symmetric=k.symmetric, granularity="per_group", group_size=k.sub, scale_dtype="fp16",
                     grid="ggml_k")


def _super_view(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sub-block values [..., n_sub, 1] -> [..., n_super, subs per super-block of 256]. A row that is not a
    multiple of 256 ends in a partial super-block (zero-padded here)."""
    per = QK_K // spec.group_size
    flat = t.reshape(*t.shape[:-2], -1)
    pad = (-flat.shape[-1]) % per
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(*flat.shape[:-1], -1, per)


def _from_super(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.reshape(*t.shape[:-2], -1)[..., : shape[-2]].reshape(shape)


def _second_level_codes(values: torch.Tensor, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values -> (fp16-exact super-scale, integer codes 0..smax), as llama.cpp."""
    vmax = values.amax(-1, keepdim=True)
    inv = torch.where(vmax > 0, smax / vmax, torch.zeros_like(vmax))
    return divide(vmax, smax).to(torch.float16).float(), torch.round(inv * values).clamp_(0, smax)


def _levels(values: torch.Tensor, smax: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective sub-block values d*code [nb, n] -> (d [nb, 1], integer codes): undoes `qparams`'s
    second level exactly (the peak sub-block holds code smax, or -smax when signed)."""
    peak = signed_peak(values)
    d = divide(peak, -smax if signed else smax)
    codes = torch.round(values / torch.where(d != 0, d, torch.ones_like(d)))
    return d, torch.where(d != 0, codes, torch.zeros_like(codes))


def _sums(w, L, x, wl, tmp):
    """sum w*L, sum w*L*L, sum w*L*x over sub-blocks, written through the scratch tensors wl and tmp: fresh
    megabyte temporaries per candidate cost page faults (glibc hands them back to the OS), more than the math."""
    torch.mul(w, L, out=wl)
    return fixed_sum(wl), fixed_sum(torch.mul(wl, L, out=tmp)), fixed_sum(torch.mul(wl, x, out=tmp))


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
    with an imatrix: imp * sqrt(sigma^2 + x^2); without it, the weights are rms(x) + |x|. Computed in float32
    (llama.cpp quantizes from F32; a bfloat16 search would round every sum to 8 bits), block sums in one order on
    every device (`fixed_sum`)."""
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True)
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    if importance is None:
        w = torch.abs(x).add_(mean_square(x).sqrt())
    else:
        sigma2 = 2 * mean_square(x)
        w = importance * (sigma2 + x * x).sqrt()
    L, wl, tmp = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    torch.mul(w, x, out=tmp)
    sw, sx, sxx = fixed_sum(w), fixed_sum(tmp), fixed_sum(tmp.mul_(x))
    shifted = x - lo
    best_scale, best_min = divide(rng, nmax), lo
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


def fitted_range(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per sub-block for `choose_qparams`: from the weighted search for the asymmetric types
    (weighted by `importance` [cols] when given), from `compute_range` (the signed peak) for the symmetric ones."""
    if spec.symmetric:
        return block_range(w.reshape(w.shape[0], -1, spec.group_size), True)
    nmax = spec.qmax
    imp = None if importance is None else importance.float().reshape(1, -1, spec.group_size)
    nstep = NSTEP[GGML_K[spec.bits].name] + (8 if imp is not None else 0)
    scale, mins = fit_asym(w.reshape(w.shape[0], -1, spec.group_size), nmax, nstep, imp)
    lo = -mins
    return lo.unsqueeze(-1), (lo + scale * nmax).unsqueeze(-1)


def kquant_parts(codes, scale, zero_point, name):
    """(d, dmin, sc, m, q) of K-quant blocks from the codes and qparams `qat.primitives` gives."""
    spec = kquant_spec(name)
    smax, per = GGML_K[spec.bits].smax, QK_K // spec.group_size
    d, sc = _levels(scale.reshape(-1, per), smax, spec.symmetric)
    dmin = m = None
    if zero_point is not None:
        dmin, m = _levels(zero_point.reshape(-1, per), smax, False)
    return d, dmin, sc, m, codes.reshape(-1, QK_K).to(torch.int16)


def kquant_blocks(codes, scale, zero_point, name: str) -> torch.Tensor:
    """GGUF blocks [rows, bytes] of K-quant type `name` from codes [rows, cols] and qparams of `kquant_spec(name)`."""
    return layout_blocks(name, *kquant_parts(codes, scale, zero_point, name), rows=codes.shape[0])


def _encoder(name: str):
    def encode_k(x: torch.Tensor, importance: torch.Tensor | None = None, values: bool = True):
        """Blocks and (when `values`) decoded values of one chunk of rows: the grid of `kquant_spec(name)`
        (what `qat.primitives` computes) on the fitted sub-block ranges."""
        spec = kquant_spec(name)
        view = x.reshape(x.shape[0], -1, spec.group_size)
        scale, zero_point = FORMAT.qparams(*fitted_range(x, spec, importance), spec)
        codes, _ = FORMAT.codes(view, scale, zero_point, spec)
        blocks = kquant_blocks(codes.reshape(x.shape), scale, zero_point, name)
        return blocks, FORMAT.values(codes, scale, zero_point, spec).reshape(x.shape) if values else None
    encode_k.__name__ = f"encode_{name.lower()}"
    return encode_k


_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class KQuantFormat(Format):
    """The K-quants; see the module docstring."""

    name, grid, dtypes = "ggml_k", "ggml_k", ("int",)
    gguf = tuple(GGUFType(k.name, QK_K, k.nbytes, lambda n=k.name: kquant_spec(n), _encoder(k.name),
                          lambda c, s, z, n=k.name: kquant_blocks(c, s, z, n), weighted=not k.symmetric,
                          fallback=_FALLBACK[k.name]) for k in GGML_K.values())

    def check(self, spec: QuantSpec) -> None:
        if spec.bits not in GGML_K:
            raise ConfigError(f"QuantSpec.grid='ggml_k' needs dtype=int and bits in {sorted(GGML_K)}")
        k = GGML_K[spec.bits]
        if (spec.symmetric != k.symmetric or spec.granularity != "per_group" or spec.group_size != k.sub
                or spec.scale_dtype != "fp16" or spec.learn != "none" or spec.signed != k.symmetric):
            raise ConfigError(f"QuantSpec.grid='ggml_k' with bits={spec.bits} is {k.name}: it needs symmetric={k.symmetric}, "
                             f"granularity='per_group', group_size={k.sub}, scale_dtype='fp16', learn='none'")

    def gguf_type(self, spec: QuantSpec) -> str | None:
        return GGML_K[spec.bits].name

    def peak_range(self, spec: QuantSpec) -> bool:
        return spec.symmetric

    def qparams(self, lo, hi, spec):
        """The effective sub-block scale d*sc (and minimum dmin*m, held in zero_point and subtracted:
        x^ = scale*q - zero_point), with d, dmin fp16 super-block scales and sc, m integer codes.
        Asymmetric (Q2_K/Q4_K/Q5_K): scale = (hi - min(lo, 0)) / qmax, minimum = -min(lo, 0), then both
        quantized. Symmetric (Q3_K/Q6_K): lo == hi == the signed peak (see compute_range), scale = peak /
        qmin, then signed sub-scales sc = round(-smax / peak_scale * scale) under d = fp16(peak_scale / -smax)."""
        smax = GGML_K[spec.bits].smax
        shape = lo.shape
        if not spec.symmetric:
            lo = lo.clamp(max=0)
            d, sc = _second_level_codes(_super_view(divide(hi - lo, spec.qmax), spec), smax)
            dmin, m = _second_level_codes(_super_view(-lo, spec), smax)
            return _from_super(d * sc, shape), _from_super(dmin * m, shape)
        scale = _super_view(divide(lo, spec.qmin), spec)
        peak = signed_peak(scale)
        nz = peak != 0
        iscale = torch.where(nz, -smax / torch.where(nz, peak, torch.ones_like(peak)), torch.zeros_like(peak))
        sc = torch.round(iscale * scale).clamp_(-smax, smax - 1)
        d = torch.where(nz, (1 / torch.where(nz, iscale, torch.ones_like(iscale))).to(torch.float16).float(),
                        torch.zeros_like(peak))
        return _from_super(d * sc, shape), None

    def shared_error(self, err, spec):
        return run_sums(err, QK_K // spec.group_size)  # d / dmin are per super-block of 256

    def codes(self, view, scale, zero_point, spec, need_mask=False):
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        t = torch.round((view if zero_point is None else view + zero_point) / safe)
        t = torch.where(scale != 0, t, torch.zeros_like(t))
        mask = t.ge(spec.qmin).logical_and_(t.le(spec.qmax)) if need_mask else None
        return t.clamp_(spec.qmin, spec.qmax), mask

    def values(self, t, scale, zero_point, spec):
        t = t.mul_(scale)
        return t if zero_point is None else t.sub_(zero_point)

    # storage: per row, super-blocks of (fp16 d, packed sc) and (fp16 dmin, packed m)
    def _super_counts(self, spec, shape):
        rows, n_sub = math.prod(shape[:-1]), shape[-1] // spec.group_size
        return rows, n_sub, -(-n_sub // (QK_K // spec.group_size))

    def _pack_level(self, values, spec, rows, signed):
        k = GGML_K[spec.bits]
        d, sc = _levels(_super_view(values.reshape(rows, -1, 1), spec), k.smax, signed)
        low = k.sc_min if signed else 0
        return torch.cat([d.to(torch.float16).reshape(-1).view(torch.uint8),
                          pack((sc.to(torch.int16) - low).to(torch.uint8), k.sc_bits)])

    def _unpack_level(self, stored, spec, shape, signed):
        k = GGML_K[spec.bits]
        rows, n_sub, n_super = self._super_counts(spec, shape)
        per = QK_K // spec.group_size
        d = stored[: 2 * rows * n_super].view(torch.float16).float().reshape(rows, n_super, 1)
        sc = unpack(stored[2 * rows * n_super:], k.sc_bits, rows * n_super * per).float()
        sc = (sc + (k.sc_min if signed else 0)).reshape(rows, n_super, per)
        qshape = [*shape[:-1], n_sub, 1]
        while qshape and qshape[0] == 1:  # the qparams layout strips leading singleton dims
            qshape.pop(0)
        return _from_super(d * sc, torch.Size(qshape))

    def pack(self, codes, scale, zero_point, spec):
        rows = math.prod(codes.shape[:-1])
        zp = torch.empty(0, dtype=torch.uint8, device=scale.device)
        return {"packed": pack((codes.to(torch.int16) - spec.qmin).to(torch.uint8), spec.bits),
                "scale": self._pack_level(scale, spec, rows, spec.symmetric),
                "zero_point": zp if zero_point is None else self._pack_level(zero_point, spec, rows, False)}

    def unpack(self, stored, spec, shape):
        raw = unpack(stored["packed"], spec.bits, math.prod(shape)).to(torch.int16) + spec.qmin
        scale = self._unpack_level(stored["scale"], spec, shape, spec.symmetric)
        zp = self._unpack_level(stored["zero_point"], spec, shape, False) if stored["zero_point"].numel() else None
        return raw.to(self.codes_dtype(spec)).reshape(shape), scale, zp

    def storage_bits(self, spec, shape):
        k = GGML_K[spec.bits]
        rows, _, n_super = self._super_counts(spec, shape)
        level = 16 * rows * n_super + 8 * packed_numel(rows * n_super * QK_K // spec.group_size, k.sc_bits)
        return 8 * self.packed_nbytes(spec, shape) + level * (1 if spec.symmetric else 2)


FORMAT = register_format(KQuantFormat())
