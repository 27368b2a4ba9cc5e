"""qat-ptq: post-training quantization (RTN, GPTQ, AWQ, SmoothQuant) in the QAT pipeline. Thin: compose, call.

    qat-ptq                                                   tiny Llama, fixture text, GPTQ W4 g128
    qat-ptq model=smollm2_135m data=wiki method=gptq method.actorder=true calibration.seq_len=512
    qat-ptq -m method=rtn,gptq,awq quant=w4a16_g128,w3a16_g64

Writes result.json (perplexity, bits per weight, size, wall time, peak memory) and model.pt (the prepared
model with its pinned qparams: `qat-export checkpoint=.../model.pt quant=...`, or a QAT starting point).
"""
from __future__ import annotations

import json

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat.jobs.ptq import check_ptq_job, run_ptq_job
from qat.cli.boundary import guard, run_hydra
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="ptq", version_base="1.3")
@guard("qat-ptq")
def _main(cfg: DictConfig) -> None:
    result = run_ptq_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir)
    if result is not None:  # None: a rank other than 0 under torchrun (rank 0 writes and prints)
        print(json.dumps(result, indent=2, default=str))


def check_job(cfg: DictConfig) -> None:
    """One job's config checked before anything loads; a `-m` sweep checks every job with it before the first runs."""
    check_ptq_job(OmegaConf.to_container(cfg, resolve=True))


def main(argv: list[str] | None = None) -> None:
    """The `qat-ptq` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-ptq", _main, argv, check=check_job)


if __name__ == "__main__":
    main()
