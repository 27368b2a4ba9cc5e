"""Learned rotations (SpinQuant): R1 (residual stream) and one R2 per layer (per head on values) as orthogonal
parameters, trained with the Cayley SGD on the orthogonal group, jointly with QAT, then fused into the weights.

    rotations = attach_learned_rotations(prepared)            # after qat.prepare: norms folded, weights parametrized
    opt_r = CayleySGD(rotations, lr=1.5)                       # the rotations; AdamW for the rest
    ... train: the weight quantizers see W @ R at every step ...
    fuse_learned_rotations(prepared)                           # W <- W @ R for good; plain parameters again

The weights are `torch.nn.utils.parametrize` parametrizations reading the shared rotation modules, so the
fake-quant modules quantize the rotated weights and gradients reach R through them. Starting from a Hadamard
(the default) the model computes what it computed before; `fuse_learned_rotations` keeps the function (exactly
for the block weights; the online embedding / lm_head ends below regroup a product, so in bf16 the fused logits
differ from the trained ones by rounding, ~4e-3 on a tiny model; float32 / float64 agree to their precision).

The embedding and lm_head, when not quantized (the recipes ignore them), are not parametrized: E @ R and
W_head @ R over the whole vocabulary at every step would cost more than the layers on a small model. R1 is applied
to what they compute instead: embedding(ids) @ R (only the rows looked up) and, since
logits = h @ (W_head R)^T = (h R^T) @ W_head^T, lm_head's input times R^T (hooks reading the module's
`learned_rotation`). The function and the gradients are the same up to float rounding; fusing bakes R into both.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat.arch import get_arch
from qat.errors import ConfigError
from qat.modules.hadamard import ROTATION_KINDS, rotation_matrix
from qat.modules.quantizer import TensorQuantizer
from qat.transform.rotations.base import RotationConfig, head_dim_of, weight_and_bias
from qat.transform.rotations.r1 import fold_norms


class CayleySGD(torch.optim.Optimizer):
    """SGD (with momentum) that keeps square parameters orthogonal: X <- (I + a/2 W)^-1 (I - a/2 W) X with the
    skew-symmetric W = G X^T - X G^T (the Cayley transform of the Riemannian gradient; SpinQuant's optimizer,
    after Li et al. 2020). To first order the step is X - a (G - X G^T X).

    The step is theirs: a = alpha / 2 with alpha = min(lr, 1 / ||S||_1), S = X^T W X / 2 the same direction in
    their (transposed) frame and ||.||_1 the largest column sum of absolute values. The cap keeps every step a
    small rotation whatever the gradient's size: a KD gradient on SmolLM2's 576-wide R1 has ||S||_1 ~ 18, so
    an uncapped lr 1.5 would turn R1 by alpha S of 1-norm ~ 27 at each step. Their lr 1.5 goes with 8 x 2048 tokens
    a step; with fewer, scale it down (QATModule's default: 0.02 for 2 x 128).

    Example:
        >>> opt = CayleySGD([rotation.weight], lr=1.5)
    """

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"CayleySGD: lr={lr} must be > 0 and momentum={momentum} in [0, 1)")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD: parameter of shape {tuple(p.shape)} is not a square matrix")
                g = p.grad.double()
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(g))
                    g = buf.mul_(group["momentum"]).add_(g)
                x = p.double()
                w = g @ x.T - x @ g.T
                norm = float((x.T @ w @ x).abs().sum(0).max()) / 2
                half = min(group["lr"], 1 / (norm + 1e-8)) / 4
                eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
                p.copy_(torch.linalg.solve(eye + half * w, (eye - half * w) @ x).to(p.dtype))
        return loss


class Rotation(nn.Module):
    """One learnable orthogonal matrix (`weight`, [n, n]), shared by the parametrizations that read it."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(matrix.clone())


class _In(nn.Module):
    """W -> W @ R (a reader of the rotated stream: columns)."""

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.rotation = rotation

    def forward(self, w):
        return w @ self.rotation.weight.to(w.dtype)


class _Out(nn.Module):
    """W -> R^T @ W, or b -> b @ R (a writer into the rotated stream: rows)."""

    def __init__(self, rotation: Rotation, bias: bool = False):
        super().__init__()
        self.rotation, self.bias = rotation, bias

    def forward(self, w):
        r = self.rotation.weight.to(w.dtype)
        return w @ r if self.bias else r.T @ w


class _HeadsOut(nn.Module):
    """Rows [start, start + heads * d) of W (or of a bias) per head: R^T @ rows (bias: rows @ R)."""

    def __init__(self, rotation: Rotation, start: int, heads: int):
        super().__init__()
        self.rotation, self.start, self.heads = rotation, start, heads

    def forward(self, w):
        r = self.rotation.weight.to(w.dtype)
        d, end = r.shape[0], self.start + self.heads * r.shape[0]
        part = w[self.start:end]
        if w.ndim == 1:
            rotated = (part.reshape(self.heads, d) @ r).reshape(-1)
        else:
            rotated = (r.T @ part.reshape(self.heads, d, -1)).reshape(self.heads * d, -1)
        return torch.cat([w[:self.start], rotated, w[end:]])


class _HeadsIn(nn.Module):
    """W [out, heads * d] -> per head W_h @ R (o_proj's columns)."""

    def __init__(self, rotation: Rotation):
        super().__init__()
        self.rotation = rotation

    def forward(self, w):
        r = self.rotation.weight.to(w.dtype)
        return (w.reshape(w.shape[0], -1, r.shape[0]) @ r).reshape(w.shape)


LEARNED_ROTATION = "learned_rotation"  # the attribute the embedding / lm_head hooks read R1 from


def _rotate_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of an unquantized embedding: the rows looked up times R (= the rows of E @ R)."""
    return out @ getattr(module, LEARNED_ROTATION).weight.to(out.dtype)


def _rotate_input_back(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of an unquantized lm_head: h @ R^T, so that lm_head(h R^T) = h @ (W R)^T."""
    x = args[0]
    return (x @ getattr(module, LEARNED_ROTATION).weight.to(x.dtype).T, *args[1:])


_OLD_NAMES = {"parametrizations.weight.original": "weight",
              "parametrizations.weight.0.rotation.weight": f"{LEARNED_ROTATION}.weight"}


def _rename_parametrized(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint written while the embedding / lm_head weight was parametrized
    (before R1 moved to their output / input) resumes: its keys get the names the hooked module has."""
    for old, new in _OLD_NAMES.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def _quantized(module: nn.Module) -> bool:
    return any(isinstance(m, TensorQuantizer) for m in module.modules())


def _rotate_end(module: nn.Module, rotation: Rotation, online: bool, output: bool) -> None:
    """R1 on the embedding (`output`) or lm_head: on its output / input when `online` and the module holds no
    quantizer (a weight quantizer must see the rotated weight), else a parametrization of its weight."""
    if online and not _quantized(module):
        setattr(module, LEARNED_ROTATION, rotation)  # a submodule: deepcopy and pickling carry it with the hook
        module.register_load_state_dict_pre_hook(_rename_parametrized)
        if output:
            module.register_forward_hook(_rotate_output)
        else:
            module.register_forward_pre_hook(_rotate_input_back)
    else:
        parametrize.register_parametrization(module, "weight", _In(rotation))


@torch.no_grad()
def _fuse_end(module: nn.Module) -> None:
    """Bake the hooked R1 into the weight (W <- W @ R) and remove the hook and attribute. The product is taken
    in the weight's dtype, as the hook took it: the rows come out as the model looked them up (a float64 product
    differs in the last bit, which an activation quantizer downstream can turn into a bin's step)."""
    rotation = getattr(module, LEARNED_ROTATION, None)
    if rotation is None:
        return
    w = module.weight
    w.copy_(w @ rotation.weight.to(w.dtype))
    delattr(module, LEARNED_ROTATION)
    for hooks, fn in ((module._forward_hooks, _rotate_output), (module._forward_pre_hooks, _rotate_input_back),
                      (module._load_state_dict_pre_hooks, _rename_parametrized)):
        for key in [k for k, h in hooks.items() if h is fn or getattr(h, "hook", None) is fn]:
            del hooks[key]


def _owner(block: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(module, parameter name) of a block-relative weight name (a module with .weight, or a parameter)."""
    weight_and_bias(block, name)  # refuses what is not a weight
    try:
        module = block.get_submodule(name)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            return module, "weight"
    except AttributeError:
        pass
    parent, _, leaf = name.rpartition(".")
    return block.get_submodule(parent), leaf


LEARNED_INITS = ("auto", "identity", *ROTATION_KINDS)  # "auto": identity where the recipe fused one, else hadamard


def initial_rotation(kind: str, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The starting matrix of a learned rotation: "identity" (keep the weights as they are: a recipe's fused
    rotation is the start) or a rotation kind of `rotation_matrix`."""
    if kind == "identity":
        return torch.eye(n, dtype=dtype)
    return rotation_matrix(kind, n, seed, dtype)


def resolve_init(init: str, recipe_rotations: RotationConfig | Mapping | None) -> dict[str, str]:
    """{"r1": kind, "r2": kind} for `attach_learned_rotations`: "auto" starts each learned rotation from the
    recipe's own fused one where the recipe has it (identity on top) and from a Hadamard where it does not;
    any other value is used for both.

    Args:
        init: one of `LEARNED_INITS`.
        recipe_rotations: the recipe's `rotations` (a RotationConfig, its mapping, or None: none fused).
    Returns:
        {"r1": kind, "r2": kind}, kinds of `initial_rotation`.
    Example:
        >>> resolve_init("auto", {"r1": "random_hadamard", "r3": "hadamard"})
        {'r1': 'identity', 'r2': 'hadamard'}
    """
    if init != "auto":
        return {"r1": init, "r2": init}
    if isinstance(recipe_rotations, RotationConfig):
        recipe_rotations = recipe_rotations.to_dict()
    fused = recipe_rotations or {}
    return {name: "identity" if fused.get(name) else "hadamard" for name in ("r1", "r2")}


def _start_kinds(init: str | Mapping[str, str], r1: bool, r2: bool) -> dict[str, str]:
    """`attach_learned_rotations`' init as {"r1": kind, "r2": kind}, checked before any weight changes."""
    inits = dict(init) if isinstance(init, Mapping) else {"r1": init, "r2": init}
    wanted = [name for name, on in (("r1", r1), ("r2", r2)) if on]
    kinds = ("identity", *ROTATION_KINDS)
    errors = [f"init: unknown key(s) {sorted(set(inits) - {'r1', 'r2'})}; valid: ['r1', 'r2']"] \
        if set(inits) - {"r1", "r2"} else []
    errors += [f"init[{name!r}] missing; give a kind for every learned rotation ({wanted})"
               for name in wanted if name not in inits]
    errors += [f"init[{name!r}]={inits[name]!r}; choose one of {list(kinds)}"
               for name in wanted if name in inits and inits[name] not in kinds]
    if errors:
        raise ConfigError("; ".join(errors))
    return inits


def attach_learned_rotations(model: nn.Module, r1: bool = True, r2: bool = True,
                             init: str | Mapping[str, str] = "hadamard", seed: int = 0,
                             online_ends: bool = True) -> list[nn.Parameter]:
    """Make R1 and one R2 per layer learnable parameters of `model` (float or prepared): RMSNorms are folded
    first, then every weight that reads or writes the residual stream (and v / o per head) is parametrized.

    With `online_ends` (the default) an unquantized embedding / lm_head gets R1 on its output / input instead
    (the same function, without the [vocab, hidden] products per step); False parametrizes their weights too.
    MoE families: the router's weight and the fused experts' 3-D weights are parametrized as the offline R1
    rotates them (per expert: gate_up_proj [E, 2I, H] @ R1, R1^T @ down_proj [E, H, I]), float or fake-quant.
    `init`: the starting matrix, one for both or {"r1": ..., "r2": ...}: "identity" (on a model whose recipe
    already fused that rotation: it starts from it; a Hadamard on top of a random Hadamard, H D H, would
    undo much of its mixing) or a kind of `rotation_matrix`.

    Returns:
        the rotation parameters (give them to `CayleySGD`; keep them out of AdamW).
    Raises:
        ConfigError: a family R1 cannot be applied to (`ArchAdapter.residual_rotation_refusal`).
    """
    adapter = get_arch(model)
    if r1 and (why := adapter.residual_rotation_refusal or adapter.structure_refusal(model.config)):
        raise ConfigError(f"learned R1 on {model.config.model_type}: {why}")
    inits = _start_kinds(init, r1, r2)
    params: list[nn.Parameter] = []
    _, blocks = adapter.blocks(model)
    if r1:
        fold_norms(model)
        embed = model.get_input_embeddings().weight  # the matrix is built on the CPU: on the model's device, dtype
        rot = Rotation(initial_rotation(inits["r1"], model.config.hidden_size, seed, embed.dtype).to(embed.device))
        params.append(rot.weight)
        _rotate_end(model.get_input_embeddings(), rot, online_ends, output=True)
        _rotate_end(model.get_output_embeddings(), rot, online_ends, output=False)
        for block in blocks:
            for name in (n for m in adapter.residual_reads for n in m.linears):
                parametrize.register_parametrization(*_owner(block, name), _In(rot))
            for name in adapter.residual_writes:
                module, pname = _owner(block, name)
                parametrize.register_parametrization(module, pname, _Out(rot))
                if pname == "weight" and getattr(module, "bias", None) is not None:
                    parametrize.register_parametrization(module, "bias", _Out(rot, bias=True))
    if r2:
        start, kv_heads = adapter.value_rows(model.config), model.config.num_key_value_heads
        for block in blocks:
            d = head_dim_of(block.get_submodule(adapter.out_proj.rpartition(".")[0]))
            out_w = block.get_submodule(adapter.out_proj).weight
            rot = Rotation(initial_rotation(inits["r2"], d, seed + 1, out_w.dtype).to(out_w.device))
            params.append(rot.weight)
            module, pname = _owner(block, adapter.value_proj)
            parametrize.register_parametrization(module, pname, _HeadsOut(rot, start, kv_heads))
            if getattr(module, "bias", None) is not None:
                parametrize.register_parametrization(module, "bias", _HeadsOut(rot, start, kv_heads))
            parametrize.register_parametrization(*_owner(block, adapter.out_proj), _HeadsIn(rot))
    return params


def fuse_learned_rotations(model: nn.Module) -> nn.Module:
    """Bake every learned rotation into its weights (the parametrizations and hooks are removed, the values
    kept)."""
    for module in list(model.modules()):
        _fuse_end(module)
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def learned_rotations_in(model: nn.Module, state: dict) -> dict[str, bool] | None:
    """{"r1": ..., "r2": ...} of the learned rotations a checkpoint of `model` was written with (a QAT run with
    `learned_rotations` saves them unfused: parametrizations on the block weights, `learned_rotation` on an
    unquantized embedding / lm_head), or None when `state` holds none. `state` has `model`'s key names.

    Example:
        >>> learned_rotations_in(prepared, torch.load("last.ckpt", weights_only=True)["state_dict"])  # after removing "model."
        {'r1': True, 'r2': True}
    """
    if not any(".parametrizations." in k or k.endswith(f".{LEARNED_ROTATION}.weight") for k in state):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    embed = names[id(model.get_input_embeddings())]
    # R1 by its own keys (online end, or the older weight parametrization's rotation), not by `.original`, which
    # any parametrization of the embedding has
    r1 = any(f"{embed}.{tail}" in state for tail in (f"{LEARNED_ROTATION}.weight", "parametrizations.weight.0.rotation.weight"))
    adapter = get_arch(model)
    _, blocks = adapter.blocks(model)
    module, pname = _owner(blocks[0], adapter.out_proj)  # R1 (a residual write) comes first on o_proj, then R2
    r2 = f"{names[id(module)]}.parametrizations.{pname}.{int(r1)}.rotation.weight" in state
    return {"r1": r1, "r2": r2} if r1 or r2 else None


def load_learned_rotations(model: nn.Module, state: dict, strict: bool = False) -> tuple[list[str], list[str]]:
    """Load a checkpoint written with learned rotations into `model` (prepared with the same recipe, not yet
    rotated) and fuse them: the rotations the keys name are attached (`learned_rotations_in`), the state
    loaded, the rotations baked in as the training run's `fuse_learned_rotations` did when fit ended (same
    operations, same dtype: the same weights to the bit). A state without learned rotations is loaded as is.

    Returns:
        (missing, unexpected) keys of `load_state_dict`.
    """
    found = learned_rotations_in(model, state)
    if found is not None:  # the initial values do not matter: the checkpoint's rotations overwrite them
        attach_learned_rotations(model, r1=found["r1"], r2=found["r2"])
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if found is not None:
        fuse_learned_rotations(model)
    return missing, unexpected


def has_learned_rotations(model: nn.Module) -> bool:
    """Whether learned rotations are attached to `model` and not yet fused (`qat.prepare` must come first)."""
    return any(isinstance(m, Rotation) for m in model.modules())
