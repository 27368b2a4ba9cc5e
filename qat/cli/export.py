"""qat-export: any checkpoint or export -> native / compressed-tensors / GPTQ / GGUF. Thin: compose, call.

    qat-export model=smollm2-135m export=gguf_q4_k_m output=out/smollm2-Q4_K_M.gguf
    qat-export model=tiny quant=gguf_q4_0 checkpoint=runs/qat/last.ckpt export=gguf_q4_0 output=out/t.gguf
    qat-export model=out/native export=compressed_tensors output=out/ct
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.export.run import run_export

    quant = OmegaConf.to_container(cfg.quant, resolve=True) if cfg.get("quant") else None
    result = run_export(cfg.model, cfg.output, format=cfg.export.format, gguf_type=cfg.export.gguf_type,
                        quant=quant, checkpoint=cfg.checkpoint, tokenizer=cfg.tokenizer, dtype=cfg.dtype)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
