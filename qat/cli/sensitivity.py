"""qat-sensitivity: per-module format sensitivity and an automatic mixed-precision layout under a size budget.
Thin: compose, call.

    qat-sensitivity model=smollm2_135m data=wiki budget.bits_per_weight=3.5     int3..int8 g64, int3/4 g128, float
    qat-sensitivity model=smollm2_135m data=wiki menu=gguf budget.bytes=70000000 gguf.export=true
    qat-sensitivity mode=solve scores=outputs/sensitivity/<run>/scores.json budget.bits_per_weight=4.5   no model
    qat-sensitivity model=smollm2_135m data=wiki quant=w4a8_kv8     scored with A8 / KV8, the recipe keeps them

Writes scores.json, recipe.yaml (quant=<it> for qat-train / qat-ptq / qat-export), layout.json, report.md /
report.png, and with a GGUF menu gguf_types.json and tensor_types.txt (llama-quantize --tensor-type-file).
"""
from __future__ import annotations

import json
import re

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat.cli.boundary import guard, run_hydra
from qat.jobs.sensitivity import run_sensitivity_job
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="sensitivity", version_base="1.3")
@guard("qat-sensitivity")
def _main(cfg: DictConfig) -> None:
    given = tuple(re.split(r"[.=]", o.lstrip("+~"), maxsplit=1)[0] for o in HydraConfig.get().overrides.task)
    result = run_sensitivity_job(OmegaConf.to_container(cfg, resolve=True), HydraConfig.get().runtime.output_dir,
                                 given)
    print(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> None:
    """The `qat-sensitivity` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-sensitivity", _main, argv)


if __name__ == "__main__":
    main()
