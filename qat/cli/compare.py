"""qat-compare: methods x schemes on one model and corpus, one table (md/csv/json) and a Pareto plot (PNG).

    qat-compare -m method=fp,rtn,gptq,awq,qat,qat_gptq quant=w4a16_g128,w3a16_g64
                                            a Hydra multirun, QAT included: each job writes its result.json in
                                            its sweep subdir; at the end, `AggregateResults` (a Hydra
                                            callback) writes results.{md,csv,json} and pareto.png in the sweep dir
    qat-compare -m model=smollm2_135m data=wiki data.block_size=128 data.max_eval_blocks=32 \\
        method=fp,rtn,gptq,awq,qat,qat_gptq quant=w4a16_g128,w3a16_g128 qat.experiment=smollm2_w4_qat
    qat-compare                             no -m: the `methods` x `quants` lists in one process (no QAT)
    qat-compare results=[outputs/train/run/result.json]        add finished runs to that table

A failing job does not stop the sweep: it is recorded as a failed row (with its error) and, once the
table is written, the command exits with status 1 (fail_on_error=false: 0).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from qat.recipes import CONFIG_DIR

log = logging.getLogger(__name__)
# data keys that define the corpus and the eval blocks: a QAT row takes them from the compare config, so
# it is evaluated on exactly the PTQ rows' blocks (batch sizes and training caps stay the experiment's)
PROTOCOL_DATA_KEYS = ("path", "tokenizer", "block_size", "text_field", "sample_by", "val_fraction",
                      "test_fraction", "seed", "max_eval_blocks")
QAT_KEYS = {"experiment", "overrides"}
QAT_METHOD_KEYS = {"name", "label", "init", "overrides"}


def train_config(cfg: dict, out_dir: Path) -> DictConfig:
    """configs/train.yaml composed for one QAT job of the sweep, on the sweep's model, data, scheme and eval.

    Overrides, in order: `experiment=<qat.experiment>`, `init=<method.init>`, `qat.overrides`,
    `method.overrides`; then model, the corpus / eval-block keys of data, quant, eval split and blocks,
    the PTQ-init calibration size and the seed are set from the compare config.
    Raises:
        ValueError: unknown keys in `qat` or in the method config, naming them.
    Example:
        >>> tcfg = train_config({**cfg, "method": {"name": "qat", "init": "gptq"}}, Path("outputs/x"))
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qat.compare import check_keys

    qat_cfg, method = dict(cfg.get("qat") or {}), dict(cfg["method"])
    check_keys("qat", qat_cfg, QAT_KEYS)
    check_keys(f"method {method.get('name')}", method, QAT_METHOD_KEYS)
    overrides = [f"experiment={qat_cfg['experiment']}"] if qat_cfg.get("experiment") else []
    overrides += [f"init={method['init']}"] if method.get("init") else []
    overrides += [*(qat_cfg.get("overrides") or []), *(method.get("overrides") or [])]
    overrides.append(f"paths.output_dir={out_dir}")
    if GlobalHydra.instance().is_initialized():  # inside the running qat-compare app
        tcfg = compose(config_name="train", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            tcfg = compose(config_name="train", overrides=overrides)
    with open_dict(tcfg):
        tcfg.seed = cfg.get("seed", 0)
        tcfg.model = cfg["model"]
        for key in PROTOCOL_DATA_KEYS:
            if key in cfg["data"]:
                tcfg.data[key] = cfg["data"][key]
        tcfg.quant = cfg["quant"]
        tcfg.eval.split, tcfg.eval.max_blocks = cfg["eval"]["split"], cfg["eval"].get("max_blocks")
        if tcfg.get("init"):
            _same_calibration(cfg["calibration"])
            tcfg.init.calibration = {"samples": cfg["calibration"]["samples"], "seq_len": cfg["calibration"]["seq_len"]}
    return tcfg


def _same_calibration(calibration: dict) -> None:
    if calibration.get("split", "train") != "train":
        raise ValueError(f"calibration.split={calibration['split']!r}: PTQ-initialised QAT calibrates on the "
                         "training split; use calibration.split=train")


def run_qat_job(cfg: dict, out_dir: Path) -> dict:
    """The QAT row: qat-train's training function on `train_config(cfg, out_dir)`, measured like a PTQ row.

    Bits per weight and size come from `qat.compare.weight_bits` on the prepared model (they depend on the
    scheme and shapes only); wall time is PTQ initialisation + training (evaluation excluded, as for PTQ).
    Returns:
        the row (COLUMNS, status, protocol) plus the training results (start_ppl: perplexity at step 0).
    """
    import qat
    from qat.compare import PeakMemory, weight_bits
    from qat.lit.run import train
    from qat.models import load_model

    tcfg = train_config(cfg, out_dir)
    with PeakMemory() as mem:
        results = train(tcfg)
    if not math.isfinite(results.get("qat_ppl", math.nan)):
        raise ValueError(f"QAT finished without a finite perplexity (qat_ppl={results.get('qat_ppl')})")
    model_cfg = cfg["model"]
    bpw, size = weight_bits(qat.prepare(load_model(model_cfg["path"], model_cfg.get("dtype", "float32"),
                                                   **dict(model_cfg.get("tiny") or {})), cfg["quant"]))
    protocol = results.get("eval_protocol")
    if protocol:
        protocol = {**protocol, "data": str(cfg["data"]["path"])}
    return {"method": "qat", "quant": cfg["quant"].get("name", "custom"), "ppl": results["qat_ppl"],
            "bits_per_weight": bpw, "size_mb": size, "wall_s": results.get("init_s", 0.0) + results["train_s"],
            "peak_mem_mb": mem.peak_mb, "status": "ok", "error": "", "protocol": protocol,
            "start_ppl": results.get("rtn_ppl"), "steps": int(tcfg.trainer.max_steps),
            "experiment": (cfg.get("qat") or {}).get("experiment"), "ckpt": results.get("ckpt")}


class AggregateResults(Callback):
    """Hydra callback (configs/compare.yaml, hydra.callbacks): the sweep's table once every job has run.

    on_job_end records a job that escaped `run_sweep_job`'s own error handling as a failed row;
    on_multirun_end gathers every result.json of the sweep dir into results.{md,csv,json} and pareto.png
    there (qat.results.write_results), then exits with status 1 if a job failed and fail_on_error is set.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return is None or job_return.status != JobStatus.FAILED:
            return
        out = Path(config.hydra.runtime.output_dir)
        if not (out / "result.json").exists():
            from qat.io import atomic_write_bytes
            from qat.results import failed_row, to_json

            method = OmegaConf.select(config, "method.name", default="?")
            quant = OmegaConf.select(config, "quant.name", default="?")
            row = failed_row(method, quant, job_return._return_value)
            atomic_write_bytes(out / "result.json", to_json(row))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from qat.compare import collect_sweep, compare_title
        from qat.results import write_results

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect_sweep(sweep_dir)
        title = compare_title({"title": config.get("title"), "model": {"path": OmegaConf.select(config, "model.path")},
                               "data": {"path": OmegaConf.select(config, "data.path")}})
        paths = write_results(rows, sweep_dir, title)
        print(paths["md"].read_text(), flush=True)
        print(f"written: {', '.join(str(p) for p in paths.values())}", flush=True)
        failed = [f"{r['method']}/{r['quant']}" for r in rows if r["status"] != "ok"]
        if failed and config.get("fail_on_error", True):
            print(f"[qat-compare] {len(failed)} job(s) failed: {', '.join(failed)} (see the table)", file=sys.stderr)
            sys.exit(1)


@hydra.main(config_path=str(CONFIG_DIR), config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.compare import run_compare_job, run_sweep_job

    out_dir = HydraConfig.get().runtime.output_dir
    plain = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("method") is not None:  # one job of a sweep (or one method=... run)
        t0 = time.perf_counter()
        row = run_sweep_job(plain, out_dir, run_qat=run_qat_job, log=log.error)  # traceback in the job's log
        print(f"[qat-compare] {row['method']} {row['quant']}: {row['status']}, ppl {row['ppl']:.3f} "
              f"({time.perf_counter() - t0:.0f} s) -> {out_dir}/result.json", flush=True)
        return
    paths = run_compare_job(plain, out_dir)
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
