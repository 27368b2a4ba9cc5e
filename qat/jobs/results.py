"""Comparison results: rows, their eval protocol, and the table and chart people compare.

A row is a dict with COLUMNS (method, quant, ppl, bits per weight, size, wall time, peak memory), a status
("ok" | "failed") and its error, and the eval protocol it was measured under (corpus, split, number of
blocks, block size). `write_results` writes markdown, CSV and JSON plus a Pareto chart (PNG); rows from
other runs (`result.json` of qat-train / qat-ptq / qat-compare jobs) come in through `load_results`, and
rows measured under different protocols are refused (`check_protocols`).

Rows may also carry `tasks` (qat-eval's lm-evaluation-harness metrics: {"<task>/<metric>": {value, stderr, n,
higher_is_better}}): the table grows a "value ± stderr" column per metric, a cell within noise of the column's
best row (|a - b| < 2 sqrt(se_a^2 + se_b^2)) is marked ≈, and the pairs of rows that their noise cannot
separate are listed under the table. Rows whose task was measured on a different number of documents are
refused (`check_tasks`).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from qat.control import format_table
from qat.errors import BadFileError, ConfigError
from qat.io import atomic_write_bytes

COLUMNS = ("method", "quant", "ppl", "bits_per_weight", "size_mb", "wall_s", "peak_mem_mb")
STATUS_COLUMNS = ("status", "error")  # "ok" | "failed", and the failure's message
PROTOCOL_KEYS = ("data", "split", "blocks", "block_size")
NOISE_SIGMAS = 2.0  # two rows differ significantly when |a - b| >= NOISE_SIGMAS * sqrt(se_a^2 + se_b^2)

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
            raise ConfigError(f"{where}: eval protocol differs from {ref[1]} ({diff}); perplexities measured on "
                             "different blocks are not comparable: rerun with the same data / eval settings")
    _check_devices(rows)
    return ref[0] if ref else None


def _check_devices(rows: Sequence[dict]) -> None:
    """Rows that record their device (qat-ptq / qat-compare rows) were all measured on one kind, cpu or cuda: a GPU
    run's codes, wall time and peak memory are not the CPU's. Rows without one (older files, qat-train) pass."""
    first = None
    for row in rows:
        if row.get("status", "ok") != "ok" or not row.get("device"):
            continue
        kind, where = str(row["device"]).split(":")[0], row.get("source", f"{row['method']}/{row['quant']}")
        if first is None:
            first = (kind, where)
        elif kind != first[0]:
            raise ConfigError(f"{where}: measured on device {kind}, {first[1]} on {first[0]}; GPU and CPU rows "
                              "differ in their codes (GPTQ's rounding), wall time and peak memory: rerun with the same "
                              "device=")


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
    rows, seen = [], set()
    for pattern in paths:
        matched = (sorted(glob.glob(str(pattern), recursive=True), key=_natural) if glob.has_magic(str(pattern))
                   else [pattern])
        if not matched:
            raise ConfigError(f"results pattern {str(pattern)!r} matches no file")
        fresh = [m for m in matched if Path(m).resolve() not in seen]
        seen.update(Path(m).resolve() for m in fresh)
        rows += _rows_of(fresh)
    return rows


def _natural(path: str) -> list:
    """Sort key putting sweep job dirs in job order (2_rtn before 10_qat), as collect_sweep does."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _rows_of(paths: Sequence[str | os.PathLike]) -> list[dict]:
    rows = []
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"results file {str(path)!r} does not exist")
        if Path(path).is_dir():
            raise BadFileError(path, "is a folder; results= takes result JSON files (or glob patterns)")
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadFileError(path, f"not a result JSON file ({err}); results= takes result.json / results.json "
                                     "files written by qat-ptq, qat-train or qat-compare") from None
        shared = data.get("protocol") if isinstance(data, dict) and "rows" in data else None
        items = data["rows"] if shared is not None or (isinstance(data, dict) and "rows" in data) else data
        for row in items if isinstance(items, list) else [items]:
            if isinstance(row, dict) and row.get("reused"):
                continue  # a sweep's float baseline, reused from (and listed with) another job
            rows.append(as_row(row, path, shared))
    return rows


