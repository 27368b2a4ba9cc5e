"""Model-wide quantizer control: calibrate, enable/disable, freeze ranges, summarise."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from qat.errors import ConfigError
from qat.formats import storage_bits
from qat.modules.experts import FakeQuantExperts
from qat.modules.fake import FakeQuantLinear
from qat.modules.quantizer import ROLE_NAMES, TensorQuantizer
from qat.primitives import quant_error_db


def quantizers(model: nn.Module, roles: Iterable[str] | None = None) -> Iterator[tuple[str, TensorQuantizer]]:
    """(name, quantizer) for every TensorQuantizer in `model`, optionally only the given roles.

    Raises:
        ValueError: a role that is not one of "weight", "input", "kv_cache" (a typo would select nothing).
    """
    if isinstance(roles, str):
        roles = [roles]
    roles = None if roles is None else set(roles)
    if roles is not None and roles - set(ROLE_NAMES):
        raise ValueError(f"unknown quantizer role(s) {sorted(roles - set(ROLE_NAMES))}; choose from {list(ROLE_NAMES)}")
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer) and (roles is None or module.role in roles):
            yield name, module


def set_quantizers(model: nn.Module, roles: Iterable[str] | None = None, **flags: bool) -> int:
    """Set `enabled` and/or `observing` on quantizers; returns how many were changed.

    Example:
        >>> set_quantizers(model, enabled=False)            # full precision
        >>> set_quantizers(model, roles=["input"], observing=False)   # freeze activation ranges
    """
    allowed = {"enabled", "observing"}
    if set(flags) - allowed:
        raise ValueError(f"set_quantizers: unknown flag(s) {sorted(set(flags) - allowed)}; valid: {sorted(allowed)}")
    n = 0
    for _, q in quantizers(model, roles):
        for key, value in flags.items():
            setattr(q, key, bool(value) and (key != "observing" or not q.spec.dynamic))
        n += 1
    return n


def set_lean_ste(model: nn.Module, enabled: bool = True) -> int:
    """Switch the memory-lean STE of every fake-quant Linear and fused-experts module in `model` (same values and
    gradients; backward recomputes the fake-quantized weights and inputs instead of keeping them). Returns how
    many were set.

    Example:
        >>> qat.set_lean_ste(model, False)  # keep fake-quantized copies for backward (the unfused path)
    """
    modules = _lean_modules(model)
    for module in modules:
        module.lean = bool(enabled)
    return len(modules)


def _lean_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (FakeQuantLinear, FakeQuantExperts))]


@contextmanager
def _attribute_set(objects: Any, attr: str, value: Any):
    """`attr` = `value` on every object inside the block; each object's own value restored after."""
    saved = [(o, getattr(o, attr)) for o in objects]
    try:
        for o, _ in saved:
            setattr(o, attr, value)
        yield
    finally:
        for o, old in saved:
            setattr(o, attr, old)


@contextmanager
def unfused_ste(model: nn.Module):
    """Inside the block every module `set_lean_ste` switches uses the unfused STE (twice differentiable, as a
    Hessian-vector product needs: the lean one's backward is not); each module's own setting is restored after.

    Example:
        >>> with qat.control.unfused_ste(model):
        ...     grads = torch.autograd.grad(loss_fn(model), weights, create_graph=True)
    """
    with _attribute_set(_lean_modules(model), "lean", False):
        yield model


