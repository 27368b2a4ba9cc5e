"""The qat-sensitivity job: score a model's modules under a menu of formats (mode=analyze), or re-solve saved
scores for a new budget without any model (mode=solve); write the layout as a recipe, GGUF tensor types,
llama-quantize arguments and a report. `quant=` (optional) is the base recipe: its input / KV schemes, rotations
and ignore list are the scoring context and the rest of the written recipe (`qat.sensitivity.base`).

Files written in the run folder:
    scores.json           the scores and costs (mode=analyze): `qat-sensitivity mode=solve scores=<it>` re-solves
    quant/<name>.yaml     the chosen layout as a quant recipe: qat-train / qat-ptq / qat-export
                          quant=<run folder>/quant/<name>.yaml; qat.load_recipe(<path>)
    layout.json           the choice per module, bits, bits per weight, summed score, budget
    report.md, report.png the table of scores per module and candidate with the choice; the chart (matplotlib)
    gguf_types.json, tensor_types.txt   with a GGUF menu: {tensor: type}; llama-quantize --tensor-type-file
    model.gguf            with gguf.export=true: the model quantized (RTN) to the layout and written as GGUF
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from qat.arch import get_arch
from qat.data import SPLITS, calibration_batches
from qat.errors import ConfigError
from qat.export import MIXES
from qat.export.ggml_blocks import BLOCK
from qat.io import atomic_write_bytes, write_json
from qat.jobs.config import as_bool, as_count, check_keys
from qat.jobs.export import run_export
from qat.jobs.measure import PeakMemory
from qat.jobs.placement import default_device, device_errors, place, resolve_device
from qat.models import check_tokenizer_source, load_model, tokenizer_location
from qat.sensitivity import (ScoreTable, budget_bits, build_menu, build_scorer, check_base, gguf_tensor_types,
                             llama_quantize_args, markdown_table, plot_report, score_model, solve, tie_groups,
                             to_recipe, write_recipe)
from qat.transform import QuantRecipe

MODES = ("analyze", "solve")


def budget_of(cfg: dict) -> tuple[Any, Any]:
    """(bits_per_weight, bytes) of `cfg.budget`: a `budget.bytes` given replaces the default bits per weight."""
    budget = dict(cfg.get("budget") or {})
    if budget.get("bytes") is not None:
        return None, budget["bytes"]
    return budget.get("bits_per_weight"), None


# the scores were measured with them (and on `device`)
SOLVE_UNUSED = ("model", "data", "menu", "method", "targets", "float_bits", "device")


def check_sensitivity(cfg: dict, given: tuple[str, ...] = ()) -> None:
    """Everything a qat-sensitivity config can be refused for before a model loads: keys, mode, scores file,
    budget, ties, menu, method, calibration sizes, flags, the base recipe (`quant`: valid, and no conflict with
    the menu: `qat.sensitivity.check_base`); each naming its key.

    `given`: the top-level keys set on the command line (mode=solve refuses those it cannot use, `SOLVE_UNUSED`).

    Raises:
        ConfigError: the first bad value (the menu lists every bad entry).
    """
    check_keys(cfg, "sensitivity")
    if cfg.get("mode") not in MODES:
        raise ConfigError(f"mode={cfg.get('mode')!r}; choose from {list(MODES)}")
    if cfg["mode"] == "solve" and not cfg.get("scores"):
        raise ConfigError("mode=solve needs scores=<the scores.json of an earlier qat-sensitivity run>")
    scores = Path(str(cfg.get("scores") or "")).expanduser()
    if cfg["mode"] == "solve" and not scores.is_file():
        problem = "a directory, not a file" if scores.is_dir() else "no such file"
        raise ConfigError(f"scores={cfg['scores']}: {problem}; give the scores.json an earlier qat-sensitivity "
                          "run (mode=analyze) wrote in its output folder")
    exporting = as_bool((cfg.get("gguf") or {}).get("export", False), "gguf.export")
    unused = [k for k in SOLVE_UNUSED if k in given and not (k == "model" and exporting)]  # the export loads it
    unused = unused if cfg["mode"] == "solve" else []
    if unused:
        raise ConfigError(f"{', '.join(k + '=' for k in unused)} read by mode=analyze only: mode=solve re-solves "
                          "scores.json as it was measured (its menu, method, model and modules are recorded there); "
                          "drop them, or run mode=analyze")
    if cfg["mode"] == "analyze" and cfg.get("scores"):
        raise ConfigError(f"scores={cfg['scores']!r} is read by mode=solve only; drop it or set mode=solve")
    if cfg["mode"] == "solve" and cfg.get("quant") is not None:
        raise ConfigError(f"quant={(cfg['quant'] or {}).get('name')!r} is read by mode=analyze only: a re-solve "
                          "writes the base recipe the scores were measured with (recorded in scores.json); drop quant=")
    bits_check = ScoreTable([], {})  # the budget's form, checked on an empty table
    budget_bits(bits_check, *budget_of(cfg))
    tie_groups([], cfg.get("ties") or [])
    if cfg.get("candidates") is not None and not (isinstance(cfg["candidates"], list)
                                                  and all(isinstance(c, str) for c in cfg["candidates"])):
        raise ConfigError(f"candidates={cfg['candidates']!r}; give a list of menu names (or null: all)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(cfg.get("name") or "auto")):
        raise ConfigError(f"name={cfg.get('name')!r}; the recipe's name (and file name): letters, digits, _ . -")
    for key in ("plot",):
        as_bool(cfg.get(key, True), key)
    as_count(cfg.get("seed", 0), "seed", 0)
    as_bool((cfg.get("gguf") or {}).get("export", False), "gguf.export")
    rest = (cfg.get("gguf") or {}).get("rest", "Q8_0")
    if exporting and rest not in BLOCK and rest not in MIXES:  # qat-export's gguf_type, under this app's key
        raise ConfigError(f"gguf.rest={rest!r}; choose a GGUF type {sorted(BLOCK)} or a mix {sorted(MIXES)}")
    if cfg["mode"] == "solve" and exporting:  # the base the scores were measured with, before anything is written
        check_gguf_base(ScoreTable.load(cfg["scores"]).base, solving=True)
    if cfg["mode"] == "analyze":
        menu = build_menu(cfg.get("menu") or {}, cfg.get("float_bits", 16))
        unknown = sorted(set(cfg.get("candidates") or []) - set(menu))
        if unknown:
            raise ConfigError(f"candidates={unknown} are not in the menu; choose from {sorted(menu)}")
        used = [menu[n] for n in (cfg.get("candidates") or sorted(menu))]
        not_gguf = sorted(c.name for c in used if c.gguf_type is None)
        if as_bool((cfg.get("gguf") or {}).get("export", False), "gguf.export") and not_gguf:
            raise ConfigError(f"gguf.export=true needs every candidate to be a GGUF type (menu=gguf); "
                              f"{not_gguf} are not")
        build_scorer(cfg.get("method") or {})
        if cfg.get("quant") is not None:
            check_base(QuantRecipe.from_dict(cfg["quant"]), {c.name: c for c in used})
            if exporting:
                check_gguf_base(cfg["quant"])
        if errors := device_errors(cfg.get("device", default_device())):
            raise ConfigError(errors[0])
        cal = cfg.get("calibration") or {}
        for key in ("samples", "seq_len", "batch_size"):
            as_count(cal.get(key), f"calibration.{key}")
        if cal.get("split", "train") not in SPLITS:
            raise ConfigError(f"calibration.split={cal.get('split')!r}; choose from {list(SPLITS)}")
        # a folder without tokenizer files: transformers would build an empty tokenizer (no calibration text)
        check_tokenizer_source(tokenizer_location(cfg.get("data"), (cfg.get("model") or {}).get("path", "tiny")))


def check_gguf_base(base: Any, solving: bool = False) -> None:
    """gguf.export=true writes only weights: refuse a base recipe that quantizes activations (its `input` scheme,
    or an override's), whose scores and layout assumed quantized inputs that a GGUF file cannot hold (llama.cpp
    quantizes activations its own way). KV-cache schemes pass: llama.cpp's --cache-type-k/-v set them at run time.

    Raises:
        ConfigError: naming the recipe and what to do.
    """
    if base is None:
        return
    recipe = QuantRecipe.from_dict(base)
    inputs = [recipe.base.input] + [o.apply(recipe.base, f"quant.overrides[{i}]").input
                                    for i, o in enumerate(recipe.overrides)]
    schemes = sorted({spec.describe() for spec in inputs if spec is not None})
    if schemes:
        raise ConfigError(f"gguf.export=true: base recipe quant={recipe.name!r} quantizes activations ({', '.join(schemes)}), "
                          "which a GGUF file cannot hold (llama.cpp quantizes them its own way), so the file would "
                          "not compute what was scored; " + ("its scores.json was measured with it: re-analyze with "
                          if solving else "use ") + "a weight-only base recipe (or a KV-cache one), or drop "
                          "gguf.export and export the recipe in a format that stores activation schemes "
                          "(qat-export format=compressed_tensors or native)")


def default_name(bits_per_weight: float, base: dict | None) -> str:
    """The written recipe's name when `name=` is not given: `auto_<bpw>bpw`, with the base recipe's name
    (`auto_w4a8_kv8_4.50bpw`), so that two runs' recipes do not share a name; the same for a re-solve of the
    same scores and budget."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str((base or {}).get("name") or "")) if base else ""
    return f"auto_{stem + '_' if stem else ''}{bits_per_weight:.2f}bpw"


