"""What a solved layout becomes: a recipe for configs/quant (per-module overrides), GGUF per-tensor types and
`llama-quantize --tensor-type` arguments, and a report (a table, a chart).

    recipe = to_recipe(solution, table, name="auto_4p5")         # a mapping QuantRecipe.from_dict accepts
    types = gguf_tensor_types(solution, table)                     # {"blk.0.attn_q.weight": "Q4_K", ...}
    args = llama_quantize_args(types)                              # ["--tensor-type", "blk\\.0\\.attn_q\\.weight=q4_k", ...]
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from qat.errors import ConfigError
from qat.io import atomic_write_bytes
from qat.sensitivity.scores import ScoreTable
from qat.sensitivity.solver import Solution
from qat.spec import QuantSpec


def to_recipe(solution: Solution, table: ScoreTable, name: str = "auto", ignore: tuple[str, ...] = ("lm_head",),
              description: str = "") -> dict[str, Any]:
    """A recipe mapping (the layout of configs/quant/*.yaml) that quantizes each module to its chosen candidate:
    the most common candidate as the base weight scheme, one override per other candidate naming its modules
    exactly, modules kept in float added to `ignore`. `qat.load_recipe` / `qat.prepare` / qat-train / qat-ptq /
    qat-export take it as it is. A table scored on a base recipe (`table.base`) gives that recipe (its targets,
    ignore list, input / KV schemes, rotations, overrides and weight scheme, the default of modules not scored)
    with one weight override per chosen candidate naming its modules; `ignore` is then unused.

    Raises:
        ConfigError: a layout that keeps every module in float (nothing to quantize).
    """
    schemes = {c: v.get("weight") for c, v in table.candidates.items()}
    if table.base is not None:
        return _on_base(solution, table, schemes, name, description)
    quantized = {n: c for n, c in solution.choice.items() if schemes[c] is not None}
    if not quantized:
        raise ConfigError("the chosen layout keeps every module in float: there is no recipe to write")
    counts = Counter(quantized.values())
    base = max(counts, key=lambda c: (counts[c], -list(table.candidates).index(c)))
    overrides = []
    for cand in table.candidates:
        names = [n for n, c in quantized.items() if c == cand]
        if cand != base and names:
            overrides.append({"targets": names, "weight": dict(schemes[cand])})
    floats = [n for n, c in solution.choice.items() if schemes[c] is None]
    return {"name": name, "description": description or f"auto-mixed by qat-sensitivity ({table.method}): "
            f"{solution.bits_per_weight:.4f} bits per weight of the scored modules",
            "targets": sorted(set(solution.choice)), "ignore": [*ignore, *floats],
            "weight": dict(schemes[base]), "input": None, "kv_cache": None, "overrides": overrides}


def _on_base(solution: Solution, table: ScoreTable, schemes: dict[str, Any], name: str,
             description: str) -> dict[str, Any]:
    """`to_recipe` of a table scored on a base recipe: the base with the solver's weight per scored module (a
    float choice turns the weight off there, keeping the module's input scheme)."""
    base = dict(table.base)
    overrides = [_ordered(o) for o in base.get("overrides") or []]
    for cand in table.candidates:
        names = [n for n, c in solution.choice.items() if c == cand]
        if names and (schemes[cand] is not None or base.get("weight") is not None):
            weight = None if schemes[cand] is None else QuantSpec.from_dict(schemes[cand]).to_dict()  # field order
            overrides.append({"targets": names, "weight": weight})
    if base.get("weight") is None and base.get("input") is None and base.get("kv_cache") is None \
            and not any(o.get("weight") for o in overrides):
        raise ConfigError("the chosen layout keeps every module in float: there is no recipe to write")
    return {**base, "name": name, "description": description or f"auto-mixed by qat-sensitivity ({table.method}) "
            f"on {base.get('name')!r}: {solution.bits_per_weight:.4f} bits per weight of the scored modules",
            "overrides": overrides}


def _ordered(override: dict[str, Any]) -> dict[str, Any]:
    """A base override with its (partial) scheme mappings in QuantSpec's field order: the analysis holds them as
    the recipe gave them, a re-solve as scores.json's sorted keys; both write the same bytes."""
    fields = [f.name for f in dataclasses.fields(QuantSpec)]

    def rank(key: str) -> tuple[int, str]:
        return (fields.index(key) if key in fields else len(fields), key)
    return {k: dict(sorted(v.items(), key=lambda kv: rank(kv[0]))) if isinstance(v, dict) else v
            for k, v in override.items()}


def write_recipe(recipe: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a recipe mapping as YAML, atomically."""
    text = ("# written by qat-sensitivity: quant=<this file> on qat-train / qat-ptq / qat-export / qat-eval / qat-compare,\n"
            "# qat.load_recipe(<this file>), or copy it to configs/quant/\n")
    text += yaml.safe_dump(recipe, sort_keys=False, width=120)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), text.encode())
    return Path(path)


def gguf_tensor_types(solution: Solution, table: ScoreTable) -> dict[str, str]:
    """{GGUF tensor name: type} of the chosen layout, for modules whose candidate is a GGUF type.

    Raises:
        ConfigError: a chosen candidate with no GGUF type (an int scheme, say), or a table with no GGUF names.
    """
    types, bad = {}, []
    by_name = {m.name: m for m in table.modules}
    for name, cand in solution.choice.items():
        gguf = table.candidates[cand].get("gguf_type")
        if gguf is None or not by_name[name].gguf:
            bad.append(f"{name} ({cand}{'' if gguf else ': no GGUF type'})")
            continue
        for tensor in by_name[name].gguf:
            types[tensor] = gguf
    if bad:
        raise ConfigError("no GGUF tensor type for: " + ", ".join(bad[:6]) + (", ..." if len(bad) > 6 else "")
                          + "; use a GGUF menu (menu=gguf) on a model with a GGUF architecture")
    return types


def llama_quantize_args(types: dict[str, str]) -> list[str]:
    """`llama-quantize` arguments giving each tensor its type (`--tensor-type <regex>=<type>`, anchored).

    Example:
        >>> llama_quantize_args({"blk.0.attn_q.weight": "Q4_K"})
        ['--tensor-type', '^blk\\\\.0\\\\.attn_q\\\\.weight$=q4_k']
    """
    out = []
    for tensor, t in types.items():
        out += ["--tensor-type", f"^{re.escape(tensor)}$={t.lower()}"]
    return out


def report_rows(solution: Solution, table: ScoreTable) -> list[dict[str, Any]]:
    """One row per module: name, params, every candidate's score, the choice and its bits per weight."""
    rows = []
    for m in table.modules:
        c = solution.choice[m.name]
        rows.append({"module": m.name, "params": m.params, **{k: m.scores.get(k) for k in table.candidates},
                     "chosen": c, "bpw": m.bits[c] / m.params})
    return rows


def markdown_table(solution: Solution, table: ScoreTable) -> str:
    """The report as a markdown table (scores to 3 significant digits; '-' where a candidate does not fit),
    with a closing line of the total bits per weight, score and budget."""
    cands = list(table.candidates)
    lines = ["| module | params | " + " | ".join(cands) + " | chosen | bpw |",
             "|---" * (len(cands) + 4) + "|"]
    for r in report_rows(solution, table):
        cells = ["-" if r[c] is None else f"{r[c]:.3g}" for c in cands]
        lines.append(f"| {r['module']} | {r['params']} | " + " | ".join(cells) + f" | **{r['chosen']}** | {r['bpw']:.3f} |")
    lines.append("")
    lines.append(f"total: {solution.bits_per_weight:.4f} bits per weight ({solution.bits} of {solution.budget_bits} "
                 f"budget bits), summed score {solution.score:.4g}, {len(table.modules)} modules, method {table.method}")
    if table.base is not None:
        base = qat_recipe_line(table.base)
        lines.append(f"scored on the base recipe {base}")
    return "\n".join(lines)


def qat_recipe_line(base: dict[str, Any]) -> str:
    """A base recipe in one line: its name, non-weight schemes and per-module overrides (count, the first three's
    targets and roles), e.g. "'w4a8_kv8' (input int8 sym per_token dyn; kv_cache int8 sym per_token dyn)"."""
    parts = [f"{role} {QuantSpec.from_dict(base[role]).describe()}" for role in ("input", "kv_cache") if base.get(role)]
    if base.get("rotations"):
        parts.append("rotations " + ", ".join(f"{k}={v}" for k, v in base["rotations"].items() if v))
    overrides = base.get("overrides") or []
    if overrides:  # per-module schemes of the base (input / KV only: check_base refuses weight ones)
        listed = "; ".join(f"{', '.join(o.get('targets') or [])}: {', '.join(k for k in o if k != 'targets')}"
                           for o in overrides[:3])
        parts.append(f"{len(overrides)} per-module override(s): {listed}{'; ...' if len(overrides) > 3 else ''}")
    return f"{base.get('name')!r} ({'; '.join(parts) or 'weights only'})"


def plot_report(solution: Solution, table: ScoreTable, path: str | os.PathLike) -> Path | None:
    """A chart of log10 score per module and candidate (heat map) with the chosen candidate marked; written
    atomically as PNG. Returns None (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib  # optional: a report without a chart is still a report
    except ImportError:
        return None
    import math

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = list(table.candidates)
    grid = [[math.log10(m.scores[c]) if m.scores.get(c, 0) > 0 else math.nan for m in table.modules] for c in cands]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(table.modules) + 2), 0.45 * len(cands) + 2))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    for i, m in enumerate(table.modules):
        ax.plot(i, cands.index(solution.choice[m.name]), "r.", markersize=5)
    ax.set_yticks(range(len(cands)), cands)
    step = max(1, len(table.modules) // 40)
    ax.set_xticks(range(0, len(table.modules), step),
                  [table.modules[i].name.replace("model.layers.", "") for i in range(0, len(table.modules), step)],
                  rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="log10 score")
    ax.set_title(f"{table.method} scores; red: chosen ({solution.bits_per_weight:.3f} bpw)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
