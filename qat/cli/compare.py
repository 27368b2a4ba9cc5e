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

import logging
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat.jobs.compare import run_compare_job
from qat.jobs.sweep import run_sweep_job
from qat.lit.run import run_qat_job
from qat.cli.boundary import guard, run_hydra
from qat.recipes import CONFIG_DIR

log = logging.getLogger(__name__)


@hydra.main(config_path=str(CONFIG_DIR), config_name="compare", version_base="1.3")
@guard("qat-compare")
def _main(cfg: DictConfig) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """The `qat-compare` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-compare", _main, argv)


if __name__ == "__main__":
    main()
