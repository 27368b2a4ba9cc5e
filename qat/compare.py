"""One comparison across methods and schemes: perplexity, bits per weight, size, wall time, peak memory.

Two ways to run it (both end in `qat.results.write_results`: markdown, CSV and JSON plus a Pareto chart, PNG):
    * `run_sweep_job` is one job of the `qat-compare -m method=... quant=...` multirun: one method on one
      scheme, its row written to result.json (a failure is recorded as a failed row, not raised); the
      sweep's callback then gathers every job's row with `collect_sweep`.
    * `run_compare_job` (plain `qat-compare`) loops over a `methods` x `quants` list in one process.
Rows from other runs (a QAT training run's `result.json`, say) are merged with `load_results`.

Every row records its evaluation protocol (corpus, split, number of blocks, block size); rows measured
under different protocols are not comparable and are refused when merged (`check_protocols`).

Conventions: bits per weight counts the quantized linear weights with their scales and zero-points
(16 for the float baseline); model size counts every parameter once, quantized linears at their
storage bits and everything else at 16 bits (a bf16/fp16 deployment).
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from qat.io import atomic_path, atomic_write_bytes
from qat.results import (as_row, check_protocols, eval_protocol, failed_row, load_results,
                         to_json, write_results)
FLOAT_BITS = 16


def weight_bits(model: nn.Module) -> tuple[float, float]:
    """(bits per quantized linear weight, model size in MB) under the conventions of the module docstring.

    Example:
        >>> bpw, mb = weight_bits(qat.prepare(model, qat.load_recipe("w4a16_g128")))
    """
    from qat.control import summary

    qbits, qnumel, seen = 0.0, 0, set()
    for row in summary(model):
        module = model.get_submodule(row["module"])
        weight = getattr(module, "weight", None)
        if getattr(module, "weight_quantizer", None) is None and getattr(module, "qweight", None) is None:
            continue
        numel = math.prod(module.qweight.shape) if hasattr(module, "qweight") else weight.numel()
        qbits += row["bits_per_weight"] * numel
        qnumel += numel
        if isinstance(weight, nn.Parameter):
            seen.add(id(weight))
    total_bits = qbits
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total_bits += FLOAT_BITS * p.numel()
    bpw = qbits / qnumel if qnumel else float(FLOAT_BITS)
    return bpw, total_bits / 8 / 1e6


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak on GPU, sampled RSS growth on CPU (MB)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
        except (OSError, ValueError):
            return 0.0

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._base = self._rss_mb()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss_mb())
        self.peak_mb = (torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available()
                        else self._peak - self._base)


def run_one(load_model: Callable[[], nn.Module], method: str, quant: Any, calibration: Sequence[Any],
            eval_blocks: torch.Tensor | None, method_args: dict | None = None, progress: bool = False,
            batch_size: int = 4) -> tuple[dict, nn.Module]:
    """Quantize a fresh model with one method and scheme, and measure it.

    Args:
        load_model: returns a fresh float model.
        method: "fp" (no quantization) or a PTQ method name ("rtn", "gptq", "awq", "smoothquant").
        quant: a recipe name, mapping or QuantRecipe (ignored for "fp").
        calibration: calibration batches (LongTensor [B, T]).
        eval_blocks: LongTensor [N, T] for perplexity.
    Returns:
        (row with COLUMNS, the quantized model).
    Example:
        >>> row, model = run_one(lambda: load_model("tiny"), "gptq", "w4a16_g128", batches, test_blocks)
    """
    from qat.export.run import perplexity
    from qat.ptq import ptq_model

    model = load_model()
    start = time.perf_counter()
    with PeakMemory() as mem:
        if method != "fp":
            model = ptq_model(model, quant, {"name": method, **(method_args or {})}, calibration, progress=progress)
    wall = time.perf_counter() - start
    bpw, size = weight_bits(model) if method != "fp" else (float(FLOAT_BITS), weight_bits(model)[1])
    ppl = perplexity(model, eval_blocks, batch_size) if eval_blocks is not None else math.nan
    name = "fp" if method == "fp" else _quant_name(quant)
    row = {"method": method, "quant": name, "ppl": ppl, "bits_per_weight": bpw, "size_mb": size,
           "wall_s": wall, "peak_mem_mb": mem.peak_mb}
    return row, model


def _quant_name(quant: Any) -> str:
    if isinstance(quant, str):
        return quant
    return getattr(quant, "name", None) or dict(quant).get("name", "custom")


# -- jobs behind qat-ptq and qat-compare (plain dicts in, so tests need no Hydra) ---------------------
PTQ_KEYS = {"task_name", "seed", "paths", "model", "data", "quant", "method", "calibration", "eval", "save",
            "export", "progress"}
COMPARE_KEYS = {"task_name", "seed", "paths", "model", "data", "methods", "quants", "calibration", "eval",
                "results", "title", "method", "quant", "qat", "fail_on_error"}
CAL_KEYS, EVAL_KEYS = {"samples", "seq_len", "split"}, {"split", "max_blocks", "batch_size"}


def check_keys(owner: str, cfg: dict, allowed: set) -> None:
    """Refuse misspelt keys, naming them and the valid ones."""
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def model_context(model_cfg: dict) -> int | None:
    """max_position_embeddings of the configured model, read without loading weights (None: unknown)."""
    from qat.models import TINY_NAMES, check_model_source

    source = check_model_source(model_cfg["path"])
    if source in TINY_NAMES:
        return int(dict(model_cfg.get("tiny") or {}).get("max_position_embeddings", 256))
    path = Path(source).expanduser()
    if not path.exists():
        return None  # a hub name: checked when it loads
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
    return getattr(config, "max_position_embeddings", None)


def check_job(cfg: dict, calibrate: bool = True, method: Any = None) -> None:
    """What a qat-ptq / qat-compare job can check before loading anything: sizes, context, export format.

    Raises:
        ValueError: every problem found, each naming its key and the valid values.
        FileNotFoundError: the model path does not exist.
    Example:
        >>> check_job({**cfg, "calibration": {"samples": 0, "seq_len": 64}})  # ValueError: calibration.samples=0
    """
    from qat.export import FORMATS

    errors, sizes = [], {"data.block_size": cfg["data"].get("block_size")}
    if calibrate:
        cal = cfg.get("calibration") or {}
        for key in ("samples", "seq_len"):
            value = cal.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"calibration.{key}={value!r}; must be a positive integer")
        sizes["calibration.seq_len"] = cal.get("seq_len")
        errors += _enough_tokens(method, cal)
    context = model_context(cfg["model"])
    for key, value in sizes.items():
        if context is not None and isinstance(value, int) and value > context:
            errors.append(f"{key}={value} is larger than the context of model.path={cfg['model']['path']!r} "
                          f"(max_position_embeddings={context}); use {key}<={context}")
    if cfg.get("export") and cfg["export"] not in FORMATS:
        errors.append(f"export={cfg['export']!r}; choose from {list(FORMATS)} (or null)")
    if errors:
        raise ValueError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


def _enough_tokens(method: Any, cal: dict) -> list[str]:
    """A method with min_tokens (GPTQ, AWQ, SmoothQuant) refuses too few calibration tokens: say so now."""
    from qat.ptq.api import METHODS, method_config

    if not method or not all(isinstance(cal.get(k), int) for k in ("samples", "seq_len")):
        return []
    cfg = method_config(method)
    name = next(n for n, (cls, _, _) in METHODS.items() if isinstance(cfg, cls))
    have, need = cal["samples"] * cal["seq_len"], getattr(cfg, "min_tokens", 0)
    if not METHODS[name][2] or have >= need:
        return []
    return [f"calibration.samples x calibration.seq_len = {cal['samples']} x {cal['seq_len']} = {have} tokens; "
            f"method {name} needs min_tokens={need} (give more samples, or lower method.min_tokens)"]


def job_inputs(model_cfg: dict, data_cfg: dict, calibration: dict | None, eval_cfg: dict, batch_rows: int = 8):
    """(load_model callable, calibration batches, eval blocks) from the model / data config groups.

    Calibration sequences come from `calibration.split` of the corpus, grouped `batch_rows` to a batch
    (none when `calibration` is None: the float baseline needs none).
    Raises:
        ValueError: misspelt keys, or a corpus with fewer blocks than calibration.samples.
    """
    from qat.data import CorpusConfig, build_blocks, calibration_batches
    from qat.models import load_model

    check_keys("eval", eval_cfg, EVAL_KEYS)
    tiny = dict(model_cfg.get("tiny") or {})
    load = lambda: load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), **tiny)  # noqa: E731
    batches = []
    if calibration is not None:
        check_keys("calibration", calibration, CAL_KEYS)
        batches = calibration_batches(data_cfg, int(calibration["samples"]), int(calibration["seq_len"]),
                                      calibration.get("split", "train"), batch_rows)
    blocks = None
    if eval_cfg.get("split"):
        fields = {k: v for k, v in data_cfg.items() if k in CorpusConfig.__dataclass_fields__}
        fields["max_eval_blocks"] = eval_cfg.get("max_blocks")
        blocks = build_blocks(CorpusConfig(**fields), splits=[eval_cfg["split"]])[eval_cfg["split"]]
    return load, batches, blocks


def _protocol(cfg: dict, blocks: torch.Tensor | None) -> dict | None:
    return None if blocks is None else eval_protocol(cfg["data"]["path"], cfg["eval"]["split"], blocks)


def run_ptq_job(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """The qat-ptq run: load, quantize with one method, evaluate, save (state dict, result.json, export).

    Returns:
        the result row (COLUMNS) plus the eval protocol, the method options and where things were written.
    Example:
        >>> run_ptq_job(OmegaConf.to_container(cfg, resolve=True), "outputs/ptq/run")
    """
    from qat.ptq import method_config

    check_keys("config", cfg, PTQ_KEYS | {"hydra"})
    torch.manual_seed(int(cfg.get("seed", 0)))
    method = dict(cfg["method"])
    method_config(method)  # validate before loading anything
    check_job(cfg, method=method)
    load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
    row, model = run_one(load, method.pop("name"), cfg["quant"], batches, blocks, method,
                         progress=bool(cfg.get("progress", True)), batch_size=cfg["eval"].get("batch_size", 4))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**row, "protocol": _protocol(cfg, blocks), "model": cfg["model"]["path"], "options": model.qat_ptq}
    if cfg.get("save", True):
        result["checkpoint"] = str(save_state(model, out / "model.pt"))
    if cfg.get("export"):
        from qat.export import export

        suffix = ".gguf" if cfg["export"] == "gguf" else ""  # gguf is one file, the others folders
        result["export"] = str(export(model, out / f"export_{cfg['export']}{suffix}", cfg["export"]))
    atomic_write_bytes(out / "result.json", to_json(result))
    return result


def save_state(model: nn.Module, path: Path) -> Path:
    """The prepared model's state dict (pinned qparams, g_idx and quantizer flags included), atomically.

    A torch file loadable with torch.load(weights_only=True); `qat-export checkpoint=... quant=...` and
    QAT training load it into a model prepared with the same recipe.
    """
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def run_compare_job(cfg: dict, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The qat-compare run: every method x scheme, plus rows from `results` files, into one table and plot."""
    from qat.ptq import method_config

    check_keys("config", cfg, COMPARE_KEYS | {"hydra"})
    torch.manual_seed(int(cfg.get("seed", 0)))
    methods = [_method_entry(m) for m in cfg["methods"]]
    extra = load_results(cfg.get("results") or [])
    if methods:
        if any(opts["name"] != "fp" for _, opts in methods):
            _check_quants(cfg["quants"])
        for _, opts in methods:
            check_job(cfg, calibrate=opts["name"] != "fp", method=None if opts["name"] == "fp" else opts)
        load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
        if extra:  # merged rows measured otherwise are refused now, not after every method has run
            check_protocols([{"method": "", "quant": "", "protocol": _protocol(cfg, blocks),
                              "source": "this run's data / eval settings"}, *extra])
    rows = []
    for label, opts in methods:
        if opts["name"] != "fp":
            method_config(opts)
        for quant in ([None] if opts["name"] == "fp" else cfg["quants"]):
            args = {k: v for k, v in opts.items() if k != "name"}
            row, _ = run_one(load, opts["name"], quant, batches, blocks, args,
                             batch_size=cfg["eval"].get("batch_size", 4))
            row.update(method=label, protocol=_protocol(cfg, blocks))
            log(f"{label:12s} {row['quant']:16s} ppl {row['ppl']:.3f}  {row['bits_per_weight']:.2f} bpw  "
                f"{row['wall_s']:.1f} s")
            rows.append(row)
    return write_results(rows + extra, out_dir, compare_title(cfg))


