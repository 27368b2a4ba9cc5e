"""qat-eval: perplexity and a greedy sample from any export, through qat's loader. Thin: compose, call.

    qat-eval model.path=out/smollm2-Q4_K_M.gguf
    qat-eval model=smollm2_135m quant=fp8_dynamic        # in-flight quantization at load, no calibration
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat.cli.boundary import guard, run_hydra
from qat.jobs.eval import check_eval_job, eval_report, run_eval_job
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
@guard("qat-eval")
def _main(cfg: DictConfig) -> None:
    result = run_eval_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir)
    print(eval_report(result))


def check_job(cfg: DictConfig) -> None:
    """One job's config checked before anything loads; a `-m` sweep checks every job with it before the first runs."""
    check_eval_job(OmegaConf.to_container(cfg, resolve=True))


def main(argv: list[str] | None = None) -> None:
    """The `qat-eval` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-eval", _main, argv, check=check_job)


if __name__ == "__main__":
    main()
