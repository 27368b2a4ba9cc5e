"""qat-eval: perplexity and a greedy sample from any export, through qat's loader. Thin: compose, call.

    qat-eval model=out/smollm2-Q4_K_M.gguf
    qat-eval model=smollm2-135m quant=fp8_dynamic        # in-flight quantization at load, no calibration
"""
from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from qat.recipes import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from qat.export.run import run_eval

    quant = OmegaConf.to_container(cfg.quant, resolve=True) if cfg.get("quant") else None
    result = run_eval(cfg.model, data=cfg.data, quant=quant, seq_len=cfg.seq_len, max_blocks=cfg.max_blocks,
                      split=cfg.split, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                      tokenizer=cfg.tokenizer, dtype=cfg.dtype, text_field=cfg.text_field)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