def _check_quants(quants: Sequence[Any]) -> None:
    """Every scheme of a single-process comparison must load before the first row is computed."""
    import qat
    from qat.recipes import load_recipe

    errors = []
    for quant in quants:
        try:
            load_recipe(quant) if isinstance(quant, str) else qat.QuantRecipe.from_dict(quant)
        except (FileNotFoundError, ValueError, TypeError) as err:
            errors.append(f"quants entry {quant!r}: {err}")
    if errors:
        raise ValueError("bad config:\n" + "\n".join(f"  - {e}" for e in errors))


def compare_title(cfg: dict) -> str:
    return cfg.get("title") or f"{cfg['model']['path']} on {Path(str(cfg['data']['path'])).name}"


def _method_entry(entry: Any) -> tuple[str, dict]:
    opts = {"name": entry} if isinstance(entry, str) else dict(entry)
    if "name" not in opts:
        raise ValueError(f"methods entry {entry!r}: give a name (fp, rtn, gptq, awq, smoothquant)")
    label = opts.pop("label", opts["name"])
    return label, opts


# -- one job of the qat-compare multirun ---------------------------------------------------------------
def method_label(method: dict) -> str:
    """The row's method name: `label` if given, "qat+gptq" for PTQ-initialised QAT, else the method name."""
    if method.get("label"):
        return str(method["label"])
    init = method.get("init")
    return f"{method['name']}+{init}" if method.get("name") == "qat" and init else str(method["name"])


