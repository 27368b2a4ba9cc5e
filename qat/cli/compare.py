"""qat-compare: every method x scheme on one model and corpus, one table (md/csv/json) and a Pareto plot.

    qat-compare                                                tiny Llama on the fixture
    qat-compare model=smollm2_135m data=wiki quants=[w4a16_g128,w3a16_g64] calibration.seq_len=512
    qat-compare results=[outputs/train/run/result.json]        add QAT (or other qat-ptq) runs
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat.recipes import CONFIG_DIR



@hydra.main(config_path=str(CONFIG_DIR), config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.compare import run_compare_job

    paths = run_compare_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir)
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
