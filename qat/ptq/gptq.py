"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer-output error.

Follows IST-DASLab/gptq `fasterquant`: H = 2/n sum x x^T, percdamp dampening, upper Cholesky factor
of H^-1, lazy block updates, per-group quantizers fitted on the error-updated weights (dynamic groups)
or on the original weights (static groups), act-order (columns by decreasing diag(H)) with the group
index g_idx recorded. Every column is quantized with `qat.primitives.fake_quantize_forward` and the
qparams returned are pinned on the module, so the fake-quant forward reproduces the solved weight
bit for bit and `qat.convert` stores exactly its codes.

Differences from the reference, on purpose:
    * dead input columns (diag(H) == 0) are quantized round-to-nearest and kept, not zeroed, so a
      channel the calibration data never exercised still works at test time;
    * a Hessian whose Cholesky fails is retried with 10x the dampening (a warning says so).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from qat.observers import build_observer
from qat.primitives import choose_qparams, fake_quantize_forward
from qat.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass
class GPTQResult:
    """What GPTQ solved for one weight: the quantized weight and the qparams it was quantized with."""

    weight: torch.Tensor  # dequantized values, [O, I]
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss: float  # sum over columns of (w - q)^2 / Hinv_ii^2 / 2 (the reference's error estimate)
    damp: float  # the dampening added to diag(H) in the end


def check_spec(spec: QuantSpec, name: str) -> None:
    """GPTQ / AWQ solve uniform integer weight grids per tensor, channel or group.

    Raises:
        ValueError: naming the module and what is supported.
    """
    if spec.is_float or spec.grid != "uniform" or spec.dynamic or spec.granularity == "per_token":
        raise ValueError(f"{name}: weight scheme {spec.describe()} is not supported by this PTQ method; "
                         "use an integer, uniform-grid, static per_tensor / per_channel (axis 0) / per_group scheme")
    if spec.granularity == "per_channel" and spec.axis % 2 != 0:
        raise ValueError(f"{name}: per_channel weights need axis=0 (one scale per output row), got axis={spec.axis}")


def column_spec(spec: QuantSpec) -> QuantSpec:
    """The spec one column is quantized with: its per-row qparams broadcast as per_channel ones.

    The element-wise arithmetic is that of `spec` itself (same round, offset, clamp, scale)."""
    return spec.replace(granularity="per_channel", axis=0, group_size=None, learn="none", dynamic=False)


