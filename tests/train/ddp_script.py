"""Run by test_ddp.py: 2-process DDP (gloo, CPU) QAT of the tiny Llama; each rank saves its quantizer state.

    python tests/train/ddp_script.py OUT_DIR
Lightning's DDP launcher re-runs this file for rank 1 (LOCAL_RANK set).
"""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

import qat
from qat.lit import QATModule, TextDataModule

ROOT = Path(__file__).resolve().parents[2]


class RecordBatches(pl.Callback):
    """Keeps the first token of every training batch (the test checks the ranks saw different data)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(int(batch["input_ids"][:, :4].sum()))


def main(out: Path) -> None:
    pl.seed_everything(0)
    quant = qat.load_recipe("w4a16_g128_lsq").to_dict()
    quant["weight"]["group_size"] = 64
    # static activation ranges with a learned PACT clip: initialised from data, so each rank starts differently
    quant["input"] = {"bits": 8, "symmetric": True, "granularity": "per_tensor", "learn": "pact"}
    module = QATModule({"path": "tiny", "tiny": {"num_layers": 1}}, quant,
                       optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
                       range_init_batches=2, freeze_ranges_after=3)
    data = TextDataModule(str(ROOT / "configs/data/tiny_corpus.txt"), block_size=32, batch_size=2,
                          max_train_blocks=32, max_eval_blocks=2)
    record = RecordBatches()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[record])
    trainer.fit(module, data)
    state = {k: v.clone() for k, v in module.state_dict().items() if "quantizer" in k and isinstance(v, torch.Tensor)}
    state["_flags"] = [q.get_extra_state() for _, q in qat.quantizers(module.model)]
    state["_weights"] = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    state["_seen"] = record.seen
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
