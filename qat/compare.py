"""One comparison across methods and schemes: perplexity, bits per weight, size, wall time, peak memory.

Two ways to run it (both end in `write_results`: markdown, CSV and JSON plus a Pareto chart, PNG):
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

import csv
import io
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

COLUMNS = ("method", "quant", "ppl", "bits_per_weight", "size_mb", "wall_s", "peak_mem_mb")
STATUS_COLUMNS = ("status", "error")  # "ok" | "failed", and the failure's message
PROTOCOL_KEYS = ("data", "split", "blocks", "block_size")
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


def eval_protocol(data_path: Any, split: str, blocks: torch.Tensor) -> dict:
    """The evaluation protocol a perplexity was measured under: corpus, split, number of blocks, block size.

    Example:
        >>> eval_protocol("wiki", "test", torch.zeros(32, 128, dtype=torch.long))
        {'data': 'wiki', 'split': 'test', 'blocks': 32, 'block_size': 128}
    """
    return {"data": str(data_path), "split": str(split), "blocks": int(blocks.shape[0]),
            "block_size": int(blocks.shape[1]) if blocks.dim() == 2 else 0}


def check_protocols(rows: Sequence[dict]) -> dict | None:
    """The protocol every successful row shares (rows without one are legacy and pass); None if none has one.

    Raises:
        ValueError: a row measured under another protocol, naming its file (`source`) and the first row's.
    """
    ref = None
    for row in rows:
        proto = row.get("protocol")
        if row.get("status", "ok") != "ok" or proto is None:
            continue
        proto = {k: proto.get(k) for k in PROTOCOL_KEYS}
        if ref is None:
            ref = (proto, row.get("source", f"{row['method']}/{row['quant']}"))
        elif proto != ref[0]:
            where = row.get("source", f"{row['method']}/{row['quant']}")
            diff = ", ".join(f"{k}: {ref[0][k]!r} vs {proto[k]!r}" for k in PROTOCOL_KEYS if ref[0][k] != proto[k])
            raise ValueError(f"{where}: eval protocol differs from {ref[1]} ({diff}); perplexities measured on "
                             "different blocks are not comparable: rerun with the same data / eval settings")
    return ref[0] if ref else None


def failed_row(method: str, quant: str, error: BaseException | str, protocol: dict | None = None) -> dict:
    """A table row for a job that raised: numbers NaN, status "failed", the error's type and message."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"method": method, "quant": quant, **{k: math.nan for k in COLUMNS[2:]}, "status": "failed",
            "error": " ".join(str(msg).split())[:300], "protocol": protocol}


def load_results(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Rows from result JSON files (one row, a list of rows, or a results.json {protocol, rows}).

    Paths may be glob patterns (`outputs/ptq/multirun/**/result.json` collects a `qat-ptq -m` sweep).
    Each row keeps the file it came from as `source` (named by `check_protocols`).
    Raises:
        ValueError: a pattern matching nothing, or a file without the required keys, naming it.
    Example:
        >>> rows = load_results(["outputs/train/run/result.json", "outputs/ptq/multirun/**/result.json"])
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
        shared = data.get("protocol") if isinstance(data, dict) and "rows" in data else None
        items = data["rows"] if shared is not None or (isinstance(data, dict) and "rows" in data) else data
        for row in items if isinstance(items, list) else [items]:
            rows.append(_as_row(row, path, shared))
    return rows


def _as_row(row: dict, path: Any, protocol: dict | None = None) -> dict:
    if "qat_ppl" in row and "ppl" not in row:
        row = _train_row(row)
    missing = [k for k in ("method", "quant", "ppl") if k not in row]
    if missing:
        raise ValueError(f"{path}: result row lacks {missing}; expected keys {list(COLUMNS)}")
    out = {k: row.get(k, math.nan) for k in COLUMNS}
    out["ppl"] = math.nan if out["ppl"] is None else out["ppl"]
    out.update(status=row.get("status", "ok"), error=row.get("error", ""), source=str(path),
               protocol=row.get("protocol") or protocol)
    return out


def _train_row(data: dict) -> dict:
    """A qat-train results dict ({qat_ppl, bits_per_weight, wall_s, ...}) as a comparison row."""
    return {"method": data.get("method", "qat"), "quant": data.get("quant", "?"), "ppl": data["qat_ppl"],
            "bits_per_weight": data.get("bits_per_weight", math.nan), "size_mb": data.get("size_mb", math.nan),
            "wall_s": data.get("wall_s", math.nan), "peak_mem_mb": data.get("peak_mem_mb", math.nan),
            "protocol": data.get("eval_protocol")}


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """Rows no other row beats on both bits per weight and perplexity (lower is better for both)."""
    front = []
    for r in rows:
        dominated = any(o is not r and o["bits_per_weight"] <= r["bits_per_weight"] and o["ppl"] <= r["ppl"]
                        and (o["bits_per_weight"] < r["bits_per_weight"] or o["ppl"] < r["ppl"]) for o in rows)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["bits_per_weight"])