def gguf_names_of(model) -> Any:
    """module name -> its GGUF tensor names, or None for a model with no GGUF architecture adapter."""
    try:
        arch = get_arch(model)
    except ValueError:
        return None
    return lambda name: [part[0] for part in arch.gguf_parts(f"{name}.weight", model.config)]


def analyze(cfg: dict) -> ScoreTable:
    """Load the model and calibration batches of `cfg` and score it (see `qat.sensitivity.score_model`)."""
    model_cfg, cal = cfg["model"], cfg["calibration"]
    menu = build_menu(cfg["menu"], cfg.get("float_bits", 16))
    model = load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), **dict(model_cfg.get("tiny") or {}))
    device = resolve_device(cfg.get("device"))
    model = place(model, device)  # the scorers move each batch to the model's device
    batches = calibration_batches(cfg["data"], cal["samples"], cal["seq_len"], cal.get("split", "train"),
                                  cal["batch_size"])
    start = time.perf_counter()
    with PeakMemory(device=device) as mem:
        table = score_model(model, menu, batches, cfg["method"], cfg["targets"], cfg["ignore"], gguf_names_of(model),
                            {"model": str(model_cfg["path"]), "data": str(cfg["data"].get("path")),
                             "calibration": dict(cal)}, base=cfg.get("quant"))
    table.meta.update(wall_s=round(time.perf_counter() - start, 2), peak_mem_mb=round(mem.peak_mb, 1))
    return table


