"""Real-integer modules made by `qat.convert`: packed codes, scales and zero-points; forward dequantizes.

Their forward computes exactly what the fake-quant module computed (same `qat.primitives` calls).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.modules.fake import FakeQuantEmbedding, FakeQuantLinear
from qat.modules.quantizer import TensorQuantizer
from qat.modules.registry import register_quantized
from qat.formats import get_format, storage_bits
from qat.primitives import check_tensor, choose_qparams, compute_range, dequantize, quantize
from qat.spec import QuantSpec, TensorSchemes


class QuantizedWeight(nn.Module):
    """A weight held in its format's storage layout: `packed` (uint8 codes), `scale` and `zero_point` buffers.

    The format of the spec (`qat.formats`) decides what the buffers hold: for integer grids the codes
    unsigned (code - qmin) packed with `qat.packing.pack`, scales in the spec's scale dtype and integer
    zero-points packed at the code width; fp8 codes as their bytes; the GGUF block formats their fp16
    (super-)block scales and packed sub-block scales. `zero_point` is empty for symmetric schemes.

    Example:
        >>> qw = QuantizedWeight.from_tensor(torch.randn(8, 64), QuantSpec(bits=4, granularity="per_group", group_size=32))
        >>> qw.dequantize().shape
        torch.Size([8, 64])
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec, self.shape, self.dtype = spec, tuple(shape), dtype
        nbytes = get_format(spec).packed_nbytes(spec, self.shape)
        self.register_buffer("packed", torch.zeros(nbytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("g_idx", torch.empty(0, dtype=torch.int64))

    @classmethod
    def from_tensor(
        cls,
        weight: torch.Tensor,
        spec: QuantSpec,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
        name: str = "weight",
        g_idx: torch.Tensor | None = None,
    ) -> "QuantizedWeight":
        """Quantize `weight` with the given qparams (or min-max ones when none are given).

        `g_idx` is the act-order group index of a per_group weight (column i uses group g_idx[i])."""
        weight = weight.detach()
        check_tensor(weight, name, spec)
        if scale is None:
            scale, zero_point = choose_qparams(*compute_range(weight, spec), spec)
        module = cls(spec, tuple(weight.shape), weight.dtype).to(weight.device)
        if g_idx is not None:
            module.g_idx = g_idx.to(torch.int64).clone()
        module.set_codes(quantize(weight, scale, zero_point, spec, module.group_index()), scale, zero_point)
        return module

    def group_index(self) -> torch.Tensor | None:
        return self.g_idx if self.g_idx.numel() else None

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                  global_scale: torch.Tensor | None = None) -> None:
        """Store codes as `quantize` returns them (int8 / uint8 / fp8) with their qparams, in the format's layout.
        `global_scale`: the stored global a `static_global` weight's block scales lie under (NVFP4 read from a
        checkpoint whose global is not qat's power of two), kept as given."""
        fmt = get_format(self.spec)
        if global_scale is not None:
            stored = fmt.pack_under(codes, scale.detach(), global_scale, self.spec)
        else:
            stored = fmt.pack(codes, scale.detach(), None if zero_point is None else zero_point.detach(), self.spec)
        self.packed, self.scale, self.zero_point = stored["packed"], stored["scale"], stored["zero_point"]

    def _unpacked(self):
        stored = {"packed": self.packed, "scale": self.scale, "zero_point": self.zero_point}
        return get_format(self.spec).unpack(stored, self.spec, self.shape)

    def codes(self) -> torch.Tensor:
        """The codes as `quantize` returned them, in the weight's shape."""
        return self._unpacked()[0]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 scale, float32 zero-point or None) as `choose_qparams` gave them (up to the stored rounding,
        which the values do not see)."""
        return self._unpacked()[1:]

    def stored_global(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(block scales times the global, float32 global [1]) of a weight whose global is held as stored
        (`static_global`: NVFP4 read from another tool's checkpoint); None for other weights."""
        stored = {"packed": self.packed, "scale": self.scale, "zero_point": self.zero_point}
        return get_format(self.spec).stored_global(stored, self.spec, self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codes, scale, zero_point = self._unpacked()
        return dequantize(codes, scale, zero_point, self.spec, dtype or self.dtype, self.group_index())

    def _apply(self, fn, recurse=True):
        # model.to(bf16) / .half(): the dequantized weight follows the new dtype, but scales and zero-points stay
        # float32 (rounding them to bf16 would change every dequantized value); device moves apply to all
        held = {key: getattr(self, key) for key in ("scale", "zero_point")}
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.packed.device)).dtype
        for key, value in held.items():
            setattr(self, key, value.to(getattr(self, key).device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("scale", "zero_point", "g_idx"):  # shaped by the scheme: take the saved shape
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def nbits(self) -> int:
        """Bits of storage (`qat.formats.storage_bits`): codes, scales, zero-points / minimums, the g_idx."""
        return storage_bits(self.spec, self.shape, self.group_index() is not None)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, shape={self.shape}"


def _quantize_weight_of(fake: nn.Module) -> QuantizedWeight | None:
    quantizer = fake.weight_quantizer
    if quantizer is None:
        return None
    weight = fake.weight.detach()
    quantizer.observe(weight)
    scale, zero_point = quantizer.qparams(weight)
    zero_point = None if zero_point is None else zero_point.detach()
    return QuantizedWeight.from_tensor(weight, quantizer.spec, scale.detach(), zero_point, g_idx=quantizer.group_index())


@register_quantized(FakeQuantLinear)
class QuantizedLinear(nn.Module):
    """A linear layer holding real integer weights; the input quantizer (if any) is kept as is.

    Example:
        >>> ql = QuantizedLinear.from_fake(fake_quant_linear)
        >>> torch.equal(ql(x), fake_quant_linear(x))
        True
    """

    def __init__(self, in_features: int, out_features: int, qweight: QuantizedWeight, bias: nn.Parameter | None,
                 input_quantizer: TensorQuantizer | None = None, schemes: TensorSchemes | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qweight = qweight
        self.bias = bias
        self.input_quantizer = input_quantizer
        self.schemes = schemes or TensorSchemes(weight=qweight.spec)

    @classmethod
    def from_fake(cls, fake: FakeQuantLinear) -> "QuantizedLinear":
        qweight = _quantize_weight_of(fake)
        if qweight is None:
            raise ValueError("QuantizedLinear needs a weight scheme; this FakeQuantLinear quantizes only its input")
        return cls(fake.in_features, fake.out_features, qweight, fake.bias, fake.input_quantizer, fake.schemes)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (what the fake-quant module used)."""
        return self.qweight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.qweight.dequantize(), self.bias)

    def to_float(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weights."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.qweight.dequantize())
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.schemes.describe()}"


@register_quantized(FakeQuantEmbedding)
class QuantizedEmbedding(nn.Module):
    """An embedding table held as real integer codes."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.schemes = TensorSchemes(weight=qweight.spec)  # what qat.summary reports, as for the fake-quant module

    @classmethod
    def from_fake(cls, fake: FakeQuantEmbedding) -> "QuantizedEmbedding":
        qweight = _quantize_weight_of(fake)
        if qweight is None:
            raise ValueError("QuantizedEmbedding needs a weight scheme")
        return cls(qweight=qweight, padding_idx=fake.padding_idx)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight.dequantize(), self.padding_idx)

    def to_float(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        emb.weight = nn.Parameter(self.qweight.dequantize())
        return emb
