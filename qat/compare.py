"""One comparison across methods and schemes: perplexity, bits per weight, size, wall time, peak memory.

`run_compare_job` quantizes a fresh copy of the model per (method, scheme), evaluates it, and `write_results`
writes the table as markdown, CSV and JSON plus a Pareto chart (perplexity against bits per weight, PNG).
Rows from other runs (a QAT training run's `result.json`, say) are merged with `load_results`.

Conventions: bits per weight counts the quantized linear weights with their scales and zero-points
(16 for the float baseline); model size counts every parameter once, quantized linears at their
storage bits and everything else at 16 bits (a bf16/fp16 deployment).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

COLUMNS = ("method", "quant", "ppl", "bits_per_weight", "size_mb", "wall_s", "peak_mem_mb")
FLOAT_BITS = 16


def weight_bits(model: nn.Module) -> tuple[float, float]:
    """(bits per quantized linear weight, model size in MB) under the conventions of the module docstring.

    Example:
        >>> bpw, mb = weight_bits(qat.prepare(model, "w4a16_g128"))
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


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows from result JSON files (one row, or a list of rows, each with at least method, quant, ppl).

    Paths may be glob patterns (`outputs/ptq/multirun/**/result.json` collects a `qat-ptq -m` sweep).
    Raises:
        ValueError: a file without the required keys, naming it.
    """
    import glob

    rows = []
    for pattern in paths:
        matched = sorted(glob.glob(str(pattern), recursive=True)) if glob.has_magic(str(pattern)) else [pattern]
        if not matched:
            raise ValueError(f"results pattern {str(pattern)!r} matches no file")
        rows += _rows_of(matched)
    return rows


def _rows_of(paths: Sequence[str | os.PathLike]) -> list[dict]:
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data if isinstance(data, list) else [data]:
            if "qat_ppl" in row and "ppl" not in row:
                rows.append(_train_row(row))
                continue
            missing = [k for k in ("method", "quant", "ppl") if k not in row]
            if missing:
                raise ValueError(f"{path}: result row lacks {missing}; expected keys {list(COLUMNS)}")
            rows.append({k: row.get(k, math.nan) for k in COLUMNS})
    return rows


def _train_row(data: dict) -> dict:
    """A qat-train results dict ({qat_ppl, bits_per_weight, wall_s, ...}) as a comparison row."""
    return {"method": data.get("method", "qat"), "quant": data.get("quant", "?"), "ppl": data["qat_ppl"],
            "bits_per_weight": data.get("bits_per_weight", math.nan), "size_mb": data.get("size_mb", math.nan),
            "wall_s": data.get("wall_s", math.nan), "peak_mem_mb": data.get("peak_mem_mb", math.nan)}


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """Rows no other row beats on both bits per weight and perplexity (lower is better for both)."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["bits_per_weight"] <= r["bits_per_weight"] and o["ppl"] <= r["ppl"]
                        and (o["bits_per_weight"] < r["bits_per_weight"] or o["ppl"] < r["ppl"]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["bits_per_weight"])