def as_row(row: dict, path: Any, protocol: dict | None = None) -> dict:
    """One table row from a result file's row (a qat-train result becomes its QAT row), checked.

    Raises:
        BadFileError: a row that is not a mapping, lacks method / quant / ppl, or holds a number column that is
            not a number (or null), naming the file.
    """
    if not isinstance(row, dict):
        raise BadFileError(path, f"a result row is a {type(row).__name__}, not a mapping of {list(COLUMNS)}")
    if "qat_ppl" in row and "ppl" not in row:
        row = _train_row(row)
    missing = [k for k in ("method", "quant", "ppl") if k not in row]
    if missing:
        raise BadFileError(path, f"result row lacks {missing}; expected keys {list(COLUMNS)}")
    bad = [f"{k}={row[k]!r}" for k in COLUMNS[2:] if row.get(k) is not None
           and (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))]
    if bad:
        raise BadFileError(path, f"row {row.get('method')}/{row.get('quant')}: {', '.join(bad)} not a number "
                                 "(numbers or null expected)")
    out = {k: row.get(k, math.nan) for k in COLUMNS}
    out.update({k: math.nan for k in COLUMNS[2:] if out[k] is None})  # strict JSON writes NaN as null
    out.update(status=row.get("status", "ok"), error=row.get("error", ""), source=str(path),
               protocol=row.get("protocol") or protocol)
    if row.get("tasks"):
        out["tasks"] = row["tasks"]
    if row.get("device"):
        out["device"] = str(row["device"])
    return out


def _train_row(data: dict) -> dict:
    """A qat-train results dict ({qat_ppl, bits_per_weight, wall_s, ...}) as a comparison row."""
    return {"method": data.get("method", "qat"), "quant": data.get("quant", "?"), "ppl": data["qat_ppl"],
            "bits_per_weight": data.get("bits_per_weight", math.nan), "size_mb": data.get("size_mb", math.nan),
            "wall_s": _quantization_s(data), "peak_mem_mb": data.get("peak_mem_mb", math.nan),
            "protocol": data.get("eval_protocol"), "tasks": data.get("tasks"),  # eval.tasks on the QAT model
            "device": data.get("device")}  # where Lightning trained


def _quantization_s(data: dict) -> float:
    """A training run's wall_s column: PTQ init + training, evaluation excluded (as for every other row)."""
    if isinstance(data.get("train_s"), (int, float)):
        return float(data.get("init_s") or 0.0) + data["train_s"]
    return data.get("wall_s", math.nan)


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
    """The table; status and error columns appear only when a job failed; one "value ± stderr" column per task
    metric (≈: within noise of the column's best row), then the pairs of rows within each other's noise."""
    columns = list(COLUMNS) + (list(STATUS_COLUMNS) if any(r.get("status", "ok") != "ok" for r in rows) else [])
    keys = task_keys(rows)
    cells = []
    for r in rows:
        cell = {k: _cell(r.get(k, "")) for k in columns}
        for key in keys:
            m, best = (r.get("tasks") or {}).get(key), best_row(rows, key)
            tie = m is not None and best is not None and best is not r and within_noise(m, best["tasks"][key])
            cell[key] = "" if m is None else f"{_num(m['value'])} ± {_num(m['stderr'])}" + (" ≈" if tie else "")
        cells.append(cell)
    table = format_table(cells, columns + keys)
    notes = noise_pairs(rows, keys)
    if keys:
        table += (f"\n\n± one standard error; ≈ within noise of the column's best row "
                  f"(|a - b| < {NOISE_SIGMAS:g} sqrt(se_a^2 + se_b^2)).")
    if notes:
        table += "\n\nNot significant (within noise):\n" + "\n".join(f"- {n}" for n in notes)
    return table


def _num(v: Any) -> str:
    return "nan" if not isinstance(v, (int, float)) or math.isnan(v) else f"{v:.4g}"