def _finite(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                   for k in ("ppl", "bits_per_weight"))]


def to_markdown(rows: Sequence[dict]) -> str:
    """The table; status and error columns appear only when a job failed."""
    from qat.control import format_table

    columns = list(COLUMNS) + (list(STATUS_COLUMNS) if any(r.get("status", "ok") != "ok" for r in rows) else [])
    return format_table([{k: _cell(r.get(k, "")) for k in columns} for r in rows], columns)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v).replace("|", "/")


def _atomic_write(path: Path, data: bytes) -> None:
    from qat.export._io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike, title: str = "PTQ / QAT comparison") -> dict[str, Path]:
    """results.md, results.csv, results.json and pareto.png in `out_dir` (written atomically).

    results.json is {"title", "protocol", "rows"}: the shared eval protocol is checked first.
    Raises:
        ValueError: rows measured under different eval protocols (see `check_protocols`).
    Example:
        >>> write_results(rows, "outputs/compare")["png"]
        PosixPath('outputs/compare/pareto.png')
    """
    protocol = check_protocols(rows)
    rows = [{**{k: r.get(k, math.nan) for k in COLUMNS}, "status": r.get("status", "ok"), "error": r.get("error", ""),
             **({"source": r["source"]} if r.get("source") else {})} for r in rows]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json", "png": out / "pareto.png"}
    head = f"# {title}\n\n" + (f"Perplexity on {_describe(protocol)}.\n\n" if protocol else "")
    _atomic_write(paths["md"], f"{head}{to_markdown(rows)}\n".encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS + STATUS_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(paths["csv"], buf.getvalue().encode())
    doc = {"title": title, "protocol": protocol, "rows": list(rows)}
    _atomic_write(paths["json"], json.dumps(doc, indent=2).encode())
    plot_pareto(rows, paths["png"], title)
    return paths


def _describe(p: dict) -> str:
    return f"{p['blocks']} x {p['block_size']} held-out {p['split']} tokens of {Path(p['data']).name}"


def plot_pareto(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity (log scale) against bits per weight, one marker per method, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _finite(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "osD^v<>PX*"
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["bits_per_weight"] for r in pts], [r["ppl"] for r in pts], marker=markers[i % len(markers)],
                   label=method, s=40)
        for r in pts:
            ax.annotate(r["quant"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = pareto_front(rows)
    if len(front) > 1:
        ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("bits per weight (quantized linears, incl. scales)")
    ax.set_ylabel("perplexity")
    if rows and max(r["ppl"] for r in rows) / max(min(r["ppl"] for r in rows), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows:
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
                "results", "title", "method", "quant", "qat", "fail_on_error"}
CAL_KEYS, EVAL_KEYS = {"samples", "seq_len", "split"}, {"split", "max_blocks", "batch_size"}


def check_keys(owner: str, cfg: dict, allowed: set) -> None:
    """Refuse misspelt keys, naming them and the valid ones."""
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; valid keys are {sorted(allowed)}")


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
        seqs = calibration_batches(data_cfg, int(calibration["samples"]), int(calibration["seq_len"]),
                                   calibration.get("split", "train"))
        batches = [torch.cat(seqs[i:i + batch_rows]) for i in range(0, len(seqs), batch_rows)]
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

        result["export"] = str(export(model, out / f"export_{cfg['export']}", cfg["export"]))
    _atomic_write(out / "result.json", json.dumps(result, indent=2, default=str).encode())
    return result


def save_state(model: nn.Module, path: Path) -> Path:
    """The prepared model's state dict (pinned qparams, g_idx and quantizer flags included), atomically.

    A torch file loadable with torch.load(weights_only=True); `qat-export checkpoint=... quant=...` and
    QAT training load it into a model prepared with the same recipe.
    """
    from qat.export._io import atomic_path

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
        load, batches, blocks = job_inputs(cfg["model"], cfg["data"], cfg["calibration"], cfg["eval"])
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
    _atomic_write(out / "result.json", json.dumps(row, indent=2, default=str).encode())
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
        row = _as_row(data, path)
        if row["method"] == "fp" and row["status"] == "ok":  # jobs run in parallel may each measure it
            key = json.dumps(row["protocol"], sort_keys=True)
            if key in fp_seen:
                continue
            fp_seen.add(key)
        rows.append(row)
    return rows
