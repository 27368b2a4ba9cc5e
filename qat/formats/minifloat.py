"""The small floats the microscaling formats share: E2M1 elements (FP4) and E8M0 power-of-two scales.

E2M1 (OCP MX v1.0, sec. 5.3.3): 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6;
no inf / NaN. The formats compute with the values doubled, the integers 0, +-1, +-2, +-3, +-4, +-6, +-8, +-12
(llama.cpp's kvalues_mxfp4): these are the codes `quantize` returns (int8), and x^ = code * (scale / 2), exact.
Storage uses the 4-bit pattern sign << 3 | magnitude index (`e2m1_index`): 0..7 are +0..+6, 8..15 -0..-6, the
order of llama.cpp's kvalues_mxfp4 and of compressed-tensors' pack_fp4_to_uint8. Rounding is to nearest, ties to
the even mantissa (IEEE / OCP round-to-nearest-even): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
3.5 -> 4, 5 -> 4; magnitudes above 6 saturate to 6 (the OCP conversion for formats without inf).

E8M0 (OCP MX sec. 5.4.1): an unsigned biased exponent e, value 2^(e - 127), e in 0..254 (255 is NaN, never
written). Scales are float32 tensors holding exact powers of two 2^-127..2^127 (2^-127 is a float32 subnormal).
"""
from __future__ import annotations

import torch

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = torch.tensor(E2M1_MAGNITUDES + tuple(-v for v in E2M1_MAGNITUDES), dtype=torch.float32)
E2M1_MAX = 6.0
E2M1_INSIDE = 7.0  # |x / scale| up to the largest level plus half its step rounds to it without clipping (STE mask)
E2M1_EMAX = 2  # exponent of the largest normal, 6 = 1.5 * 2^2: what the OCP shared-exponent rule subtracts
_INDEX = torch.full((13,), 0, dtype=torch.uint8)
_INDEX[torch.tensor([0, 1, 2, 3, 4, 6, 8, 12])] = torch.arange(8, dtype=torch.uint8)
_DOUBLED = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)
E8M0_MIN, E8M0_MAX = -127, 127
E4M3_MAX = 448.0


def e2m1_doubled(t: torch.Tensor) -> torch.Tensor:
    """2 * E2M1(t) (float32 integers -12..12) of `t` (already divided by its scale): round to nearest even,
    saturate at 6. Doubling is exact, so this is `e2m1_codes_` of 2t (a new tensor).

    Example:
        >>> e2m1_doubled(torch.tensor([0.25, 0.75, 2.5, -5.0, 9.0]))
        tensor([  0.,   2.,   4.,  -8.,  12.])
    """
    return e2m1_codes_(t * 2, t)[0]


_ROUNDER = (22 << 23) + 0x400000  # adds 22 to a float32 exponent field and sets the top mantissa bit (x 1.5)


def e2m1_codes_(d: torch.Tensor, sign: torch.Tensor, need_mask: bool = False):
    """(2 * E2M1(d / 2), mask |d| <= 14 or None), rounding `d` in place (float32, values already doubled, e.g.
    x / (scale / 2)); the sign of each result is taken from `sign` (same signs as `d`: the unscaled input, or `d`
    itself before the call), so -0 stays -0. The mask marks the elements inside E2M1's STE range
    (|d / 2| <= `E2M1_INSIDE`).

    The doubled E2M1 levels are the multiples of step = 1 below 4, 2 in [4, 8), 4 in [8, 12]: step is |d|'s
    binade 2^e halved (at least 1), read from the float32 exponent bits. Adding then subtracting C = 1.5 * 2^23 *
    step rounds to a multiple of step with ties to the even multiple (IEEE round-to-nearest-even: |d| <= 12 keeps
    d + C in [2^23 step, 2^24 step), whose last mantissa bit is worth step), which is E2M1's even mantissa. Seven
    in-place passes and one int32 scratch, no comparison or where (the earlier 1 + [m >= 4] + 2 [m >= 8], divide,
    round, multiply took 14 passes and 4 fresh tensors); `tests/unit/test_mxfp4.py` checks it against a
    brute-force nearest-value search. (Chunking the passes to keep the scratch in cache was faster on one thread
    and slower on two threads of the loaded CPU: not done.)
    """
    mask = d.abs_() <= 2 * E2M1_INSIDE if need_mask else None  # in place: the sign comes back from `sign`
    return _round_doubled_(d, sign, torch.empty_like(d, dtype=torch.int32)), mask