def to_markdown(rows: Sequence[dict]) -> str:
    from qat.control import format_table

    fmt = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return format_table([{k: _cell(r.get(k)) for k in COLUMNS} for r in fmt], list(COLUMNS))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike, title: str = "PTQ / QAT comparison") -> dict[str, Path]:
    """results.md, results.csv, results.json and pareto.png in `out_dir` (written atomically).

    Example:
        >>> write_results(rows, "outputs/compare")["png"]
        PosixPath('outputs/compare/pareto.png')
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json", "png": out / "pareto.png"}
    _atomic_write(paths["md"], f"# {title}\n\n{to_markdown(rows)}\n".encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(paths["csv"], buf.getvalue().encode())
    _atomic_write(paths["json"], json.dumps(list(rows), indent=2).encode())
    plot_pareto(rows, paths["png"], title)
    return paths


def plot_pareto(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity (log scale) against bits per weight, one marker per method, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^v<>PX*"
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [r for r in rows if r["method"] == method and math.isfinite(r["ppl"])]
        ax.scatter([r["bits_per_weight"] for r in pts], [r["ppl"] for r in pts], marker=markers[i % len(markers)],
                   label=method, s=40)
        for r in pts:
            ax.annotate(r["quant"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = [r for r in pareto_front([r for r in rows if math.isfinite(r["ppl"])])]
    if len(front) > 1:
        ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("bits per weight (quantized linears, incl. scales)")
    ax.set_ylabel("perplexity")
    if rows and max(r["ppl"] for r in rows) / max(min(r["ppl"] for r in rows), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(Path(path), buf.getvalue())


# -- jobs behind qat-ptq and qat-compare (plain dicts in, so tests need no Hydra) ---------------------
PTQ_KEYS = {"task_name", "seed", "paths", "model", "data", "quant", "method", "calibration", "eval", "save",
            "export", "progress"}
COMPARE_KEYS = {"task_name", "seed", "paths", "model", "data", "methods", "quants", "calibration", "eval",
                "results", "title"}
CAL_KEYS, EVAL_KEYS = {"samples", "seq_len", "split"}, {"split", "max_blocks", "batch_size"}


def check_keys(owner: str, cfg: dict, allowed: set) -> None:
    """Refuse misspelt keys, naming them and the valid ones."""
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


def job_inputs(model_cfg: dict, data_cfg: dict, calibration: dict, eval_cfg: dict, batch_rows: int = 8):
    """(load_model callable, calibration batches, eval blocks) from the model / data config groups.

    Calibration sequences come from `calibration.split` of the corpus, grouped `batch_rows` to a batch.
    Raises:
        ValueError: misspelt keys, or a corpus with fewer blocks than calibration.samples.
    """
    from qat.data import CorpusConfig, build_blocks, calibration_batches
    from qat.models import load_model

    check_keys("calibration", calibration, CAL_KEYS)
    check_keys("eval", eval_cfg, EVAL_KEYS)
    tiny = dict(model_cfg.get("tiny") or {})
    load = lambda: load_model(model_cfg["path"], model_cfg.get("dtype", "float32"), **tiny)  # noqa: E731
    seqs = calibration_batches(data_cfg, int(calibration["samples"]), int(calibration["seq_len"]),
                               calibration.get("split", "train"))
    batches = [torch.cat(seqs[i:i + batch_rows]) for i in range(0, len(seqs), batch_rows)]
    blocks = None
    if eval_cfg.get("split"):
        fields = {k: v for k, v in data_cfg.items() if k in CorpusConfig.__dataclass_fields__}
        fields["max_eval_blocks"] = eval_cfg.get("max_blocks")
        blocks = build_blocks(CorpusConfig(**fields), splits=[eval_cfg["split"]])[eval_cfg["split"]]
    return load, batches, blocks


def run_ptq_job(cfg: dict, out_dir: str | os.PathLike) -> dict:
    """The qat-ptq run: load, quantize with one method, evaluate, save (state dict, result.json, export).

    Returns:
        the result row (COLUMNS) plus the method options and where things were written.
    Example:
        >>> run_ptq_job(OmegaConf.to_container(cfg, resolve=True), "outputs/ptq/run")
    """
    from qat.ptq import method_config

    check_keys("config", cfg, PTQ_KEYS | {"hydra"})
    torch.manual_seed(int(cfg.get("seed", 0)))
    method = dict(cfg["method"])
    method_config(method)  # validate before loading anything
    load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
    row, model = run_one(load, method.pop("name"), cfg["quant"], batches, blocks, method,
                         progress=bool(cfg.get("progress", True)), batch_size=cfg["eval"].get("batch_size", 4))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {**row, "model": cfg["model"]["path"], "options": model.qat_ptq}
    if cfg.get("save", True):
        result["checkpoint"] = str(save_state(model, out / "model.pt"))
    if cfg.get("export"):
        from qat.export import export

        result["export"] = str(export(model, out / f"export_{cfg['export']}", cfg["export"]))
    _atomic_write(out / "result.json", json.dumps(result, indent=2, default=str).encode())
    return result


def save_state(model: nn.Module, path: Path) -> Path:
    """The prepared model's state dict (pinned qparams, g_idx and quantizer flags included), atomically.

    A torch file loadable with torch.load(weights_only=True); `qat-export checkpoint=... quant=...` and
    QAT training load it into a model prepared with the same recipe.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def run_compare_job(cfg: dict, out_dir: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The qat-compare run: every method x scheme, plus rows from `results` files, into one table and plot."""
    from qat.ptq import method_config

    check_keys("config", cfg, COMPARE_KEYS | {"hydra"})
    torch.manual_seed(int(cfg.get("seed", 0)))
    methods = [_method_entry(m) for m in cfg["methods"]]
    extra = load_results(cfg.get("results") or [])
    if methods:
        load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
    rows = []
    for label, opts in methods:
        if opts["name"] != "fp":
            method_config(opts)
        for quant in ([None] if opts["name"] == "fp" else cfg["quants"]):
            args = {k: v for k, v in opts.items() if k != "name"}
            row, _ = run_one(load, opts["name"], quant, batches, blocks, args,
                             batch_size=cfg["eval"].get("batch_size", 4))
            row["method"] = label
            log(f"{label:12s} {row['quant']:16s} ppl {row['ppl']:.3f}  {row['bits_per_weight']:.2f} bpw  "
                f"{row['wall_s']:.1f} s")
            rows.append(row)
    title = cfg.get("title") or f"{cfg['model']['path']} on {Path(str(cfg['data']['path'])).name}"
    return write_results(rows + extra, out_dir, title)


def _method_entry(entry: Any) -> tuple[str, dict]:
    opts = {"name": entry} if isinstance(entry, str) else dict(entry)
    if "name" not in opts:
        raise ValueError(f"methods entry {entry!r}: give a name (fp, rtn, gptq, awq, smoothquant)")
    label = opts.pop("label", opts["name"])
    return label, opts