@contextmanager
def quantization_disabled(model: nn.Module):
    """Run the model in full precision inside the block (for a teacher pass, say)."""
    with _attribute_set([q for _, q in quantizers(model)], "enabled", False):
        yield model


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of the enabled activation / KV quantizers with held (static) ranges that have none yet."""
    return [name for name, q in quantizers(model, ["input", "kv_cache"])
            if q.enabled and not q.spec.dynamic and not q.initialized]


@contextmanager
def frozen_ranges(model: nn.Module):
    """Evaluation never calibrates: activation / KV observing is off inside the block and restored after, so held
    ranges (and an NVFP4 static global) stay those calibrated on training / calibration data.

    Weight ranges keep following the weights (they see no data), so evaluation uses the current weights' ranges.
    Raises:
        ConfigError: a static activation / KV quantizer has no range yet (it would be calibrated on the evaluation
            data, or fail mid-evaluation); naming the modules.
    Example:
        >>> with qat.control.frozen_ranges(model):
        ...     ppl = perplexity(model, test_blocks)
    """
    missing = uncalibrated(model)
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConfigError(f"evaluation of an uncalibrated model: {', '.join(missing[:3])}{more} hold static "
                          "activation ranges but have none yet; calibrate first (qat.calibrate on calibration / "
                          "training batches, qat-train's module.range_init_batches, qat-ptq): evaluation data "
                          "never sets them")
    with _attribute_set([q for _, q in quantizers(model, roles=["input", "kv_cache"])], "observing", False):
        yield model


def on_input_device(model: nn.Module, batch: Any) -> Any:
    """`batch` (a tensor, or a mapping of them) moved to the device of `model`'s input embeddings, where the
    batches of a model on a GPU must go (token ids are built on the CPU); unchanged for a model without input
    embeddings or with them still on the meta device (a streamed skeleton).

    Example:
        >>> ids = on_input_device(model.cuda(), torch.tensor([[1, 2, 3]]))   # on cuda:0
    """
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    weight = getattr(embed, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(weight.device)
    if isinstance(batch, dict):
        return {k: v.to(weight.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], forward=None, freeze: bool = True) -> int:
    """Range initialisation: run `batches` through the model with activation observers on.

    Every batch counts, for learned (LSQ / PACT) activation quantizers too: their parameters are set from
    the range of all the batches (outside calibrate, a learned quantizer takes its first batch only).

    Args:
        batches: inputs; each is passed as model(**b) for a mapping, model(b) otherwise, on the model's device
            (`on_input_device`).
        forward: optional callable(model, batch) to use instead (it gets the batch as given).
        freeze: switch observing off afterwards (hold the calibrated ranges).
    Returns:
        the number of batches seen.
    Raises:
        ValueError: no batch at all (ranges would stay empty).
    """
    set_quantizers(model, roles=["input", "kv_cache"], observing=True)
    calibrating = [q for _, q in quantizers(model, ["input", "kv_cache"])]
    n = 0
    try:
        for q in calibrating:
            q.calibrating = True
        for batch in batches:
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, dict):
                model(**on_input_device(model, batch))
            else:
                model(on_input_device(model, batch))
            n += 1
    finally:
        for q in calibrating:
            q.calibrating = False
    if n == 0:
        raise ValueError("calibrate: got no batches; give at least one")
    if freeze:
        set_quantizers(model, roles=["input", "kv_cache"], observing=False)
    return n


def weight_storage(module: nn.Module) -> tuple[int, int] | None:
    """(storage bits, weight count) of a module's quantized weight, fake-quant or converted alike, or None
    when its weight is not quantized. Bits are `qat.formats.storage_bits`: what the converted weight holds."""
    storage = getattr(module, "storage", None)
    if callable(storage):  # modules holding several quantized weights (fused experts) count them all
        return storage()
    qweight = getattr(module, "qweight", None)
    if qweight is not None:
        return qweight.nbits(), math.prod(qweight.shape)
    q = getattr(module, "weight_quantizer", None)
    if q is None:
        return None
    shape = tuple(module.weight.shape)
    return storage_bits(q.spec, shape, q.group_index() is not None), math.prod(shape)


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of `model` whose weight is quantized (fake-quant or converted), by name."""
    return {n: m for n, m in model.named_modules() if weight_storage(m) is not None}


def weight_bits(model: nn.Module) -> tuple[float, int]:
    """(bits per quantized weight, number of quantized weights) of `model`: the same before and after
    `qat.convert`, and equal to the bytes of the native export's weight tensors (codes, scales, zero-points)
    x 8 / count. NaN bits when nothing is quantized.

    Example:
        >>> bpw, n = weight_bits(qat.prepare(model, "gguf_q4_k"))   # 4.5 on rows of 256
    """
    bits = numel = 0
    for module in model.modules():
        counted = weight_storage(module)
        if counted is not None:
            bits, numel = bits + counted[0], numel + counted[1]
    return (bits / numel if numel else math.nan), numel


def summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized module: name, type, scheme, SQNR of the weight (dB), bits per weight.

    SQNR is measured between the float weight and its fake-quantized value (fake-quant modules) and is
    NaN for converted modules, whose float weight is gone. Bits per weight are `weight_storage`'s (float
    weights: their dtype's bits).
    """
    rows = []
    for name, module in model.named_modules():
        schemes = getattr(module, "schemes", None)
        if schemes is None:
            continue
        row = {"module": name, "type": type(module).__name__, "scheme": schemes.describe(), "sqnr_db": math.nan}
        if callable(getattr(module, "sqnr_db", None)):
            row["sqnr_db"] = module.sqnr_db()
        elif getattr(module, "qweight", None) is None and getattr(module, "weight_quantizer", None) is not None:
            with torch.no_grad():
                w = module.weight
                row["sqnr_db"] = quant_error_db(w, module.weight_quantizer(w))
        counted = weight_storage(module)
        row["bits_per_weight"] = (counted[0] / counted[1] if counted is not None
                                  else float(torch.finfo(module.weight.dtype).bits))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table of `rows` (floats with 2 decimals)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])