def task_keys(rows: Sequence[dict]) -> list[str]:
    """Every "<task>/<metric>" some row carries, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in (r.get("tasks") or {})))


def within_noise(a: dict, b: dict, sigmas: float = NOISE_SIGMAS) -> bool:
    """Whether two measurements {value, stderr} differ by less than `sigmas` times their combined error.

    Example:
        >>> within_noise({"value": 10.0, "stderr": 0.3}, {"value": 10.5, "stderr": 0.2})
        True
    """
    se = math.hypot(float(a.get("stderr") or 0.0), float(b.get("stderr") or 0.0))
    return abs(float(a["value"]) - float(b["value"])) < sigmas * se


def best_row(rows: Sequence[dict], key: str) -> dict | None:
    """The row with the best finite value of a task metric (its higher_is_better), or None."""
    have = [r for r in rows if math.isfinite(float(((r.get("tasks") or {}).get(key) or {}).get("value", math.nan)))]
    if not have:
        return None
    sign = 1 if have[0]["tasks"][key].get("higher_is_better", True) else -1
    return max(have, key=lambda r: sign * r["tasks"][key]["value"])


def noise_pairs(rows: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """"<metric>: <row> vs <row>" for every pair of rows a task metric does not separate."""
    out = []
    for key in keys:
        have = [r for r in rows if key in (r.get("tasks") or {})]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                if within_noise(a["tasks"][key], b["tasks"][key]):
                    out.append(f"{key}: {a['method']}/{a['quant']} vs {b['method']}/{b['quant']}")
    return out


def check_tasks(rows: Sequence[dict]) -> None:
    """Every row's task metric was measured on the same number of documents.

    Raises:
        ValueError: naming the metric, both rows (their `source`) and both counts.
    """
    seen: dict[str, tuple[Any, str]] = {}
    for row in rows:
        where = row.get("source", f"{row.get('method')}/{row.get('quant')}")
        for key, m in (row.get("tasks") or {}).items():
            if key in seen and seen[key][0] != m.get("n"):
                raise ValueError(f"{where}: {key} measured on {m.get('n')} documents, {seen[key][1]} on "
                                 f"{seen[key][0]}; rerun with the same tasks and harness.limit")
            seen.setdefault(key, (m.get("n"), where))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v).replace("|", "/")


def to_json(data: Any) -> bytes:
    """Strict JSON bytes: NaN / inf become null (json.dumps writes NaN, which jq and browsers refuse).

    Example:
        >>> to_json({"ppl": float("nan")})
        b'{\n  "ppl": null\n}'
    """
    return json.dumps(_strict(data), indent=2, default=str, allow_nan=False).encode()


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


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
    check_tasks(rows)
    rows = [{**{k: r.get(k, math.nan) for k in COLUMNS}, "status": r.get("status", "ok"), "error": r.get("error", ""),
             **({"source": r["source"]} if r.get("source") else {}), **({"tasks": r["tasks"]} if r.get("tasks") else {})}
            for r in rows]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "json": out / "results.json", "png": out / "pareto.png"}
    head = f"# {title}\n\n" + (f"Perplexity on {_describe(protocol)}.\n\n" if protocol else "")
    atomic_write_bytes(paths["md"], f"{head}{to_markdown(rows)}\n".encode())
    buf = io.StringIO()
    keys = task_keys(rows)
    extra = [c for k in keys for c in (k, f"{k} stderr")]
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS + STATUS_COLUMNS) + extra, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        t = r.get("tasks") or {}
        writer.writerow({**r, **{c: t[k]["value" if c == k else "stderr"] for k in keys if k in t
                                 for c in (k, f"{k} stderr")}})
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    doc = {"title": title, "protocol": protocol, "rows": list(rows)}
    atomic_write_bytes(paths["json"], to_json(doc))
    plot_pareto(rows, paths["png"], title)
    return paths


def _describe(p: dict) -> str:
    return f"{p['blocks']} x {p['block_size']} held-out {p['split']} tokens of {Path(p['data']).name}"


def plot_pareto(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Perplexity against bits per weight, one marker per method, the Pareto front dashed, written as PNG.

    Schemes are named once, on the top axis at their bits per weight (schemes within a few percent of the
    axis share one tick), not beside every point: per-point labels overlapped wherever methods land close.
    Perplexity is on a log scale when it spans more than 5x.
    Example:
        >>> plot_pareto(rows, "outputs/compare/pareto.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def pareto_figure(rows: Sequence[dict], title: str = ""):
    """The matplotlib Figure behind `plot_pareto` (tests inspect where its labels landed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _finite(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = "osD^v<>PX*"
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["bits_per_weight"] for r in pts], [r["ppl"] for r in pts], marker=markers[i % len(markers)],
                   label=method, s=40, alpha=0.85)
    front = pareto_front(rows)
    if len(front) > 1:
        ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("bits per weight (quantized linears, incl. scales)")
    ax.set_ylabel("perplexity")
    if rows and max(r["ppl"] for r in rows) / max(min(r["ppl"] for r in rows), 1e-9) > 5:
        _plain_log_axis(ax)
    _scheme_ticks(ax, rows)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _scheme_ticks(ax, rows: Sequence[dict]) -> None:
    """Scheme names on a top axis, one tick per cluster of nearby bits-per-weight values."""
    points = sorted({(r["bits_per_weight"], r["quant"]) for r in rows})
    if not points:
        return
    lo, hi = ax.get_xlim()
    near = 0.04 * (hi - lo)
    clusters: list[list[tuple[float, str]]] = []
    for x, name in points:
        if clusters and x - clusters[-1][0][0] <= near:
            clusters[-1].append((x, name))
        else:
            clusters.append([(x, name)])
    top = ax.secondary_xaxis("top")
    top.set_xticks([sum(x for x, _ in c) / len(c) for c in clusters])
    top.set_xticklabels(["\n".join(dict.fromkeys(n for _, n in c)) for c in clusters], fontsize=7,
                        rotation=90)


def _plain_log_axis(ax) -> None:
    """Log-scale perplexity labelled 30, 50, 100, 200 (not 3 x 10^1)."""
    from matplotlib.ticker import FuncFormatter  # matplotlib loads only when a chart is drawn

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lead = lambda v: round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0  # noqa: E731
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if lead(v) in (2, 3, 5) else ""))
