"""The base recipe of a sensitivity analysis: the deployment context a module's score is measured in.

A base recipe (`qat-sensitivity quant=w4a8_kv8`, `score_model(..., base=...)`) says everything about the deployed
model except the weight format of the scored modules, which the solver chooses:

- its non-weight schemes (input activations, KV cache) and rotations are applied while scoring (`apply_context`),
  so a module's score is the loss increase of its weight format *with* the activations the deployed model runs
  on; its `targets` / `ignore` restrict the modules scored;
- its weight scheme is the default of the modules it quantizes that are not scored (outside the analysis'
  `targets`, or in its `ignore`, `lm_head` by default); the scored modules take the solver's choice;
- it is recorded in scores.json, so a re-solve writes the same recipe: the base with one weight override per chosen
  candidate (`qat.sensitivity.layout.to_recipe`).

    check_base(recipe, menu)                 # conflicts, before any model loads
    apply_context(model, recipe, batches)     # in place: input / KV quantizers (calibrated), rotations
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from qat.control import calibrate, quantizers
from qat.errors import ConfigError
from qat.formats import get_format
from qat.sensitivity.menu import Candidate
from qat.spec import QuantSpec, TensorSchemes
from qat.transform import QuantRecipe, matches, prepare
from qat.transform.rotations import apply_rotations, rotation_errors


LLAMA_CPP_KV_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
"""The quantized KV-cache types llama.cpp runs (`-ctk` / `-ctv`, besides f16 / bf16 / f32): a dynamic KV scheme
whose grid is one of these GGUF types (`grid: ggml`, as quant=gguf_q4_0_kv_q8_0) is what llama.cpp computes."""


def llama_cpp_kv_type(spec: QuantSpec) -> str | None:
    """The llama.cpp cache type (`-ctk` value, lower case) a KV scheme computes exactly, or None."""
    gguf = get_format(spec).gguf_type(spec) if spec.dynamic else None
    return gguf.lower() if gguf in LLAMA_CPP_KV_TYPES else None


def check_base(recipe: QuantRecipe, menu: dict[str, Candidate]) -> None:
    """Refuse a base recipe that cannot go with the analysis, before any model loads.

    Refused: a weight scheme in one of its overrides (the solver chooses the scored modules' weights; a per-module
    weight of the base would be overridden, or silently not), and an input-activation scheme together with menu
    candidates on a GGUF-only grid (`Candidate.gguf_only`; pass only the candidates the solver may choose): a GGUF
    file stores no activation scheme (llama.cpp quantizes activations its own way), so scores measured with the
    base's activations would describe a model no GGUF runtime runs; and with such candidates a KV-cache scheme
    llama.cpp has no cache type for (`llama_cpp_kv_type`: q8_0, q4_0, ...).

    Raises:
        ConfigError: one line naming the key (`quant.overrides[i].weight`, `quant.input`, `quant.kv_cache` and the
            menu entries).
    Example:
        >>> check_base(load_recipe("w4a8_kv8"), build_menu({"Q4_0": {"recipe": "gguf_q4_0"}}))  # ConfigError
    """
    for i, override in enumerate(recipe.overrides):
        if "weight" in override.changes:
            raise ConfigError(f"quant.overrides[{i}].weight: the base recipe {recipe.name!r} sets a weight scheme for "
                              f"{list(override.targets)}; qat-sensitivity chooses each scored module's weight, so a "
                              "base recipe may override only input / kv_cache (drop the weight key, or ignore= those "
                              "modules in the base recipe)")
    inputs = [recipe.base.input] + [o.changes["input"] for o in recipe.overrides if o.changes.get("input")]
    gguf = [c.name for c in menu.values() if c.gguf_only]
    if any(s is not None for s in inputs) and gguf:
        scheme = recipe.base.input.describe() if recipe.base.input is not None else "set by its overrides"
        listed = ", ".join(f"menu.{g}" for g in gguf)
        raise ConfigError(f"quant.input ({scheme}) of the base recipe {recipe.name!r} cannot combine with the GGUF "
                          f"candidate(s) {listed}: a GGUF file stores no activation scheme (llama.cpp quantizes "
                          "activations its own way); use a base recipe with input: null, or a menu without GGUF "
                          "types (menu=int / fp4)")
    kv = [("quant.kv_cache", recipe.base.kv_cache)] + [(f"quant.overrides[{i}].kv_cache", o.changes["kv_cache"])
                                                      for i, o in enumerate(recipe.overrides) if o.changes.get("kv_cache")]
    for key, spec in kv:
        if spec is not None and gguf and llama_cpp_kv_type(spec) is None:
            raise ConfigError(f"{key} ({spec.describe()}) of the base recipe {recipe.name!r} has no llama.cpp cache "
                              f"type, so it cannot go with the GGUF candidate(s) {', '.join(gguf)}: llama.cpp "
                              f"runs -ctk / -ctv {' / '.join(t.lower() for t in LLAMA_CPP_KV_TYPES)} (a dynamic "
                              "kv_cache on that grid: grid: ggml, per_group 32, fp16 scales, as quant="
                              "gguf_q4_0_kv_q8_0) or f16; use such a kv_cache, kv_cache: null, or a menu without "
                              "GGUF types (menu=int / fp4)")


def context_recipe(recipe: QuantRecipe) -> QuantRecipe | None:
    """`recipe` with no weight scheme anywhere: what `apply_context` prepares; None when it quantizes nothing
    (a weight-only base: the context is the float model, rotated if the base rotates)."""
    overrides = tuple(dataclasses.replace(o, changes={r: c for r, c in o.changes.items() if r != "weight"})
                      for o in recipe.overrides)
    overrides = tuple(o for o in overrides if o.changes)
    base = TensorSchemes(input=recipe.base.input, kv_cache=recipe.base.kv_cache)
    if base.input is None and base.kv_cache is None and not any(any(o.changes.values()) for o in overrides):
        return None
    return dataclasses.replace(recipe, base=base, overrides=overrides)


def select_base(modules: dict[str, nn.Module], recipe: QuantRecipe) -> dict[str, nn.Module]:
    """The modules of `modules` that `recipe` quantizes (its targets, less its ignore list).

    Raises:
        ConfigError: none of them, naming the recipe's targets and ignore list.
    """
    from_recipe = {n: m for n, m in modules.items() if recipe_selects(recipe, n, m)}
    if not from_recipe:
        raise ConfigError(f"quant: the base recipe {recipe.name!r} (targets {list(recipe.targets)}, ignore "
                          f"{list(recipe.ignore)}) quantizes none of the modules the analysis scores "
                          f"({', '.join(list(modules)[:3])}...)")
    return from_recipe


def recipe_selects(recipe: QuantRecipe, name: str, module: nn.Module) -> bool:
    """True when `recipe`'s targets match the module and its ignore list does not."""
    return any(matches(p, name, module) for p in recipe.targets) and not any(
        matches(p, name, module) for p in recipe.ignore)


