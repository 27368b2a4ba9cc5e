"""QATModule: resume determinism, load_from_checkpoint of a QAT checkpoint, KD, schedule, quantizer stats."""
import pytorch_lightning as pl
import pytest
import torch

import qat
from qat.errors import ConfigError
from qat.lit import QATModule, TextDataModule, kd_loss, quantizer_stats
from qat.lit.module import stored_weight
from qat.models import load_model

OPTIM = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3}
SCHED = {"_target_": "transformers.get_cosine_schedule_with_warmup", "_partial_": True,
         "num_warmup_steps": 2, "num_training_steps": 8}
TINY = {"path": "tiny", "tiny": {"num_layers": 1}}


def recipe():
    """LSQ weights (learned scales) + static int8 activations (held ranges): every kind of quantizer state."""
    r = qat.load_recipe("w4a16_g128_lsq").to_dict()
    r["weight"]["group_size"] = 64
    r["input"] = {"bits": 8, "symmetric": True, "granularity": "per_tensor"}
    return r


def module(**kw):
    args = dict(model=TINY, quant=recipe(), optimizer=OPTIM, scheduler=SCHED, range_init_batches=1,
                fake_quant_after=1, freeze_ranges_after=6)
    return QATModule(**{**args, **kw})


def datamodule(corpus):
    # 16 train blocks / batch 4 = 4 steps per epoch: the resume point (step 4) is an epoch boundary
    return TextDataModule(corpus, block_size=32, batch_size=4, max_train_blocks=16, max_eval_blocks=4)


def fit(corpus, tmp_path, max_steps, ckpt_path=None, name="run"):
    pl.seed_everything(0)
    m = module()
    every = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / name / "steps", every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path / name, limit_val_batches=0, gradient_clip_val=1.0,
                         num_sanity_val_steps=0, callbacks=[every])
    trainer.fit(m, datamodule(corpus), ckpt_path=ckpt_path)
    return m, trainer


@pytest.mark.parametrize("at", [4, 3], ids=["epoch_end", "mid_epoch"])
def test_resume_is_bit_identical(corpus, tmp_path, at):
    straight, _ = fit(corpus, tmp_path, 8, name="straight")
    fit(corpus, tmp_path, at, name="half")
    # the checkpoint ModelCheckpoint wrote at step `at`, as a real run would resume from
    ckpt = tmp_path / "half" / "steps" / f"epoch=0-step={at}.ckpt"
    resumed, trainer = fit(corpus, tmp_path, 8, ckpt_path=str(ckpt), name="resumed")
    assert trainer.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    lsq = [k for k in a if k.endswith("weight_quantizer.scale")]
    ranges = [k for k in a if k.endswith("input_quantizer.observer.hi")]
    assert lsq and ranges
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    flags = [q.get_extra_state() for _, q in qat.quantizers(resumed.model)]
    assert flags == [q.get_extra_state() for _, q in qat.quantizers(straight.model)]
    assert all(f["enabled"] and not f["observing"] for f in flags)  # schedule: on after 1, frozen after 6


def test_load_from_checkpoint_rebuilds_qat_model(corpus, tmp_path):
    m, trainer = fit(corpus, tmp_path, 3)
    ckpt = tmp_path / "qat.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("weight_quantizer.scale" in k for k in state) and any("_extra_state" in k for k in state)
    loaded = QATModule.load_from_checkpoint(ckpt)
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, qat.modules.fake.FakeQuantLinear)
    ids = torch.randint(3, 200, (2, 16))
    m.eval(), loaded.eval()
    assert torch.equal(m(ids), loaded(ids))
    loaded_q = dict(qat.quantizers(loaded.model))
    for name, q in qat.quantizers(m.model):
        assert q.get_extra_state() == loaded_q[name].get_extra_state()


