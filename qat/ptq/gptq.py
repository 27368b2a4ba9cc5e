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

import warnings
from dataclasses import dataclass

import torch

from qat.errors import ConfigError
from qat.formats.iq4_nl import fitted_scale as iq4_nl_fitted_scale
from qat.formats.iq4_xs import fitted_scale as iq4_xs_fitted_scale
from qat.formats.kquant import fitted_range
from qat.observers import build_observer
from qat.primitives import choose_qparams, fake_quantize_forward
from qat.spec import QuantSpec


@dataclass
class GPTQResult:
    """What GPTQ solved for one weight: the quantized weight and the qparams it was quantized with."""

    weight: torch.Tensor  # dequantized values, [O, I]
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss: float  # sum over columns of (w - q)^2 / Hinv_ii^2 / 2 (the reference's error estimate)
    damp: float  # the dampening added to diag(H) in the end


# -- format-dependent branches ----------------------------------------------------------------------
# Every place the GPTQ solver depends on the weight's number format (uniform grid vs the GGUF and other block
# grids) is in this section, so that the format registry can take these over in one place.
BLOCK_GRIDS = ("iq4_nl", "iq4_xs", "mx", "nvfp4", "ternary", "block")  # block formats both methods solve on their own grid
SOLVABLE_GRIDS = ("uniform", "ggml", "ggml_k", *BLOCK_GRIDS)  # GPTQ
AWQ_GRIDS = ("uniform", *BLOCK_GRIDS)
# grids whose scales GPTQ always fits on the original weight (static groups): NVFP4's block scales hang under one
# per-tensor global; ternary's absmax scale, fitted on error-updated columns, grows with the pushed error and
# zeroes more weights (measured on tests/ptq's correlated problem: dynamic 1.45x RTN's output error, static 0.71x)
STATIC_FIT = ("nvfp4", "ternary")
SEARCHED = {"iq4_nl": iq4_nl_fitted_scale, "iq4_xs": iq4_xs_fitted_scale}  # importance-weighted scale searches


def check_spec(spec: QuantSpec, name: str, grids: bool = False) -> None:
    """GPTQ / AWQ solve static weight schemes per tensor, channel or group on the uniform grid (integer and fp8
    elements), and the block formats (IQ4_NL, IQ4_XS, MXFP4, MXFP8, NVFP4, FP8 blocks, ternary) on their own grids:
    every column is rounded with the format's own rounding, so fp8 elements need nothing special. GPTQ also solves
    the GGUF legacy and K-quant grids.

    Args:
        grids: also accept the ggml / ggml_k block grids (GPTQ constrained to a GGUF type).
    Raises:
        ValueError: naming the module and what is supported.
    """
    allowed = SOLVABLE_GRIDS if grids else AWQ_GRIDS
    if spec.grid not in allowed or spec.dynamic or spec.granularity == "per_token":
        raise ConfigError(f"{name}: weight scheme {spec.describe()} is not supported by this PTQ method; "
                         "use a static per_tensor / per_channel (axis 0) / per_group scheme on grid "
                         f"{' or '.join(allowed)}")
    if spec.granularity == "per_channel" and spec.axis % 2 != 0:
        raise ConfigError(f"{name}: per_channel weights need axis=0 (one scale per output row), got axis={spec.axis}")


def holds_g_idx(spec: QuantSpec) -> bool:
    """Whether weights of this format can record an act-order group index (GGUF and the other block layouts cannot)."""
    return spec.grid == "uniform"


def column_spec(spec: QuantSpec) -> QuantSpec:
    """The spec one column of a uniform-grid weight is quantized with: its per-row qparams broadcast as
    per_channel ones. The element-wise arithmetic is that of `spec` itself (same round, offset, clamp, scale)."""
    return spec.replace(granularity="per_channel", axis=0, group_size=None, ragged=False, learn="none", dynamic=False)


