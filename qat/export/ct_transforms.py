"""The online rotations as compressed-tensors' transform config (`quantization_config.transform_config`), where
compressed-tensors can express them, and back.

compressed-tensors 0.20 defines `TransformScheme(type, apply=[TransformArgs(targets, location, inverse)],
head_dim)`; its "hadamard" type is Sylvester's matrix divided by sqrt(n), built only for powers of two (n, or the
block `head_dim`), which is exactly qat's `hadamard(n)` there. Its "random-hadamard" multiplies its own tabled
non-power-of-two matrices by random signs, which are not ours. So:

    R4 (OnlineHadamard on a Linear's input, block b a power of two)
        {type: hadamard, head_dim: b (or null for the whole row),
         apply: [{targets: [down_proj...], location: input}, {targets: [...], location: weight_input, inverse: true}]}
    R3 / llama.cpp's K rotation (KVRotation.k_block = b)
        {type: hadamard, head_dim: b, apply: [{targets: [self_attn...], location: q_attn}, {... location: k_cache}]}
    llama.cpp's V rotation (KVRotation.v_block = b): values rotated as v_proj writes them, the attention output
        rotated back as o_proj reads it (what storing rotated values and un-rotating after attention computes)
        {type: hadamard, head_dim: b, apply: [{targets: [v_proj...], location: output},
                                              {targets: [o_proj...], location: input, inverse: true}]}

The weight_input entry follows llm-compressor's convention: the stored weights already have the rotation fused
(runtimes apply only the online locations; compressed-tensors' `apply_transform_config` on the unrotated float
model fuses it). A rotation of a non-power-of-two size (SmolLM2's R4: 1536 = H12 (x) H128) cannot be written:
the export warns, naming the modules (`qat.export.common.warn_unstored`).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from qat.errors import BadFileError
from qat.modules.rotation import KV_ROTATION, KVRotation, attach_input_rotation, online_rotations

HADAMARD = "hadamard"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _scheme(head_dim: int | None, apply: list[dict]) -> dict[str, Any]:
    return {"type": HADAMARD, "apply": apply, "randomize": False, "requires_grad": False, "head_dim": head_dim,
            "precision": "torch.float32"}


def _args(targets: list[str], location: str, inverse: bool = False) -> dict[str, Any]:
    return {"targets": targets, "location": location, "inverse": inverse, "ignore": []}


def transform_config(model: nn.Module, name_of: Callable[[str], str] = lambda n: n
                     ) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
    """(the transform_config of `model`'s online rotations compressed-tensors can express, or None when there is
    none; {"input" / "kv": module names whose rotations it holds}). `name_of` maps module names to the
    checkpoint's (the family's `checkpoint_key`).

    Example:
        >>> config, held = transform_config(qat.prepare(model, {..., "rotations": {"r4": "hadamard"}}))
    """
    online = online_rotations(model)
    groups: dict[str, dict[str, Any]] = {}
    held: dict[str, list[str]] = {"input": [], "kv": []}
    by_block: dict[tuple[str, int | None], list[str]] = {}
    for name, entry in online["input"].items():
        size, block = int(entry["size"]), int(entry["block"])
        if _pow2(block):
            by_block.setdefault(("input", None if block == size else block), []).append(name)
    for name, entry in online["kv"].items():
        k, v = int(entry["k_block"]), int(entry["v_block"])
        if (k and not _pow2(k)) or (v and not _pow2(v)):
            continue  # (Paley-built key rotations: not compressed-tensors' matrix)
        if k:
            by_block.setdefault(("k", k), []).append(name)
        if v:
            by_block.setdefault(("v", v), []).append(name)
        held["kv"].append(name)
    for (kind, block), names in sorted(by_block.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if kind == "input":
            targets = [name_of(n) for n in names]
            apply = [_args(targets, "input"), _args(targets, "weight_input", inverse=True)]
            held["input"] += names
        elif kind == "k":
            targets = [name_of(n) for n in names]
            apply = [_args(targets, "q_attn"), _args(targets, "k_cache")]
        else:
            apply = [_args([name_of(f"{n}.v_proj") for n in names], "output"),
                     _args([name_of(f"{n}.o_proj") for n in names], "input", inverse=True)]
        groups[f"{kind}_rotation_{block or 'row'}"] = _scheme(block, apply)
    return ({"config_groups": groups} if groups else None), held


def attach_transforms(model: nn.Module, config: Any, path: Any, name_of: Callable[[str], str] = lambda n: n) -> None:
    """Re-attach the online rotations of a transform_config qat wrote (`transform_config`) to a loaded model, so
    that it computes what the exported one did. Weight locations are skipped (fused in the stored weights).

    Raises:
        BadFileError: a transform this reader does not implement (another type, random permutations, a location
            or target that is not one of the forms above), naming it.
    """
    if not config:
        return
    groups = config.get("config_groups") if isinstance(config, dict) else None
    if not isinstance(groups, dict):
        raise BadFileError(path, "quantization_config.transform_config has no config_groups mapping")
    kv: dict[str, dict[str, int]] = {}
    for key, scheme in groups.items():
        if not isinstance(scheme, dict) or scheme.get("type") != HADAMARD or scheme.get("randomize"):
            raise BadFileError(path, f"transform_config.config_groups.{key}: only deterministic 'hadamard' transforms "
                               f"are read (qat writes those); got {str(scheme)[:120]}")
        block = scheme.get("head_dim")
        for args in scheme.get("apply") or []:
            location, targets = args.get("location"), [name_of(t) for t in args.get("targets") or []]
            for target in targets:
                try:
                    module = model.get_submodule(target)
                except AttributeError:
                    raise BadFileError(path, f"transform_config.config_groups.{key}: target {target!r} is not a "
                                       "module of the model (qat reads module names, not patterns)") from None
                if location == "input" and not args.get("inverse"):
                    attach_input_rotation(module, module.in_features, block or module.in_features)
                elif location == "q_attn":
                    kv.setdefault(target, {"k": 0, "v": 0})["k"] = int(block or module.head_dim)
                elif location == "output" and target.endswith(".v_proj"):
                    kv.setdefault(target.rpartition(".")[0], {"k": 0, "v": 0})["v"] = int(block)
                elif location not in ("weight_input", "weight_output", "k_cache", "input"):
                    raise BadFileError(path, f"transform_config.config_groups.{key}: location {location!r} on "
                                       f"{target!r} is not one qat writes")
    for name, blocks in kv.items():
        source = "llama_cpp" if blocks["v"] else "r3"
        setattr(model.get_submodule(name), KV_ROTATION, KVRotation(blocks["k"], blocks["v"], source=source))
