"""The `Format` interface, the registry of formats by name, and the one bits-per-weight.

A format owns everything that depends on how numbers are represented: the checks of the `QuantSpec` fields
it needs, qparams, codes <-> values, the storage layout of a converted weight (hence its bits per weight),
and what each exporter can hold (the GGUF types it stores exactly). `qat.primitives` dispatches to the
format of a spec; `QuantSpec` asks it for its checks through `qat.spec.SPEC_FORMATS`, which
`register_format` fills (this package imports `qat.spec`, never the reverse).

A spec's format is the one registered for its (grid, dtype): `QuantSpec(bits=4)` is "int",
`QuantSpec(dtype="fp8_e4m3")` is "fp8", `QuantSpec(grid="ggml_k", ...)` is "ggml_k".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from qat.packing import packed_numel
from qat.spec import SPEC_FORMATS, QuantSpec

FORMATS: dict[str, "Format"] = {}
GGUF_TYPES: dict[str, "GGUFType"] = {}


@dataclass(frozen=True)
class GGUFType:
    """A GGUF tensor type a format stores exactly.

    Args:
        name: the GGUF type name ("Q4_K").
        block: weights per block; nbytes: bytes per block.
        spec: the QuantSpec whose grid is this type (what a gguf_* recipe trains on).
        encode: (float [rows, cols], importance or None, values) -> (uint8 blocks [rows, bytes], decoded values or None).
        blocks: (codes [rows, cols], scale, zero_point) of `spec` -> uint8 blocks [rows, bytes].
        weighted: whether `encode` uses an importance (imatrix) vector.
        fallback: the type llama.cpp stores a row in when its length is not a multiple of `block`.
        tensor_scale: for types whose blocks are relative to a per-tensor multiplier (NVFP4's global scale):
            (scale of `spec` over a whole tensor) -> float32 [1], the multiplier, written beside the tensor as
            "<name>.scale" (llama.cpp's NVFP4 scale2, applied to the matmul output). Such a type's `encode` takes
            whole tensors (its multiplier spans the tensor) and returns the values with the multiplier applied.
    """

    name: str
    block: int
    nbytes: int
    spec: Callable[[], QuantSpec]
    encode: Callable
    blocks: Callable
    weighted: bool = False
    fallback: str | None = None
    tensor_scale: Callable | None = None


class Format:
    """One number format family. Subclasses override what differs; register an instance with `register_format`.

    Numerics work on the "group view" of `qat.primitives` (codes and values are float32 tensors while computing).
    """

    name: str = ""
    grid: str = "uniform"  # the QuantSpec.grid value this format answers to
    dtypes: tuple[str, ...] = ("int",)  # the QuantSpec.dtype values it answers to
    is_float: bool = False  # codes are floating-point numbers (fp8), not integers
    gguf: tuple[GGUFType, ...] = ()  # the GGUF types it stores exactly (see `gguf_type`)
    holds: frozenset[str] = frozenset()  # other file formats that can hold it: "compressed-tensors", "gptq"
    signed_scales: bool = False  # scales carry a sign (IQ4's asymmetric levels): a learned one keeps its sign
    held_global: bool = False  # a per-tensor global over block scales that activations may hold (static_global)

    # -- spec ----------------------------------------------------------------------------------
    def check(self, spec: QuantSpec) -> None:
        """Raise ValueError naming the field when `spec` asks for something this format cannot be."""

    def default_signed(self, spec: QuantSpec) -> bool:
        """`QuantSpec.signed` when left unset."""
        return spec.symmetric

    def gguf_type(self, spec: QuantSpec) -> str | None:
        """The GGUF type that stores `spec`'s grid exactly, or None."""
        return None

    # -- numerics ------------------------------------------------------------------------------
    def peak_range(self, spec: QuantSpec) -> bool:
        """True when the range of a block is its signed element of largest magnitude (lo == hi == it)."""
        return False

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
        raise NotImplementedError

    def codes(self, view, scale, zero_point, spec: QuantSpec, need_mask: bool = False):
        """(float32 codes, mask of the elements inside the code range or None)."""
        raise NotImplementedError

    def values(self, t, scale, zero_point, spec: QuantSpec) -> torch.Tensor:
        """Real values of float32 codes `t` (may work in place on `t`)."""
        raise NotImplementedError

    def static_global(self, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """The held global scale of a `static_global` scheme from its calibrated per-tensor range (`held_global`
        formats only)."""
        raise NotImplementedError

    def qparams_under(self, lo, hi, global_scale: torch.Tensor, spec: QuantSpec):
        """(block scales, None) of a `static_global` scheme: each block's range [lo, hi] under the held global."""
        raise NotImplementedError

    def learned_scale(self, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """The scale a learned (LSQ) parameter in the qparams layout quantizes with, as an autograd op so that its
        gradient reaches the parameter: the parameter itself, except where one stored scale covers several rows of
        the layout (FP8 blocks), which map each row to the one parameter standing for them."""
        return scale

    def learned_scale_rows(self, spec: QuantSpec) -> int:
        """How many rows of the qparams layout one learned scale stands for (`learned_scale`): LSQ's gradient scale
        1 / sqrt(N qmax) counts the elements of all of them."""
        return 1

    def shared_error(self, err: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """A range search's per-group error (qparams layout) with each group given the total of the groups whose
        qparams this format chooses together from their ranges (one block scale over several groups), so that
        they pick one candidate; the groups' own errors where each group's qparams are its own."""
        return err

    def codes_dtype(self, spec: QuantSpec) -> torch.dtype:
        return torch.int8 if spec.signed else torch.uint8

    # -- storage -------------------------------------------------------------------------------
    def pack(self, codes, scale, zero_point, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """The buffers a converted weight holds ("packed", "scale", "zero_point"), from codes as `quantize`
        returns them and the qparams `choose_qparams` gives."""
        raise NotImplementedError

    def pack_under(self, codes, scale, global_scale: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
        """`pack` of a weight whose block scales lie under a held (stored) global (`held_global` formats, a
        `static_global` weight scheme): the global is stored as given, not chosen from the scales."""
        raise NotImplementedError(f"format {self.name!r} holds no global scale")

    def stored_global(self, stored: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, ...]):
        """(block scales times the global, float32 global [1]) of a `static_global` weight's storage (`pack_under`):
        what a GGUF type with a per-tensor multiplier writes as blocks and 1 / global; None for other weights."""
        return None

    def unpack(self, stored: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, ...]):
        """(codes, float32 scale, float32 zero_point or None) from the buffers of `pack`."""
        raise NotImplementedError

    def packed_nbytes(self, spec: QuantSpec, shape: tuple[int, ...]) -> int:
        """Bytes of the "packed" buffer of a weight of `shape`."""
        return packed_numel(math.prod(shape), spec.bits)

    def storage_bits(self, spec: QuantSpec, shape: tuple[int, ...]) -> int:
        """Bits of every buffer `pack` makes for a weight of `shape` (codes, scales, zero-points, minimums)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<format {self.name!r}: grid={self.grid!r}, dtypes={list(self.dtypes)}>"


def register_format(fmt: Format) -> Format:
    """Register `fmt` under its name and (grid, dtype) keys, and its GGUF types; returns it.

    Raises:
        ValueError: a name, (grid, dtype) or GGUF type that another format already holds.
    Example:
        >>> register_format(MyFormat())   # in qat/formats/my_format.py: the file is all a new format needs
    """
    keys = [(fmt.grid, d) for d in fmt.dtypes]
    taken = [k for k in keys if k in SPEC_FORMATS and SPEC_FORMATS[k] is not fmt]
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt or taken:
        raise ValueError(f"format {fmt.name!r}: name or (grid, dtype) {taken} already registered")
    for t in fmt.gguf:
        if t.name in GGUF_TYPES and GGUF_TYPES[t.name] is not t:
            raise ValueError(f"format {fmt.name!r}: GGUF type {t.name} already registered")
        GGUF_TYPES[t.name] = t
    FORMATS[fmt.name] = fmt
    for k in keys:
        SPEC_FORMATS[k] = fmt
    return fmt


def get_format(spec_or_name: QuantSpec | str) -> Format:
    """The format of a QuantSpec, or the format registered under a name.

    Raises:
        KeyError: an unknown name, listing the registered formats.
    Example:
        >>> get_format(QuantSpec(bits=4)).name
        'int'
    """
    if isinstance(spec_or_name, str):
        if spec_or_name not in FORMATS:
            raise KeyError(f"format {spec_or_name!r}; registered: {sorted(FORMATS)}")
        return FORMATS[spec_or_name]
    return SPEC_FORMATS[(spec_or_name.grid, spec_or_name.dtype)]


def gguf_types() -> dict[str, GGUFType]:
    """Every GGUF tensor type a registered format stores exactly, by name."""
    return dict(GGUF_TYPES)


def gguf_fallback(spec: QuantSpec) -> tuple[str, str] | None:
    """(the GGUF type of `spec`'s grid, the type llama.cpp stores a row of it in when the row's length is not a
    multiple of that type's block), or None: a grid with no GGUF type, or a type whose blocks need no fallback.
    The export (`qat.export.gguf_export.fit_type`) falls back by the same registered `GGUFType.fallback`.

    Example:
        >>> gguf_fallback(kquant_spec("Q4_K"))
        ('Q4_K', 'Q5_0')
    """
    name = get_format(spec).gguf_type(spec)
    fallback = GGUF_TYPES[name].fallback if name else None
    return (name, fallback) if fallback else None


CARRIED = (("learn",), ("observer", "observer_args"))
"""The training terms of a weight spec that `fallback_spec` keeps where the fallback type's format takes them."""


def fallback_spec(spec: QuantSpec, type_name: str) -> tuple[QuantSpec, list[str]]:
    """The QuantSpec of GGUF type `type_name` (its grid as the type's gguf_* recipe trains it) with `spec`'s learn
    mode and observer kept where that type's format takes them, and one note per term it could not keep.

    Example:
        >>> fallback_spec(tq2_0_spec(learn="lsq"), "Q4_0")[1]   # grid="ggml" takes learn='none' only
        ["learn='lsq' -> 'none'"]
    """
    out, dropped = GGUF_TYPES[type_name].spec(), []
    for names in CARRIED:
        want = {n: getattr(spec, n) for n in names if getattr(spec, n) != getattr(out, n)}
        if not want:
            continue
        try:
            out = dataclasses.replace(out, **want)
        except ValueError:  # the fallback's format refuses it: its own default stays
            dropped.append(", ".join(f"{n}={v!r} -> {getattr(out, n)!r}" for n, v in want.items()))
    return out, dropped


def storage_bits(spec: QuantSpec, shape: tuple[int, ...], act_order: bool = False) -> int:
    """Bits a converted weight of `shape` holds: codes, scales, zero-points / minimums, super-block scales,
    ragged last groups, and (`act_order`) the int64 group index of each input column, as the native export
    stores them."""
    bits = get_format(spec).storage_bits(spec, tuple(shape))
    return bits + (64 * shape[-1] if act_order else 0)


def bits_per_weight(spec: QuantSpec, shape: tuple[int, ...], act_order: bool = False) -> float:
    """Storage bits per weight of a weight tensor of `shape` under `spec`, exact from its storage layout.

    Example:
        >>> bits_per_weight(QuantSpec(bits=4, granularity="per_group", group_size=128), (8, 256))
        4.25
    """
    return storage_bits(spec, shape, act_order) / math.prod(shape)  # exact: Python numbers


def qparam_count(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """How many scales a weight of `shape` has (the numel of `choose_qparams`'s scale)."""
    if spec.granularity == "per_tensor":
        return 1
    if spec.granularity == "per_channel":
        return shape[spec.axis]
    rows = math.prod(shape[:-1])
    if spec.granularity == "per_group":
        return rows * -(-shape[-1] // spec.group_size)
    return rows  # per_token