def run_sweep_job(cfg: dict, out_dir: str | os.PathLike, run_qat: Callable[[dict, Path], dict] | None = None,
                  log: Callable[[str], None] = print) -> dict:
    """One (method, scheme) job of `qat-compare -m`: its row (with eval protocol) written to out_dir/result.json.

    A job that raises is not re-raised: its row says status "failed" with the error, so the other jobs of
    the sweep still run and the table shows what failed (Hydra's multirun would stop at the first error).

    Args:
        cfg: the composed compare config with a `method` node (fp, a PTQ method, or qat) and a `quant` node.
        out_dir: the job's directory (the sweep subdir).
        run_qat: runs a QAT method (`qat.cli.compare.run_qat_job`: composes configs/train.yaml).
    Returns:
        the row written.
    Example:
        >>> run_sweep_job({**cfg, "method": {"name": "gptq"}, "quant": load_recipe("w4a16_g128").to_dict()}, "out/0")
    """
    import traceback

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = dict(cfg.get("method") or {"name": "?"})
    quant = "fp" if method.get("name") == "fp" else _quant_name(cfg.get("quant") or "none")
    try:
        row = _sweep_row(cfg, out, run_qat)
    except Exception as err:  # noqa: BLE001 - recorded in the table, the sweep goes on
        log(f"[qat-compare] job {method_label(method)} / {quant} failed:\n{traceback.format_exc()}")
        row = failed_row(method_label(method), quant, err)
    row = {**row, "model": cfg["model"]["path"]}
    atomic_write_bytes(out / "result.json", to_json(row))
    return row