def apply_context(model: nn.Module, recipe: QuantRecipe, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Give `model` (float, in place) the base recipe's non-weight schemes: prepare it with `context_recipe`
    (input and KV quantizers, rotations), or rotate it alone for a weight-only base with rotations; static
    activation ranges are calibrated on `batches` and frozen, so scoring changes no quantizer state.

    Raises:
        ConfigError: what `qat.prepare` refuses for the context (a group size that does not divide a module's
            inputs, a KV scheme on a model with no attention, a rotation the model cannot take).
    """
    context = context_recipe(recipe)
    if context is not None:
        try:
            prepare(model, context)
        except ConfigError as err:  # name the base recipe: the user gave it as quant=, not as a recipe to prepare
            raise ConfigError(f"quant (the base recipe {recipe.name!r}): {err}") from None
    elif recipe.rotations is not None:
        errors = rotation_errors(model, recipe.rotations, has_kv=False)
        if errors:
            raise ConfigError("cannot rotate the model:\n" + "\n".join(f"  - {e}" for e in errors))
        apply_rotations(model, recipe.rotations, has_kv=False)
    if any(not q.spec.dynamic for _, q in quantizers(model, ["input", "kv_cache"])):
        with torch.no_grad():
            calibrate(model, list(batches))
    return model


def effective_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `module`'s weight multiplies: its input after its input quantizer (the base recipe's activation
    scheme), or `x` itself for a plain Linear. Called with frozen ranges, so no quantizer state changes."""
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None:
        return x
    with torch.no_grad():
        return quantizer(x)
