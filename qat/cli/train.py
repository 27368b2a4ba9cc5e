"""`qat-train` (also `python -m qat.cli.train`): compose configs/train.yaml, then qat.lit.run.train.

    qat-train experiment=smollm2_w4_qat
    qat-train quant=w8a8 trainer.max_steps=50 optim.optimizer.lr=3e-5
    qat-train -m quant=w4a16_g128,w3a16_g64
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from qat.cli.boundary import guard, run_hydra
from qat.lit.run import check_config, train
from qat.recipes import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
@guard("qat-train")
def _main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    return results.get("qat_ppl")  # the value a sweeper would optimise


def check_job(cfg: DictConfig) -> None:
    """One job's config checked before anything loads; a `-m` sweep checks every job with it before the first runs."""
    check_config(cfg, make_output=False)


def main(argv: list[str] | None = None) -> None:
    """The `qat-train` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-train", _main, argv, check=check_job)


if __name__ == "__main__":
    main()