def _sweep_row(cfg: dict, out: Path, run_qat) -> dict:
    from qat.ptq import method_config

    check_keys("config", cfg, COMPARE_KEYS | {"hydra"})
    torch.manual_seed(int(cfg.get("seed", 0)))
    opts = {k: v for k, v in cfg["method"].items() if k != "label"}
    name = opts["name"]
    if name != "fp" and not cfg.get("quant"):
        raise ValueError(f"method {name} needs a scheme: quant=<configs/quant name>, e.g. quant=w4a16_g128")
    if name == "qat":
        if run_qat is None:
            raise ValueError("method qat runs through qat-compare (qat.cli.compare.run_qat_job)")
        return {**run_qat(cfg, out), "method": method_label(cfg["method"])}
    if name != "fp":
        method_config(opts)  # validate before loading anything
    check_job(cfg, calibrate=name != "fp", method=None if name == "fp" else opts)
    load, batches, blocks = job_inputs(cfg["model"], cfg["data"], None if name == "fp" else cfg["calibration"],
                                       cfg["eval"])
    protocol = _protocol(cfg, blocks)
    if name == "fp" and (done := _done_fp_row(out, protocol, cfg["model"]["path"])):
        return done  # one float baseline per sweep: the jobs of the other schemes reuse it
    row, _ = run_one(load, name, cfg.get("quant"), batches, blocks, {k: v for k, v in opts.items() if k != "name"},
                     progress=False, batch_size=cfg["eval"].get("batch_size", 4))
    return {**row, "method": method_label(cfg["method"]), "status": "ok", "error": "", "protocol": protocol}


def _done_fp_row(out: Path, protocol: dict | None, model: str) -> dict | None:
    for path in sorted(out.parent.glob("*/result.json")):
        if path.parent == out:
            continue
        row = json.loads(path.read_text())
        if (row.get("method") == "fp" and row.get("status") == "ok" and row.get("protocol") == protocol
                and row.get("model") == model and not row.get("reused")):
            return {**row, "reused": str(path)}
    return None


def collect_sweep(sweep_dir: str | os.PathLike) -> list[dict]:
    """Every job's row of a qat-compare multirun (sweep_dir/<job>/result.json), in job order.

    Float-baseline rows reused by other jobs appear once. Protocols are checked by `write_results`.
    Raises:
        ValueError: a sweep without any result.json, or a row lacking required keys (naming the file).
    """
    def job_order(path: Path):
        head = path.parent.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 1 << 30, path.parent.name)

    paths = sorted(Path(sweep_dir).glob("*/result.json"), key=job_order)
    if not paths:
        raise ValueError(f"{sweep_dir}: no job wrote a result.json (did every job crash before starting?)")
    rows, fp_seen = [], set()
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("reused"):
            continue
        row = as_row(data, path)
        if row["method"] == "fp" and row["status"] == "ok":  # jobs run in parallel may each measure it
            key = json.dumps(row["protocol"], sort_keys=True)
            if key in fp_seen:
                continue
            fp_seen.add(key)
        rows.append(row)
    return rows