def fit_qparams(w: torch.Tensor, spec: QuantSpec, observer=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero-point [O, 1] for a block of columns w [O, g] (one range per row), via `observer`."""
    flat = column_spec(spec)
    observer = observer or build_observer(flat)
    lo, hi = observer.range_of(w)
    if spec.granularity == "per_tensor":
        lo, hi = lo.min().expand(w.shape[0], 1), hi.max().expand(w.shape[0], 1)
    return choose_qparams(lo.reshape(-1, 1), hi.reshape(-1, 1), spec)


def inverse_cholesky(h: torch.Tensor, percdamp: float, name: str = "layer", retries: int = 6):
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H).

    A Cholesky that fails (singular or indefinite H) is retried with 10x the dampening.

    Returns:
        (factor, damp used).
    Raises:
        RuntimeError: still failing after `retries` increases, naming the layer.
    """
    mean_diag = float(torch.diag(h).mean())
    damp = percdamp * mean_diag
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    flipped = h.flip(0, 1)
    for attempt in range(retries + 1):
        # With J the reversal, J H J = M M^T (M lower) gives H^-1 = U^T U for U = J M^-1 J, upper:
        # one Cholesky and one triangular solve instead of Cholesky, cholesky_inverse, Cholesky.
        chol, info = torch.linalg.cholesky_ex(flipped + damp * eye)
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(upper).all()) and bool((torch.diagonal(upper) > 0).all()):
                return upper, damp
        new = max(damp * 10, 1e-4 * mean_diag, 1e-8)
        warnings.warn(f"{name}: GPTQ Hessian is singular with damp={damp:.3g}; retrying with damp={new:.3g} "
                      "(raise method.percdamp to silence this)", RuntimeWarning, stacklevel=2)
        damp = new
    raise RuntimeError(f"{name}: Cholesky of the GPTQ Hessian failed even with damp={damp:.3g}")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    observer=None,
    name: str = "layer",
) -> GPTQResult:
    """Solve GPTQ for one weight.

    Args:
        weight: [O, I] float weight.
        hessian: [I, I] H = 2/n sum x x^T of the layer inputs (see `qat.ptq.stats.InputStats`).
        spec: the weight scheme (per_tensor, per_channel axis 0 or per_group).
        blocksize: columns per lazy batch update.
        percdamp: dampening, a fraction of mean(diag H).
        actorder: quantize columns by decreasing diag(H) (desc_act); records g_idx with dynamic groups.
        static_groups: fit every group's qparams on the original weight before solving.
        observer: range estimator for the group qparams (default: the one `spec` names).
    Returns:
        GPTQResult; `weight` is the dequantized solution, equal to fake-quantizing it with `scale`,
        `zero_point` and `g_idx`.
    Raises:
        ValueError: a non-finite weight or Hessian, shapes that do not match, an unsupported scheme.
    Example:
        >>> res = gptq_quantize(w, stats.hessian(), QuantSpec(bits=4, granularity="per_group", group_size=128))
        >>> layer.weight_quantizer.set_qparams(res.scale, res.zero_point, res.g_idx)
    """
    check_spec(spec, name)
    W = weight.detach().float().clone()
    O, I = W.shape
    if hessian.shape != (I, I) or not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: GPTQ needs a finite weight and a finite [{I}, {I}] Hessian, "
                         f"got weight {tuple(W.shape)} and Hessian {tuple(hessian.shape)}")
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    group = spec.group_size if spec.granularity == "per_group" else I
    observer = observer or build_observer(column_spec(spec))
    n_groups = I // group
    scales = torch.zeros(O, n_groups, device=W.device)
    zeros = None if spec.symmetric else torch.zeros(O, n_groups, device=W.device)
    if spec.granularity != "per_group" or static_groups:
        for g in range(n_groups):
            s, z = fit_qparams(W[:, g * group:(g + 1) * group] if spec.granularity == "per_group" else W, spec, observer)
            _store(scales, zeros, g, s, z)
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(I, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    hinv, damp = inverse_cholesky(H, percdamp, name)
    dynamic = spec.granularity == "per_group" and not static_groups
    Q, loss = _solve(W, hinv, spec, perm, group, scales, zeros, dynamic, blocksize, observer)
    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    g_idx = None
    if dynamic and actorder:
        g_idx = (torch.arange(I, device=W.device) // group)[invperm]
    return GPTQResult(Q.to(weight.dtype), _layout(scales, spec), _layout(zeros, spec), g_idx, loss, damp)


def _store(scales, zeros, g, s, z):
    scales[:, g] = s[:, 0]
    if zeros is not None:
        zeros[:, g] = z[:, 0]


def _layout(t: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    if t is None:
        return None
    if spec.granularity == "per_group":
        return t.unsqueeze(-1).contiguous()
    if spec.granularity == "per_tensor":
        return t[0, 0].clone()
    return t.contiguous()  # per_channel [O, 1]


def _solve(W, hinv, spec, perm, group, scales, zeros, dynamic, blocksize, observer):
    """The lazy-batch column loop of GPTQ, on permuted columns; fills `scales` for dynamic groups."""
    O, I = W.shape
    flat = column_spec(spec)
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    perm_groups = (perm // group).tolist()
    for i1 in range(0, I, blocksize):
        i2 = min(i1 + blocksize, I)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic and col % group == 0:
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                _store(scales, zeros, col // group, *fit_qparams(ahead, spec, observer))
            g = col // group if dynamic else perm_groups[col]
            s = scales[:, g:g + 1]
            z = None if zeros is None else zeros[:, g:g + 1]
            w = W1[:, i:i + 1]
            q, _ = fake_quantize_forward(w, s, z, flat)
            Q[:, col:col + 1] = q
            d = hinv1[i, i]
            e = (w - q) / d
            loss += e.square().sum() / 2
            W1[:, i:].addmm_(e, hinv1[i:i + 1, i:], alpha=-1)
            err1[:, i:i + 1] = e
        W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    return Q, float(loss)


# -- model driver ---------------------------------------------------------------------------------
@dataclass
class GPTQConfig:
    """Method config of GPTQ (configs/method/gptq.yaml).

    Args:
        blocksize: columns per lazy batch update (128).
        percdamp: dampening as a fraction of mean(diag H) (0.01).
        actorder: desc_act column order (records g_idx with dynamic groups).
        static_groups: group qparams fitted on the original weights.
        true_sequential: inside a block, calibrate each stage (q/k/v, o, gate/up, down) on the outputs
            of the already-quantized stages before it.
        min_tokens: fewer calibration tokens than this is an error.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    actorder: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    min_tokens: int = 128

    def __post_init__(self) -> None:
        if self.blocksize < 1 or not 0.0 <= self.percdamp < 1.0:
            raise ValueError(f"gptq: blocksize={self.blocksize} (>= 1), percdamp={self.percdamp} (in [0, 1)) out of range")


def solve_linear(name: str, module, stats, cfg: GPTQConfig) -> float | None:
    """GPTQ one FakeQuantLinear from its input statistics; set its weight and pin its qparams.

    Falls back to round-to-nearest, with a warning, when the layer saw no tokens or only zero inputs.
    Returns:
        the GPTQ loss, or None for the RTN fallback.
    """
    from qat.ptq.rtn import pin_rtn

    quantizer = module.weight_quantizer
    if stats.n_tokens == 0 or not bool(torch.diag(stats.gram).any()):
        warnings.warn(f"{name}: all calibration inputs of this layer are zero (or it was never called); "
                      "quantizing it round-to-nearest instead of GPTQ", RuntimeWarning, stacklevel=2)
        pin_rtn(module)
        return None
    res = gptq_quantize(module.weight, stats.hessian(), quantizer.spec, cfg.blocksize, cfg.percdamp,
                        cfg.actorder, cfg.static_groups, name=name)
    with torch.no_grad():
        module.weight.copy_(res.weight)
    quantizer.set_qparams(res.scale, res.zero_point, res.g_idx)
    return res.loss


def stages(block, inputs, linears: dict, is_model: bool) -> list[list[str]]:
    """Linears grouped by the tensor they read, in call order (q/k/v, o, gate/up, down for Llama)."""
    from qat.control import quantization_disabled
    from qat.ptq.runner import run_block
    from qat.ptq.stats import record_call_order

    with quantization_disabled(block), record_call_order(linears) as order:
        run_block(block, inputs[:1], is_model)
    groups: list[list[str]] = []
    last = None
    for n, tensor in order:
        if tensor is not last:
            groups.append([])
        groups[-1].append(n)
        last = tensor
    missing = [n for n in linears if all(n not in g for g in groups)]
    return groups + ([missing] if missing else [])


def gptq_block(cfg: GPTQConfig):
    """The `solve_block` of `qat.ptq.runner.sequential` for GPTQ."""
    from qat.control import quantization_disabled
    from qat.ptq.runner import activation_quantizers_off, quantized_linears, run_block
    from qat.ptq.stats import record_inputs

    def solve(name, block, inputs, is_model):
        linears = quantized_linears(block)
        groups = stages(block, inputs, linears, is_model) if cfg.true_sequential else [list(linears)]
        for group in groups:
            mods = {n: linears[n] for n in group}
            with activation_quantizers_off(block), record_inputs(mods, magnitudes=False) as stats:
                if cfg.true_sequential:
                    run_block(block, inputs, is_model)
                else:
                    with quantization_disabled(block):
                        run_block(block, inputs, is_model)
            for n in group:
                loss = solve_linear(f"{name}.{n}", mods[n], stats[n], cfg)
                log.debug("gptq %s.%s loss=%s", name, n, loss)
            del stats

    return solve
