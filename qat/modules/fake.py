"""Fake-quant modules: float weights, quantize -> dequantize in the forward, STE in the backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import ConfigError
from qat.modules.quantizer import TensorQuantizer
from qat.modules.registry import register_fake_quant
from qat.primitives import check_tensor
from qat.spec import TensorSchemes
from qat.ste import fake_quant_linear


def _weight_quantizer(weight: torch.Tensor, schemes: TensorSchemes, name: str) -> TensorQuantizer | None:
    if schemes.weight is None:
        return None
    check_tensor(weight.detach(), f"{name}.weight" if name else "weight", schemes.weight)
    return TensorQuantizer(schemes.weight, "weight", weight.detach())


@register_fake_quant(nn.Linear)
class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight (and optionally input) is fake-quantized.

    The weight and bias Parameters are the float module's own objects, so tied weights and optimizer
    references survive the swap.

    Example:
        >>> fq = FakeQuantLinear.from_float(nn.Linear(64, 8), TensorSchemes(weight=QuantSpec(bits=4, granularity="per_group", group_size=32)))
        >>> y = fq(torch.randn(2, 64))
    """

    lean = True  # memory-lean STE (qat.ste.fake_quant_linear); per module with qat.set_lean_ste(model, ...)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer: TensorQuantizer | None = None
        self.input_quantizer: TensorQuantizer | None = None
        self.schemes = TensorSchemes()

    @classmethod
    def from_float(cls, linear: nn.Linear, schemes: TensorSchemes, name: str = "") -> "FakeQuantLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        module.schemes = schemes
        module.weight_quantizer = _weight_quantizer(linear.weight, schemes, name)
        if schemes.input is not None:
            example = torch.zeros(1, linear.in_features, device=linear.weight.device)
            module.input_quantizer = TensorQuantizer(schemes.input, "input", example)
        return module

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean:  # same values and gradients; backward recomputes the fake-quantized x and weight
            x_args = None if self.input_quantizer is None else self.input_quantizer.fake_quant_args(x)
            w_args = None if self.weight_quantizer is None else self.weight_quantizer.fake_quant_args(self.weight)
            if x_args is not None or w_args is not None:
                return fake_quant_linear(x, self.weight, self.bias, x_args, w_args)
            return F.linear(x, self.weight, self.bias)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Linear:
        """The plain nn.Linear with the (unquantized) float weights."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.schemes.describe()}"


@register_fake_quant(nn.Embedding)
class FakeQuantEmbedding(nn.Embedding):
    """nn.Embedding whose table is fake-quantized (per row, or in groups along the embedding dim)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer: TensorQuantizer | None = None
        self.schemes = TensorSchemes()

    @classmethod
    def from_float(cls, emb: nn.Embedding, schemes: TensorSchemes, name: str = "") -> "FakeQuantEmbedding":
        if schemes.input is not None or schemes.kv_cache is not None:
            raise ConfigError(f"{name or 'embedding'}: an Embedding takes token ids; only a weight scheme applies")
        if emb.max_norm is not None:
            raise ConfigError(f"{name or 'embedding'}: max_norm={emb.max_norm} renormalises the table in place at lookup; "
                             "a fake-quantized table cannot be (set max_norm=None or leave the module out of the targets)")
        module = cls(
            emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, max_norm=emb.max_norm,
            norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq, sparse=emb.sparse, device="meta",
        )
        module.weight = emb.weight
        module.schemes = schemes
        module.weight_quantizer = _weight_quantizer(emb.weight, schemes, name)
        return module

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
            self.scale_grad_by_freq, self.sparse,
        )

    def to_float(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, norm_type=self.norm_type,
                           scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse, device="meta")
        emb.weight = self.weight
        return emb