def test_kd_loss_decreases_on_tiny_overfit():
    torch.manual_seed(0)
    m = QATModule(TINY, qat.load_recipe("w3a16_g64").to_dict(), kd={"weight": 1.0, "temperature": 2.0})
    with torch.no_grad():  # a random tiny model's outputs are near uniform: sharpen the teacher's so KD has work
        m._teacher[0].model.norm.weight.mul_(30)
    ids = torch.randint(3, 500, (2, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = m._losses(ids)
        assert torch.equal(out["loss"], out["kd"])  # weight 1: pure distillation
        losses.append(float(out["kd"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0]


def test_kd_loss_is_zero_for_identical_logits_and_teacher_frozen():
    x = torch.randn(2, 5, 11)
    assert float(kd_loss(x, x, 2.0)) == pytest.approx(0, abs=1e-6)
    m = QATModule(TINY, None, kd={"weight": 0.5, "temperature": 1.0, "teacher": "copy"})
    assert not any(p.requires_grad for p in m._teacher[0].parameters())
    assert not any(k.startswith("_teacher") for k in m.state_dict())
    shared = QATModule(TINY, qat.load_recipe("w4a16_g128").to_dict(), kd={"teacher": "shared"})
    ids = torch.randint(3, 500, (1, 8))
    with qat.quantization_disabled(shared.model):
        assert torch.equal(shared.teacher_logits(ids), shared(ids))


@pytest.mark.parametrize("kd, match", [({"wieght": 1}, "unknown key"), ({"weight": 2}, "kd.weight"),
                                       ({"temperature": 0}, "kd.temperature"), ({"teacher": "big"}, "kd.teacher")])
def test_bad_kd_config(kd, match):
    with pytest.raises(ValueError, match=match):
        QATModule(TINY, None, kd=kd)


def test_schedule_and_range_init(corpus):
    m = module(fake_quant_after=3, freeze_ranges_after=None)
    dm = datamodule(corpus)
    dm.setup()
    assert not any(q.initialized for n, q in qat.quantizers(m.model) if q.role == "input")
    m.range_init(dm.train_dataloader(), 2)
    assert all(q.initialized for _, q in qat.quantizers(m.model))
    m.apply_schedule(0)
    assert not any(q.enabled for _, q in qat.quantizers(m.model))
    m.apply_schedule(3)
    assert all(q.enabled for _, q in qat.quantizers(m.model))
    assert not any(q.observing for _, q in qat.quantizers(m.model, roles=["input"]))


def test_quantizer_stats_report_clipping():
    model = qat.prepare(load_model("tiny", num_layers=1), qat.load_recipe("w4a16_g128_lsq"))
    stats = quantizer_stats(model)
    # LSQ starts at the min-max scale (amax -> 7.5 steps: only the rounded-up extremes clip)
    assert stats["quant/clip_frac"] < 0.01 and stats["quant/scale_mean"] > 0
    with torch.no_grad():
        for _, q in qat.quantizers(model):
            q.scale.mul_(0.5)
    assert quantizer_stats(model)["quant/clip_frac"] > 0.05


def test_gradient_checkpointing_matches_plain_gradients():
    ids = torch.randint(3, 500, (2, 16))
    grads = []
    for ckpt in (False, True):
        m = QATModule(TINY, qat.load_recipe("w4a16_g128").to_dict(), gradient_checkpointing=ckpt)
        m._losses(ids)["loss"].backward()
        grads.append(m.model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_lean_ste_composes_with_gradient_checkpointing():
    """Every combination of the lean STE and activation checkpointing gives the unfused, uncheckpointed
    gradients exactly (W4A8: a weight and a dynamic input quantizer in every Linear; LSQ weight scales)."""
    ids = torch.randint(3, 500, (2, 16))
    recipe = qat.load_recipe("w4a8_kv8").to_dict()
    recipe["kv_cache"] = None
    recipe["weight"].update(group_size=64, learn="lsq")
    grads = {}
    for lean in (False, True):
        for ckpt in (False, True):
            torch.manual_seed(0)
            m = QATModule(TINY, recipe, gradient_checkpointing=ckpt, lean_ste=lean)
            m._losses(ids)["loss"].backward()
            grads[lean, ckpt] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    reference = grads[False, False]
    assert any(n.endswith("weight_quantizer.scale") for n in reference)
    for key, got in grads.items():
        assert got.keys() == reference.keys(), key
        for name in reference:
            assert torch.equal(got[name], reference[name]), (key, name)


def test_learned_rotations_train_jointly_and_fuse(corpus):
    """SpinQuant-style R1 / R2 trained with QAT (CayleySGD beside AdamW), orthogonal throughout, fused at fit end."""
    pl.seed_everything(0)
    m = QATModule(TINY, qat.load_recipe("w4a8_kv8").to_dict() | {"kv_cache": None, "weight": {
        "bits": 4, "granularity": "per_channel"}}, optimizer=OPTIM, learned_rotations={"lr": 0.5})
    r1 = m._rotations[0]
    start = r1.detach().clone()
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(m, datamodule(corpus))
    assert not torch.equal(start, r1.detach())
    assert torch.allclose(r1.detach() @ r1.detach().T, torch.eye(r1.shape[0]), atol=1e-5)
    assert not any("parametrizations" in k for k in m.model.state_dict())  # fused when fit ended
    with pytest.raises(ConfigError, match="unknown key"):
        QATModule(TINY, None, learned_rotations={"r7": True})
    with pytest.raises(ConfigError, match=r"learned_rotations.lr=-1; give a number > 0"):  # before the model is built
        QATModule(TINY, None, learned_rotations={"lr": -1})


def test_learned_rotations_alone_first_then_jointly_on_the_schedule(corpus):
    """learned_rotations.alone=2: the first two steps move only the rotations (the weights and AdamW's state held:
    SpinQuant's protocol), the third both. The CayleySGD step follows the main scheduler: warmup's lr 0 at step 1
    leaves the rotation where it was."""
    pl.seed_everything(0)
    m = QATModule(TINY, qat.load_recipe("w4a8_kv8").to_dict() | {"kv_cache": None}, optimizer=OPTIM,
                  scheduler={**SCHED, "num_warmup_steps": 1, "num_training_steps": 3},
                  learned_rotations={"lr": 0.5, "alone": 2})
    rotation_ids = {id(r) for r in m._rotations}
    weights = [p for p in m.parameters() if p.requires_grad and id(p) not in rotation_ids]
    snapshots = [([p.detach().clone() for p in weights], m._rotations[0].detach().clone())]

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(([p.detach().clone() for p in weights], m._rotations[0].detach().clone()))

    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         callbacks=[Snapshot()])
    trainer.fit(m, datamodule(corpus))
    (w0, r0), (w1, r1), (w2, r2), (w3, r3) = snapshots
    assert torch.equal(r0, r1)  # warmup: lr factor 0 at the first step
    assert not torch.equal(r1, r2) and not torch.equal(r2, r3)
    assert all(torch.equal(a, b) for a, b in zip(w0, w2))  # two steps alone: every weight as it was
    assert any(not torch.equal(a, b) for a, b in zip(w2, w3))
    adam = trainer.optimizers[0].state
    assert adam and all(int(state["step"]) == 1 for state in adam.values())  # AdamW stepped once: at step 3


def test_learned_rotations_start_from_the_recipes_fused_rotations():
    """On a recipe that fuses R1 / R2 (w4a4_kv4_rot: random Hadamards) the learned rotations start at the identity
    on top of them, so the QAT start is the recipe's own RTN model (was: a Hadamard on top, H D H, which undoes
    much of the random Hadamard's mixing: SmolLM2's RTN start went from 111 to 669 ppl); without recipe
    rotations they start from a Hadamard; init= still picks one for both."""
    recipe = qat.load_recipe("w4a4_kv4_rot").to_dict()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = QATModule(TINY, recipe).eval()
    learned = QATModule(TINY, recipe, learned_rotations={"lr": 0.5}).eval()
    eye = torch.eye(learned._rotations[0].shape[0])
    assert all(torch.equal(r.detach(), torch.eye(r.shape[0])) for r in learned._rotations)
    with torch.no_grad():
        assert torch.equal(learned.model(ids).logits, plain.model(ids).logits)
    hadamard_on_top = QATModule(TINY, recipe, learned_rotations={"init": "hadamard"})
    assert not torch.equal(hadamard_on_top._rotations[0].detach(), eye)
    bare = QATModule(TINY, recipe | {"rotations": None}, learned_rotations={"lr": 0.5})
    assert not torch.equal(bare._rotations[0].detach(), eye)  # nothing fused: a Hadamard start
    with pytest.raises(ConfigError, match=r"learned_rotations.init='eye'; choose one of \['auto', 'identity'"):
        QATModule(TINY, recipe, learned_rotations={"init": "eye"})
    by_name = QATModule(TINY, "w4a4_kv4_rot", learned_rotations={"lr": 0.5})  # quant as qat.prepare takes it
    assert all(torch.equal(r.detach(), torch.eye(r.shape[0])) for r in by_name._rotations)


def test_learned_rotations_with_frozen_embeddings(corpus):
    """freeze_embeddings under a learned R1 (the main job's setting): the stored embedding stays as it was, the
    rotation it is read through still trains (was: requires_grad_ on the computed, parametrized weight raised)."""
    pl.seed_everything(0)
    m = QATModule(TINY, qat.load_recipe("w4a16_g128").to_dict() | {"weight": {"bits": 4, "granularity": "per_channel"}},
                  optimizer=OPTIM, learned_rotations={"lr": 0.5}, freeze_embeddings=True)
    embed = stored_weight(m.model.get_input_embeddings())
    before, r1 = embed.detach().clone(), m._rotations[0]
    start = r1.detach().clone()
    assert not embed.requires_grad and r1.requires_grad
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(m, datamodule(corpus))
    assert not torch.equal(start, r1.detach())
    fused = m.model.get_input_embeddings().weight  # fused at fit end: the frozen embedding times the learned R1
    torch.testing.assert_close(fused.detach(), (before.double() @ r1.detach().double()).float(), atol=1e-5, rtol=1e-5)


def test_checkpoint_with_learned_rotations_exports_what_training_computed(corpus, tmp_path):
    """last.ckpt holds the rotations unfused (parametrizations, `learned_rotation` on the ends); qat-export's
    checkpoint= attaches the rotations its keys name, loads, fuses as fit end did: the native export reloads to
    the fused in-memory model's logits exactly (was: "does not fit the prepared model")."""
    from qat.jobs.export import run_export

    pl.seed_everything(0)
    m = QATModule(TINY, qat.load_recipe("w4a4_kv4_rot").to_dict(), optimizer=OPTIM, learned_rotations={"lr": 0.5},
                  freeze_embeddings=True)
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[last])
    trainer.fit(m, datamodule(corpus))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert any("learned_rotation" in k for k in state) and any("parametrizations" in k for k in state)
    run_export("tiny", str(tmp_path / "native"), format="native", quant="w4a4_kv4_rot",
               checkpoint=str(tmp_path / "ckpt" / "last.ckpt"), tiny=TINY["tiny"])
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = m.model.eval()(ids).logits
        got = qat.export.load_any(tmp_path / "native")(ids).logits
    assert torch.equal(got, expect)