def fit_qparams(w: torch.Tensor, spec: QuantSpec, observer=None,
                importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qparams of `w` [O, n] in `spec`'s own layout ([O, n/g, 1] per_group, [O, 1] per_channel, [] per_tensor).

    The range comes from `observer` (default: the one `spec` names); for the asymmetric K-quants (Q2_K, Q4_K,
    Q5_K) and IQ4_NL / IQ4_XS with `importance` [n] the qparams come from the importance-weighted search of the
    GGUF exporter (`qat.formats.kquant.fitted_range`, `qat.formats.iq4_nl.fitted_scale`, llama.cpp's imatrix fit).

    Example:
        >>> s, z = fit_qparams(w[:, :128], QuantSpec(bits=4, granularity="per_group", group_size=32))
    """
    if importance is not None and spec.grid == "ggml_k" and not spec.symmetric:
        return choose_qparams(*fitted_range(w, spec, importance), spec)
    if importance is not None and spec.grid in SEARCHED:  # the GGUF encoder's imatrix search, on the format's grid
        return SEARCHED[spec.grid](w, importance), None
    observer = observer or build_observer(spec)
    return choose_qparams(*observer.range_of(w), spec)


def column_quantizer(spec: QuantSpec):
    """fake-quantize one column [O, 1] with its group's qparams [O, 1], through `qat.primitives`.

    Uniform grids use `spec` as per_channel (the same element-wise arithmetic); the GGUF grids only exist
    per_group, so their column is one group of width 1 picked by a constant g_idx (the block formats too, with
    scales held as given: a learned spec would put a column's scales on its grid as if they were a whole tensor's)."""
    if spec.grid == "uniform":
        flat = column_spec(spec)
        return lambda w, s, z: fake_quantize_forward(w, s, z, flat)[0]
    spec = spec.replace(learn="none")
    first = torch.zeros(1, dtype=torch.long)

    def quant(w, s, z):
        return fake_quantize_forward(w, s.unsqueeze(-1), None if z is None else z.unsqueeze(-1), spec,
                                     g_idx=first.to(w.device))[0]

    return quant


def fit_span(spec: QuantSpec) -> int:
    """Columns whose qparams are fitted together: a K-quant or IQ4_XS super-block, else one group."""
    return 256 if spec.grid in ("ggml_k", "iq4_xs") else (spec.group_size or 1)


# -- solver -----------------------------------------------------------------------------------------
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
    importance_fit: bool = True,
    factor: "HessianFactor | None" = None,
) -> GPTQResult:
    """Solve GPTQ for one weight.

    Args:
        weight: [O, I] float weight.
        hessian: [I, I] H = 2/n sum x x^T of the layer inputs (see `qat.ptq.stats.InputStats`).
        spec: the weight scheme: per_tensor, per_channel axis 0, per_group (ragged too), or a GGUF grid
            (ggml: Q4_0 / Q5_0 / Q8_0 ..., ggml_k: the K-quants, whose 256-column super-blocks are fitted whole).
        blocksize: columns per lazy batch update.
        percdamp: dampening, a fraction of mean(diag H).
        actorder: quantize columns by decreasing diag(H) (desc_act); records g_idx with dynamic groups.
        static_groups: fit every group's qparams on the original weight before solving.
        observer: range estimator for the group qparams (default: the one `spec` names).
        importance_fit: for the asymmetric K-quants and IQ4_NL / IQ4_XS, fit (sub-)block scales (and minimums)
            with the diag(H)-weighted search of the GGUF exporter (llama.cpp's imatrix fit) instead of the observer.
        factor: `hessian_factor(hessian, percdamp, actorder)` computed once for several weights that read the
            same input (q/k/v); the result is the same as without it.
    NVFP4's and ternary's scales are always fitted on the whole original weight (static groups, see STATIC_FIT);
    every block format's columns are quantized with the format's own rounding and scales.
    Returns:
        GPTQResult; `weight` is the dequantized solution, equal to fake-quantizing it with `scale`,
        `zero_point` and `g_idx`.
    Raises:
        ValueError: a non-finite weight or Hessian, shapes that do not match, an unsupported scheme, or
            act-order with dynamic groups on a GGUF grid (GGUF blocks cannot hold a g_idx).
    Example:
        >>> res = gptq_quantize(w, stats.hessian(), QuantSpec(bits=4, granularity="per_group", group_size=128))
        >>> layer.weight_quantizer.set_qparams(res.scale, res.zero_point, res.g_idx)
    """
    check_spec(spec, name, grids=True)
    W = weight.detach().float().clone()
    O, I = W.shape
    if hessian.shape != (I, I) or not _all_finite(hessian) or not _all_finite(W):
        raise ConfigError(f"{name}: GPTQ needs a finite weight and a finite [{I}, {I}] Hessian, "
                         f"got weight {tuple(W.shape)} and Hessian {tuple(hessian.shape)}")
    grouped = spec.granularity == "per_group"
    dynamic = grouped and not static_groups and spec.grid not in STATIC_FIT
    if dynamic and actorder and not holds_g_idx(spec):
        raise ConfigError(f"{name}: act-order with dynamic groups needs a g_idx, which the blocks of this format "
                         f"({spec.grid} grid) cannot hold; set static_groups=true or actorder=false")
    if factor is None:
        factor = hessian_factor(hessian, percdamp, actorder, name)
    if (factor.perm is not None) != actorder or factor.diag.shape != (I,):
        raise ValueError(f"{name}: the HessianFactor was computed for another act-order setting or width")
    perm, hinv, damp = factor.perm, factor.hinv, factor.damp
    group = spec.group_size if grouped else I
    n_groups = -(-I // group)
    observer = observer or build_observer(spec)
    scales = torch.zeros(O, n_groups, device=W.device)
    zeros = None if spec.symmetric else torch.zeros(O, n_groups, device=W.device)
    if not dynamic:
        imp = factor.diag if importance_fit else None
        _store(scales, zeros, 0, *fit_qparams(W, spec, observer, imp))
    if perm is not None:
        W = W[:, perm]
    # dynamic groups follow the solve order (g_idx maps them back); static ones stay contiguous groups
    col_group = (perm // group if perm is not None and not dynamic else torch.arange(I, device=W.device) // group).tolist()
    solve_diag = factor.diag if perm is None else factor.diag[perm]
    fit = _group_fitter(spec, observer, solve_diag if importance_fit else None, scales, zeros) if dynamic else None
    Q, loss = _solve(W, hinv, column_quantizer(spec), col_group, scales, zeros, fit, fit_span(spec), blocksize)
    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        if dynamic:
            g_idx = (torch.arange(I, device=W.device) // group)[invperm]
    return GPTQResult(Q.to(weight.dtype), _layout(scales, spec), _layout(zeros, spec), g_idx, loss, damp)


@dataclass
class HessianFactor:
    """What GPTQ derives from a Hessian alone, shared by the weights that read one input (q/k/v, gate/up)."""

    diag: torch.Tensor  # diag(H) with dead columns set to 1, original column order
    perm: torch.Tensor | None  # act-order column order
    hinv: torch.Tensor  # upper Cholesky factor of (H + damp I)^-1, permuted
    damp: float


@torch.no_grad()
def hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, actorder: bool = False,
                   name: str = "layer") -> HessianFactor:
    """The dead-column fix, act-order permutation and inverse Cholesky factor of a GPTQ Hessian.

    Example:
        >>> f = hessian_factor(stats.hessian(), 0.01); [gptq_quantize(m.weight, None, spec, factor=f) for m in qkv]
    """
    if not _all_finite(hessian):
        n = hessian.shape[-1]
        raise ConfigError(f"{name}: GPTQ needs a finite weight and a finite [{n}, {n}] Hessian, got a Hessian with "
                          "non-finite values")
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.diag(H).clone()
    perm = torch.argsort(diag, descending=True) if actorder else None
    if perm is not None:
        H = H[perm][:, perm]
    hinv, damp = inverse_cholesky(H, percdamp, name)
    return HessianFactor(diag, perm, hinv, damp)


def _all_finite(t: torch.Tensor) -> bool:
    """All elements finite; a sum is finite in one cheap pass unless something is not (or it overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _store(scales, zeros, g, s, z):
    """Write qparams (any of the spec layouts) into the [O, n_groups] tables from group `g` on."""
    s = s.reshape(s.shape[0], -1) if s.ndim else s.reshape(1, 1)
    n = s.shape[1]
    scales[:, g:g + n] = s
    if zeros is not None:
        zeros[:, g:g + n] = z.reshape(z.shape[0], -1) if z.ndim else z.reshape(1, 1)


def _layout(t: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor | None:
    if t is None:
        return None
    if spec.granularity == "per_group":
        return t.unsqueeze(-1).contiguous()
    if spec.granularity == "per_tensor":
        return t[0, 0].clone()
    return t.contiguous()  # per_channel [O, 1]


def _group_fitter(spec, observer, importance, scales, zeros):
    """fit(col, ahead): the qparams of the groups starting at column `col`, fitted on the error-updated
    columns `ahead`, stored in the tables. One group at a time; a K-quant super-block (256 columns) at once,
    since its sub-block scales share one fp16 super-scale."""
    def fit(col, ahead):
        imp = None if importance is None else importance[col:col + ahead.shape[1]]
        _store(scales, zeros, col // spec.group_size, *fit_qparams(ahead, spec, observer, imp))

    return fit


def _ahead(W, W1, err1, hinv, i1, i2, i, span):
    """Columns col..col+span of the weight as updated by every column quantized so far (col = i1 + i).

    Columns past the current lazy block have not yet received this block's updates: apply them here."""
    col, end = i1 + i, min(i1 + i + span, W.shape[1])
    inside = W1[:, i:min(end, i2) - i1]
    if end <= i2:
        return inside
    rest = W[:, i2:end] - err1[:, :i] @ hinv[i1:col, i2:end]
    return torch.cat([inside, rest], dim=1)


def _solve(W, hinv, quant, col_group, scales, zeros, fit, span, blocksize):
    """The lazy-batch column loop of GPTQ, on permuted columns; `fit` fills the tables for dynamic groups.

    Two levels of lazy updates: the rest of the weight once per `blocksize` columns (the reference's), and
    the rest of the block once per `INNER` columns, so the per-column rank-1 update touches at most INNER
    columns. Group fits happen at inner-block starts, where the block's columns are up to date."""
    O, I = W.shape
    Q = torch.empty_like(W)
    loss = 0.0
    inner = INNER if span % INNER == 0 and blocksize % INNER == 0 else blocksize
    for i1 in range(0, I, blocksize):
        i2 = min(i1 + blocksize, I)
        W1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.empty_like(W1)
        diag = torch.diagonal(hinv1).tolist()
        for j1 in range(0, i2 - i1, inner):
            j2 = min(j1 + inner, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if fit is not None and col % span == 0:
                    fit(col, _ahead(W, W1, err1, hinv, i1, i2, i, span))
                g = col_group[col]
                w = W1[:, i:i + 1]
                q = quant(w, scales[:, g:g + 1], None if zeros is None else zeros[:, g:g + 1])
                Q[:, col:col + 1] = q
                e = err1[:, i:i + 1]
                torch.sub(w, q, out=e).div_(diag[i])
                if i + 1 < j2:
                    W1[:, i + 1:j2].addmm_(e, hinv1[i:i + 1, i + 1:j2], alpha=-1)
            if j2 < i2 - i1:
                W1[:, j2:].addmm_(err1[:, j1:j2], hinv1[j1:j2, j2:], alpha=-1)
        loss += float(err1.square().sum()) / 2
        if i2 < I:
            W[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    return Q, loss


INNER = 32  # columns per inner lazy update