def _round_doubled_(d: torch.Tensor, sign: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The rounding of `e2m1_codes_` in place on `d`, with `c` (int32, d's shape) as scratch."""
    d.clamp_(-12.0, 12.0)  # saturation at 6 first: every level is then in a binade with step <= 4 (NaN stays NaN)
    torch.bitwise_and(d.view(torch.int32), 0x7F800000, out=c)  # |d|'s binade 2^e (the sign bit dropped)
    c.clamp_(0x40000000, 0x41000000).add_(_ROUNDER)  # 2^e in [2, 8] -> C = 1.5 * 2^(e + 22) = 1.5 * 2^23 * step
    cf = c.view(torch.float32)
    return d.add_(cf).sub_(cf).copysign_(sign)  # (d + C) - C: both exact but the rounding


def e2m1_index(doubled: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 patterns (uint8, sign << 3 | magnitude index) of doubled values."""
    d = doubled.to(torch.int16)
    return _INDEX.to(d.device)[d.abs().long()] | ((d < 0).to(torch.uint8) << 3)


def e2m1_from_index(index: torch.Tensor) -> torch.Tensor:
    """Doubled values (int8) of 4-bit E2M1 patterns."""
    return _DOUBLED.to(index.device)[index.long()]


def pow2_floor_exponent(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of positive float32 `x`, exactly (frexp, not a rounded log2), as int32."""
    _, e = torch.frexp(x)
    return (e - 1).to(torch.int32)


def exp2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for integer e in [-149, 127], exactly (ldexp on 1.0, subnormals included)."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32))


def nearest_pow2(scale: torch.Tensor) -> torch.Tensor:
    """`scale` on the E8M0 grid: the power of two nearest in log2 (2^k for scale in [2^(k-1/2), 2^(k+1/2))), clamped
    to 2^-127..2^127. A power of two stays itself, so scales from `mx_scale` pass unchanged; a learned (LSQ)
    scale moves freely and the grid uses its nearest power of two."""
    m, e = torch.frexp(scale.float())  # scale = m 2^e, m in [0.5, 1)
    k = (e - 1) + (m >= 2 ** -0.5).to(e.dtype)
    return exp2(k.clamp(E8M0_MIN, E8M0_MAX))


def e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, exponent + 127) of power-of-two float32 scales (rounded by `nearest_pow2` first)."""
    return (pow2_floor_exponent(nearest_pow2(scale)) + 127).to(torch.uint8)


def e8m0_scale(e: torch.Tensor) -> torch.Tensor:
    """float32 scales 2^(e - 127) of E8M0 bytes."""
    return exp2(e.to(torch.int32) - 127)


def mx_scale(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """The OCP MX shared scale of blocks with absolute maximum `amax`: 2^(floor(log2 amax) - emax), clamped to the
    E8M0 range; 2^-127 for an all-zero block. llama.cpp's quantize_row_mxfp4_ref takes the same exponent (its
    floorf(log2f(amax)) can differ only for amax within a float32 rounding of log2 below a power of two)."""
    live = amax > 0
    e = pow2_floor_exponent(torch.where(live, amax, torch.ones_like(amax))) - emax
    e = torch.where(live, e, torch.full_like(e, E8M0_MIN))
    return exp2(e.clamp(E8M0_MIN, E8M0_MAX))


def e4m3_scale_grid(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level NVFP4 scales of float32 block scales `scale` (one tensor): (scale on the grid, global g).

    g = 2^floor(log2(448 / max scale)) is the largest power of two that keeps every block scale times g within
    E4M3's 448 (1.0 for an all-zero tensor); each block stores e4m3(scale * g) (round to nearest even) and means
    e4m3 / g. A power-of-two g loses at most one binade of E4M3's range against 448 / max, and makes e4m3 / g,
    and its products with E2M1 values, exact in float32 and bfloat16: every reader decodes the same number.
    Idempotent: scales from this function come back unchanged (their g may double, the values do not move).
    """
    s = scale.float().clamp(min=0)
    m = s.amax() if s.numel() else s.new_zeros(())
    live = m > 0
    g = exp2(pow2_floor_exponent(torch.where(live, E4M3_MAX / m.clamp(min=2.0**-100), torch.ones_like(m))).clamp(-126, 127))
    blocks = (s * g).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    return blocks / g, g
