"""`prepare`: resolve a recipe against a model, check everything, then swap in fake-quant modules."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from qat.errors import ConfigError, grouped_lines
from qat.formats import fallback_spec, get_format, gguf_fallback, gguf_types
from qat.modules.experts import expert_weight_names, is_experts
from qat.modules.kv_cache import attach_kv_quantizers, is_attention
from qat.modules.registry import FAKE_QUANT, QUANTIZED, fake_quant_type
from qat.modules.rotation import carry_rotation
from qat.primitives import check_tensor
from qat.spec import QuantSpec, TensorSchemes
from qat.transform.match import matches
from qat.transform.recipe import QuantRecipe, as_recipe
from qat.transform.rotations import apply_rotations, rotation_errors
from qat.transform.rotations.learned import has_learned_rotations

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What prepare will do: module name -> schemes, and the attention modules whose KV cache is quantized."""

    modules: dict[str, TensorSchemes] = field(default_factory=dict)
    attention: dict[str, TensorSchemes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _registered_names() -> list[str]:
    return sorted(t.__name__ for t in FAKE_QUANT)


def _pattern_hint(named: list[tuple[str, nn.Module]]) -> str:
    """What a target pattern could name in this model: its quantizable classes and two module names."""
    quantizable = [(n, m) for n, m in named if n and fake_quant_type(m) is not None]
    kinds = sorted({type(m).__name__ for _, m in quantizable})
    examples = ", ".join(repr(n) for n, _ in quantizable[:2])
    root = named[0][1] if named else None
    if not quantizable and root is not None and fake_quant_type(root) is not None:
        kind = fake_quant_type(root).__name__
        return (f"the model itself is a {type(root).__name__} and prepare swaps submodules only: use "
                f"qat.modules.{kind}.from_float(module, schemes), or wrap it in nn.Sequential")
    return (f"patterns are class names, module names or 're:<regex>' (quantizable here: classes {kinds}"
            + (f", e.g. modules {examples})" if examples else ")"))


def plan(model: nn.Module, recipe: QuantRecipe | Mapping[str, Any]) -> Plan:
    """Resolve `recipe` against `model` without changing it, checking every module first.

    Raises:
        ValueError: one message listing every problem (a reason shared by several modules once, with their count
            and the first of them): a target or override pattern that matches
            nothing, a group size that does not divide a dimension, a non-finite or empty weight, a KV
            scheme with no attention module, a model that is already prepared.
    """
    recipe = as_recipe(recipe)
    named = list(model.named_modules())
    errors: list[str] = []
    already = [n for n, m in named if type(m) in QUANTIZED or type(m) in set(QUANTIZED.values())]
    if already:
        errors.append(f"the model is already prepared/converted (e.g. {already[0]}); prepare a float model")
    result = Plan()
    ignored = lambda n, m: any(matches(p, n, m) for p in recipe.ignore)  # noqa: E731
    for pattern in recipe.targets:
        hits = [(n, m) for n, m in named if n and matches(pattern, n, m)]
        quantizable = [(n, m) for n, m in hits if fake_quant_type(m) is not None]
        if not hits:
            errors.append(f"target {pattern!r} matches no module; {_pattern_hint(named)}")
        elif not quantizable:
            kinds = sorted({type(m).__name__ for _, m in hits})
            errors.append(f"target {pattern!r} matches only modules qat cannot quantize ({', '.join(kinds)}); "
                          f"registered types: {_registered_names()}")
        for n, m in quantizable:
            if not ignored(n, m):
                result.modules.setdefault(n, recipe.base)
    if recipe.base.kv_cache is not None:
        result.attention = {n: recipe.base for n, m in named if is_attention(m) and not ignored(n, m)}
        if not result.attention:
            errors.append("quant.kv_cache is set but the model has no Hugging Face attention module (k_proj, v_proj)")
    for pattern in recipe.ignore:
        if not any(n and matches(pattern, n, m) for n, m in named):
            result.warnings.append(f"ignore pattern {pattern!r} matches no module")
    by_name = dict(named)
    for i, override in enumerate(recipe.overrides):
        for pattern in override.targets:
            hit = False
            for table in (result.modules, result.attention):
                for n in table:
                    if matches(pattern, n, by_name[n]):
                        table[n] = override.apply(table[n], f"quant.overrides[{i}]")
                        hit = True
            if not hit:
                errors.append(f"quant.overrides[{i}] target {pattern!r} matches none of the quantized modules")
    if recipe.gguf_fallback:
        _fall_back(result, by_name)
    # each table keeps only the roles that apply to it: Linear/Embedding weight + input, attention KV
    result.modules = {n: TensorSchemes(s.weight, s.input) for n, s in result.modules.items()
                      if s.weight is not None or s.input is not None}
    result.attention = {n: TensorSchemes(kv_cache=s.kv_cache) for n, s in result.attention.items()}
    if not result.modules and not result.attention and not errors:
        errors.append(_nothing_selected(recipe, named))
    errors += grouped_lines(_check_modules(result, by_name))  # one line per reason, naming the first modules
    errors += grouped_lines(_gguf_group_errors(result, by_name, recipe.gguf_fallback))
    if recipe.rotations is not None:
        errors += rotation_errors(model, recipe.rotations, has_kv=bool(result.attention))
    result.warnings += _gguf_block_rows(result, by_name, recipe.gguf_fallback)
    if len(errors) == 1:
        raise ConfigError(f"cannot prepare the model: {errors[0]}")
    if errors:
        raise ConfigError("cannot prepare the model:\n" + "\n".join(f"  - {e}" for e in errors))
    return result


def _nothing_selected(recipe: QuantRecipe, named: list[tuple[str, nn.Module]]) -> str:
    """Why a recipe whose targets all matched leaves nothing to quantize (GPT-2: 'Linear' is only lm_head,
    which is ignored; its blocks are transformers' Conv1D)."""
    ignored = [n for n, m in named if n and fake_quant_type(m) is not None and any(matches(p, n, m) for p in recipe.ignore)]
    other = sorted({type(m).__name__ for n, m in named if n and not list(m.children()) and fake_quant_type(m) is None
                    and getattr(m, "weight", None) is not None})
    return (f"recipe {recipe.name!r} selects no module to quantize: targets {list(recipe.targets)} match only "
            f"ignored modules {ignored[:4]} (ignore {list(recipe.ignore)}); layers with weights qat cannot "
            f"quantize here: {other}; registered types: {_registered_names()}")


def _gguf_block_rows(result: Plan, by_name: dict[str, nn.Module], fell_back: bool = False) -> list[str]:
    """A GGUF grid on rows its blocks cannot hold (a K-quant's super-blocks of 256): training works (the last
    block is partial), but a GGUF file stores such rows in another type, so the export is not format-exact."""
    misfits: dict[tuple[str, int], list[str]] = {}
    widths = {}
    for n, s in result.modules.items():
        gguf = None if s.weight is None else get_format(s.weight).gguf_type(s.weight)
        block = gguf_types()[gguf].block if gguf else 1
        widths[n] = min(_row_widths(by_name[n]))
        if widths[n] % block:
            misfits.setdefault((gguf, block), []).append(n)
    hint = ("gguf_fallback is on, but the fallback type's blocks cannot hold these rows either: the export writes "
            "F16, as llama.cpp does" if fell_back else
            "llama.cpp falls back the same way; the recipe key gguf_fallback: true trains them on that type instead")
    return [f"{len(names)} module(s) on the GGUF {gguf} grid have rows that are not a multiple of {block} "
            f"(e.g. {names[0]}, {widths[names[0]]} wide): GGUF stores such rows in another type, "
            f"so their export is re-quantized, not format-exact ({hint})"
            for (gguf, block), names in misfits.items()]


def _fall_back(result: Plan, by_name: dict[str, nn.Module]) -> None:
    """Recipe key gguf_fallback: a module whose weight rows its GGUF type's blocks cannot hold (a super-block of
    256 on a 576-wide row) takes the weight spec of the type llama.cpp stores such rows in (`qat.formats.
    gguf_fallback`, the table the GGUF export uses), so the file stores what the model trained; one log line
    per (type -> fallback). A fused-experts module has one scheme: any misfit weight moves all of its weights."""
    moved: dict[tuple[str, str], list[str]] = {}
    notes: dict[tuple[str, str], set[str]] = {}
    types = gguf_types()
    for n, s in result.modules.items():
        pair = None if s.weight is None else gguf_fallback(s.weight)
        if pair is None:
            continue
        widths = _row_widths(by_name[n])
        if all(w % types[pair[0]].block == 0 for w in widths) or any(w % types[pair[1]].block for w in widths):
            continue  # fits as it is, or the fallback's blocks do not fit either (the export writes F16)
        spec, dropped = fallback_spec(s.weight, pair[1])
        result.modules[n] = TensorSchemes(spec, s.input, s.kv_cache)
        moved.setdefault(pair, []).append(n)
        notes.setdefault(pair, set()).update(dropped)
    for (old, new), names in moved.items():
        spec = result.modules[names[0]].weight
        lost = notes[(old, new)]
        line = (f"gguf_fallback: {len(names)} module(s) have rows that are not a multiple of {types[old].block} "
                f"({old}'s block), so they train on {new} ({spec.describe()}), the type llama.cpp and the GGUF "
                f"export store them in: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
        if lost:  # e.g. grid ggml takes learn none only: the scales follow the weights instead of being learned
            line += f"; {new}'s format does not take the recipe's {', '.join(sorted(lost))}"
        (log.warning if lost else log.info)(line)


def _gguf_misfit(module: nn.Module, spec: QuantSpec | None) -> bool:
    """A weight on a GGUF grid whose groups (the type's blocks: ternary g256) do not divide its rows; a GGUF grid
    takes no `ragged` (its blocks are whole), so `_gguf_group_errors` words this refusal, not `check_tensor`."""
    return (spec is not None and spec.granularity == "per_group" and not spec.ragged
            and get_format(spec).gguf_type(spec) is not None
            and any(w % spec.group_size for w in _row_widths(module)))


def _gguf_group_errors(result: Plan, by_name: dict[str, nn.Module], fell_back: bool = False) -> list[str]:
    """One line per GGUF type whose groups do not divide some modules' rows (ternary g256 on 576-wide rows): how
    many, the first few, and what would do: the recipe key gguf_fallback: true where the fallback type's blocks
    hold the rows, else leaving them out (not `ragged`, which a GGUF grid does not take)."""
    misfits: dict[tuple[str, int], list[str]] = {}
    for n, s in result.modules.items():
        if not hasattr(fake_quant_type(by_name[n]), "plan_errors") and _gguf_misfit(by_name[n], s.weight):
            misfits.setdefault((get_format(s.weight).gguf_type(s.weight), s.weight.group_size), []).append(n)
    lines = []
    for (gguf, group), names in misfits.items():
        spec = result.modules[names[0]].weight
        pair = gguf_fallback(spec)
        rows = {w for n in names for w in _row_widths(by_name[n])}
        fits = pair is not None and not any(w % gguf_types()[pair[1]].block for w in rows)
        widths = ", ".join(str(w) for w in sorted(rows) if w % group)  # the rows the blocks cannot hold
        if fits and not fell_back:
            fix = f"GGUF stores such rows as {pair[1]}: the recipe key gguf_fallback: true trains them on {pair[1]}'s " \
                  "grid"
        else:
            why = (f"GGUF would store them as {pair[1]}, whose blocks of {gguf_types()[pair[1]].block} do not hold "
                   "them either" if pair else f"GGUF has no fallback type for {gguf}")
            fix = f"{why}: leave them out (quant.ignore) or choose a GGUF type whose blocks divide their rows"
        shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
        lines.append(f"{len(names)} module(s) on the GGUF {gguf} grid have rows of {widths} "
                     f"columns, not a multiple of its {group}-wide blocks ({shown}); {fix}")
    return lines


def _row_widths(module: nn.Module) -> list[int]:
    """The row widths (input features) of the weights of a module prepare swaps."""
    if is_experts(module):
        transposed = bool(getattr(module, "is_transposed", False))
        return [getattr(module, n).shape[1 if transposed else -1] for n in expert_weight_names(module)]
    return [module.weight.shape[-1]]


def _check_modules(result: Plan, by_name: dict[str, nn.Module]) -> list[str]:
    errors = []
    for n, schemes in result.modules.items():
        module = by_name[n]
        kind = fake_quant_type(module)
        if hasattr(kind, "plan_errors"):  # fused experts and MoE routers check themselves
            errors += kind.plan_errors(module, schemes, n)
            continue
        if schemes.weight is not None and not _gguf_misfit(module, schemes.weight):  # else one line per GGUF type
            try:
                check_tensor(module.weight.detach(), f"{n}.weight", schemes.weight)
            except ValueError as err:
                errors.append(str(err))
        if schemes.weight is not None and isinstance(module, nn.Embedding) and module.max_norm is not None:
            errors.append(f"{n}: max_norm={module.max_norm} renormalises the table in place at lookup; a fake-quantized "
                          "table cannot be (set max_norm=None or leave the module out of the targets)")
        if schemes.input is not None and isinstance(module, nn.Embedding):
            errors.append(f"{n}: an Embedding takes token ids; input quantization does not apply")
        spec = schemes.input
        if spec is not None and spec.granularity == "per_group" and module.in_features % spec.group_size:
            errors.append(f"{n}.input: group_size={spec.group_size} does not divide in_features={module.in_features}")
    for n, schemes in result.attention.items():
        spec, head_dim = schemes.kv_cache, by_name[n].head_dim
        if spec is not None and spec.granularity == "per_group" and head_dim % spec.group_size:
            errors.append(f"{n}.kv_cache: group_size={spec.group_size} does not divide head_dim={head_dim}")
    return errors


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at `name` in `model`; an online input rotation (R4) of the module it replaces goes with it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if old is not None:
        carry_rotation(old, new)
    setattr(parent, child, new)


def prepare(model: nn.Module, recipe: QuantRecipe | Mapping[str, Any], verbose: bool = False) -> nn.Module:
    """Swap the modules a recipe selects for fake-quant modules, in place.

    Args:
        model: any torch.nn.Module (a Hugging Face model for KV-cache schemes).
        recipe: a QuantRecipe, or a mapping / DictConfig in the configs/quant format.
        verbose: log one line per replaced module.
    Returns:
        The same model, with `model.qat_recipe` set to the validated recipe.
    Raises:
        ValueError: everything `plan` checks, all offenders in one message, before anything changes.
    Example:
        >>> model = qat.prepare(model, qat.load_recipe("w4a16_g128"))
        >>> loss = model(**batch).loss; loss.backward()
    """
    recipe = as_recipe(recipe)
    if has_learned_rotations(model):  # their hooks / parametrizations would not follow the swapped modules
        raise ConfigError("this model has learned rotations attached (not fused): call qat.prepare first, then "
                          "attach_learned_rotations, or fuse them before preparing (fuse_learned_rotations)")
    result = plan(model, recipe)
    for warning in result.warnings:
        log.warning(warning)
    if recipe.rotations is not None:  # offline rotations change the float weights the quantizers start from
        apply_rotations(model, recipe.rotations, has_kv=bool(result.attention))
    apply_plan(model, result, verbose=verbose)
    model.qat_recipe = recipe
    return model


def apply_plan(model: nn.Module, result: Plan, select: Callable[[str], bool] | None = None,
               verbose: bool = False) -> None:
    """Swap the modules of a `plan` result: all of them, or those whose name `select` accepts (an out-of-core
    PTQ prepares one decoder block at a time, as it is loaded). Rotations are `prepare`'s, not applied here.

    Example:
        >>> result = plan(model, recipe); apply_plan(model, result, lambda n: n.startswith("model.layers.0."))
    """
    def selected(name: str) -> bool:
        return select is None or select(name)

    for name, schemes in result.modules.items():
        if not selected(name):
            continue
        module = model.get_submodule(name)
        set_module(model, name, fake_quant_type(module).from_float(module, schemes, name))
        if verbose:
            log.info("%s -> %s", name, schemes.describe())
    by_spec: dict[Any, dict[str, nn.Module]] = {}
    for name, schemes in result.attention.items():
        if schemes.kv_cache is not None and selected(name):
            by_spec.setdefault(schemes.kv_cache, {})[name] = model.get_submodule(name)
    for spec, modules in by_spec.items():
        attach_kv_quantizers(model, modules, spec)