def run_sensitivity_job(cfg: dict, out_dir: str, given: tuple[str, ...] = ()) -> dict:
    """qat-sensitivity: analyze (score + solve) or solve (from scores=), then write the outputs to `out_dir`.
    `given`: the top-level keys the command line set (`check_sensitivity`).

    Returns:
        {mode, scores, bits_per_weight, bits, budget_bits, score, recipe, files...} (what was written).
    Raises:
        ConfigError: what `check_sensitivity` refuses, an infeasible budget, tied modules with no common candidate.
    Example:
        >>> run_sensitivity_job(OmegaConf.to_container(cfg, resolve=True), "outputs/sensitivity/run")
    """
    check_sensitivity(cfg, given)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"mode": cfg["mode"]}
    if cfg["mode"] == "solve":
        table = ScoreTable.load(Path(cfg["scores"]).expanduser())
        result["scores"] = str(cfg["scores"])
    else:
        table = analyze(cfg)
        result["scores"] = str(table.save(out / "scores.json"))
        result.update(analysis_wall_s=table.meta["wall_s"], analysis_peak_mem_mb=table.meta["peak_mem_mb"])
    start = time.perf_counter()
    sol = solve(table, budget_bits(table, *budget_of(cfg)), cfg.get("ties") or [],
                cfg.get("candidates"))
    result.update(solve_s=round(time.perf_counter() - start, 3), bits_per_weight=round(sol.bits_per_weight, 6),
                  bits=sol.bits, budget_bits=sol.budget_bits, params=sol.params, score=sol.score)
    recipe = to_recipe(sol, table, name=str(cfg.get("name") or default_name(sol.bits_per_weight, table.base)),
                       ignore=tuple(cfg.get("ignore") or ()))
    QuantRecipe.from_dict(recipe)  # what is written loads
    result["recipe"] = str(write_recipe(recipe, out / "quant" / f"{recipe['name']}.yaml"))
    result["use"] = f"quant={Path(result['recipe']).resolve()}"
    write_json(out / "layout.json", {**result, "choice": sol.choice})
    report = markdown_table(sol, table)
    atomic_write_bytes(out / "report.md", (report + "\n").encode())
    print(report)
    if as_bool(cfg.get("plot", True), "plot"):
        png = plot_report(sol, table, out / "report.png")
        result["plot"] = str(png) if png else "skipped: matplotlib is not installed"
    result.update(gguf_outputs(cfg, sol, table, out, Path(result["recipe"])))
    return result


