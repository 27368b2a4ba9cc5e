"""qat-export: any checkpoint or export -> native / compressed-tensors / GPTQ / GGUF. Thin: compose, call.

    qat-export model.path=smollm2-135m format=gguf gguf_type=Q4_K_M output=out/smollm2-Q4_K_M.gguf
    qat-export model=tiny quant=gguf_q4_0 checkpoint=runs/last.ckpt format=gguf gguf_type=Q4_0 output=out/t.gguf
    qat-export format=gguf gguf_type=Q4_K_M imatrix=calibrate data=wiki calibration.save=out/imatrix.safetensors output=out/m.gguf
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.errors import ConfigError
from qat.jobs.export import run_export_job
from qat.cli.boundary import guard, run_hydra
from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
@guard("qat-export")
def _main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "output"):
        raise ConfigError("output= is required: a folder (native, compressed_tensors, gptq) or a .gguf file")
    result = run_export_job(OmegaConf.to_container(cfg, resolve=True))
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    """The `qat-export` console script: Hydra overrides in `argv` (default: the command line)."""
    run_hydra("qat-export", _main, argv)


if __name__ == "__main__":
    main()
