"""The fast encoder paths give the codes of the straightforward ones (gguf-py's arithmetic written out, argmax
peaks), on adversarial blocks: ties, zeros (signed), constant blocks, huge and tiny values, negative peaks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qat.export.ggml_blocks import encode, encode_blocks
from qat.formats import get_format
from qat.formats.common import HALF_DOWN, signed_peak
from qat.formats.ggml import LEGACY, ggml_spec, legacy_blocks
from qat.primitives import choose_qparams, compute_range, quantize


def _adversarial(cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, cols, generator=g) * torch.logspace(-7, 4, 24).unsqueeze(1)  # fp16 scales hold these
    w[0] = 0.0
    w[0, 0] = -0.0                                # all-zero block starting with -0.0
    w[1, :32] = 0.25                              # constant blocks, both signs
    w[1, 32:64] = -0.25
    w[2, :32] = torch.linspace(-1, 1, 32)         # |min| == max: a tie, first is negative
    w[2, 32:64] = torch.linspace(1, -1, 32)       # the same tie, first is positive
    w[3] = torch.randn(cols, generator=g).round() / 2  # exact halves after scaling
    w[4, :32] = -5.0
    w[4, 5] = -7.0                                # negative peak
    w[5, :32] = 1e-38                             # tiny (near-denormal scales)
    w[6, :32] = torch.tensor([1.0, -1.0] * 16)    # ties everywhere
    w[7] = torch.randint(-8, 8, (cols,), generator=g).float()  # values on the grid itself
    return w


def _reference_codes(view, scale, zero_point, spec):
    """gguf-py's legacy arithmetic as it writes it (np_roundf, trunc), clamped to the code range."""
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    if spec.bits == 8:
        t = view * inv
        a = t.abs()
        fl = a.floor()
        t = torch.sign(t) * (fl + (2 * (a - fl)).floor())
    elif spec.symmetric:
        half = 2 ** (spec.bits - 1)
        t = torch.trunc(view * inv + (half + 0.5)) - half
    else:
        t = torch.trunc((view - zero_point) * inv + 0.5)
    return t.clamp(spec.qmin, spec.qmax), (t >= spec.qmin) & (t <= spec.qmax)


def test_half_down_rounding_is_roundf():
    # every float32 in [0, 4) and the neighbourhood of every half up to 2^24 (checked exhaustively offline)
    small = torch.arange(0, int(torch.tensor(4.0).view(torch.int32)), 97, dtype=torch.int32).view(torch.float32)
    halves = torch.arange(0, 1 << 24, 1, dtype=torch.float32)[::1021] + 0.5
    near = torch.cat([halves, halves.nextafter(torch.tensor(0.0)), halves.nextafter(torch.tensor(1e30))])
    t = torch.cat([small, near, torch.tensor([0.49999997, 0.5, 1.5, 2.5])])
    t = torch.cat([t, -t])
    a = t.abs()
    fl = a.floor()
    ref = torch.sign(t) * (fl + (2 * (a - fl)).floor())
    assert torch.equal(torch.trunc(t + HALF_DOWN * torch.sign(t)), ref)


def test_signed_peak_is_first_argmax_peak():
    view = _adversarial().reshape(24, -1, 32)
    ref = view.gather(-1, view.abs().argmax(-1, keepdim=True))
    got = signed_peak(view)
    assert torch.equal(got, ref)
    assert torch.equal(torch.signbit(got), torch.signbit(ref))  # -0.0 stays -0.0


@pytest.mark.parametrize("name", sorted(LEGACY))
@pytest.mark.parametrize("need_mask", [False, True], ids=["codes", "codes+mask"])
def test_grid_codes_equal_reference_arithmetic(name, need_mask):
    spec, w = ggml_spec(name), _adversarial()
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    view = w.reshape(24, -1, 32)
    scale = scale.reshape(24, -1, 1)
    zp = None if zp is None else zp.reshape(24, -1, 1)
    for s in (scale, scale / 2):  # a pinned half scale puts many codes outside the range
        ref, ref_mask = _reference_codes(view, s, zp, spec)
        codes, mask = get_format("ggml").codes(view, s, zp, spec, need_mask)
        defined = ref.isfinite()  # a denormal scale has an infinite inverse: NaN there, an int8 cast's choice
        assert torch.equal(codes[defined], ref[defined]) and bool(codes.isfinite().all())
        if need_mask:
            assert torch.equal(mask[defined], ref_mask[defined])


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_fast_blocks_bit_identical_to_gguf_py_on_adversarial_blocks(name):
    w = _adversarial(cols=512, seed=1)
    ref = gq.quantize(w.numpy(), T[name])
    assert np.array_equal(encode_blocks(w, name).numpy(), ref)
    blocks, values = encode(w, name)
    assert np.array_equal(blocks.numpy(), ref)
    assert np.array_equal(values.numpy(), gq.dequantize(ref, T[name]))
    spec = ggml_spec(name)  # the converted-model path packs the same blocks from primitives' codes
    scale, zp = choose_qparams(*compute_range(w, spec), spec)
    assert np.array_equal(legacy_blocks(quantize(w, scale, zp, spec), scale, zp, name).numpy(), ref)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_fast_path_decodes_exactly_on_adversarial_blocks(name):
    w = _adversarial(cols=512, seed=2)[:, :512].clone()
    w[8, :256] = 0.0
    w[9, :256] = -3.0
    blocks, values = encode(w, name)
    assert torch.equal(encode_blocks(w, name), blocks)
    assert np.array_equal(gq.dequantize(blocks.numpy(), T[name]), values.numpy())


def test_chunks_and_threads_do_not_change_blocks(monkeypatch):
    import qat.export.ggml_blocks as gb

    w = torch.randn(40, 512, generator=torch.Generator().manual_seed(3))
    whole = {n: encode_blocks(w, n) for n in ("Q4_0", "Q4_K")}
    monkeypatch.setattr(gb, "CHUNK_ELEMENTS", 1024)  # 2 rows a chunk
    for n, ref in whole.items():
        assert torch.equal(encode_blocks(w, n), ref)
        assert torch.equal(encode(w, n)[0], ref)