def gguf_outputs(cfg: dict, sol, table: ScoreTable, out: Path, recipe: Path) -> dict:
    """GGUF tensor types and llama-quantize's --tensor-type-file when every choice is a GGUF type; the GGUF file
    itself with gguf.export=true."""
    gguf_cfg = dict(cfg.get("gguf") or {})
    chosen = {table.candidates[c].get("gguf_type") for c in sol.choice.values()}
    if None in chosen or not all(m.gguf for m in table.modules):
        if as_bool(gguf_cfg.get("export", False), "gguf.export"):
            raise ConfigError("gguf.export=true needs a layout of GGUF types (menu=gguf) on a model with a GGUF "
                              f"architecture; the layout holds {sorted(set(sol.choice.values()))}")
        return {}
    types = gguf_tensor_types(sol, table)
    write_json(out / "gguf_types.json", types)
    args = llama_quantize_args(types)
    atomic_write_bytes(out / "tensor_types.txt", ("\n".join(args[1::2]) + "\n").encode())
    res = {"gguf_types": str(out / "gguf_types.json"), "llama_quantize": "llama-quantize --tensor-type-file "
           f"{out / 'tensor_types.txt'} <model-f16.gguf> <out.gguf> {gguf_cfg.get('rest', 'Q8_0')}"}
    if as_bool(gguf_cfg.get("export", False), "gguf.export"):
        model = cfg["model"]
        scored = table.meta.get("model")
        if scored is not None and str(model["path"]) != str(scored):  # mode=solve: the model is not in scores.json
            raise ConfigError(f"gguf.export=true: scores.json was measured on model {scored!r}, but model.path is "
                              f"{str(model['path'])!r}; give model=/model.path= (and model.tiny.*) of the scored model")
        res["gguf"] = run_export(model["path"], str(out / "model.gguf"), format="gguf",
                                 gguf_type=gguf_cfg.get("rest", "Q8_0"), quant=str(recipe),
                                 dtype=model.get("dtype", "float32"), tiny=model.get("tiny"), overwrite=True)
    return res
