"""The bad command lines every qat CLI must refuse with one clear message, non-zero exit and no traceback.

Shared by tests/cli/test_bad_inputs.py (in-process, fast) and scripts/fuzz_cli.py (real subprocesses).
Each case is (app, argv, expected): `expected` is a substring of the message (a key, a file name, a valid value).
CASES: any bad input; HYDRA_CASES: command lines Hydra itself refuses, each held to exactly one line.
"{tmp}" in argv stands for a scratch folder prepared by `make_files`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import traceback
from pathlib import Path

APPS = {"demo": "qat-demo", "train": "qat-train", "ptq": "qat-ptq", "compare": "qat-compare", "eval": "qat-eval",
        "export": "qat-export", "assets": "qat-assets", "sensitivity": "qat-sensitivity"}

# every Hydra app runs in {tmp}/run (its outputs never land in the checkout); tiny models, fixture data
RUN = ["hydra.run.dir={tmp}/run", "hydra.sweep.dir={tmp}/sweep"]
EXP = ["model=tiny", "output={tmp}/out.gguf", "format=gguf"]
EV = ["model=tiny", "data=fixture"]
TR = ["trainer.max_steps=1"]
CMP = ["methods=[rtn]", "quants=[w4a16_g128]"]


def _cases() -> list[tuple[str, list[str], str]]:
    c: list[tuple[str, list[str], str]] = []
    add = lambda app, argv, expected: c.append((app, argv, expected))  # noqa: E731

    # Hydra's own errors, each app: unknown key, bad override syntax, unknown group option, misspelt nested key
    for app, base in (("demo", []), ("train", TR), ("ptq", []), ("compare", CMP), ("eval", EV), ("export", EXP)):
        add(app, base + ["nosuchkey=1"], "nosuchkey")
        add(app, base + ["quant=[w4"], "[w4")
        add(app, base + ["quant=no_such_recipe"], "no_such_recipe")
        add(app, base + ["quant={tmp}/no_such_recipe.yaml"], "no_such_recipe.yaml")  # quant=<path>: the file's
        add(app, base + ["quant={tmp}/broken_recipe.yaml"], "not valid YAML")         # own checks, before Hydra
        add(app, base + ["quant={tmp}/bits17_recipe.yaml"], "quant.weight.bits=17")
        add(app, base + ["quant={tmp}/notok"], "notok is a directory; give a recipe YAML file")
        add(app, base + ["quant={tmp}/c,d.yaml"], "a comma separates sweep values in Hydra")
        add(app, base + ["+model.tiny.layerz=4" if app != "demo" else "+tiny.layerz=4"], "layerz")
        add(app, base + ["seed=${oc.env:QAT_NO_SUCH_VARIABLE_X}"], "QAT_NO_SUCH_VARIABLE_X")

    # qat-demo: sizes a Llama cannot have, tokens, recipe values
    for key, value, expected in [("tiny.num_heads", 0, "tiny.num_heads"), ("tiny.hidden_size", 100, "tiny.hidden_size"),
                                 ("tiny.num_kv_heads", 3, "tiny.num_kv_heads"), ("tiny.vocab_size", -1, "tiny.vocab_size"),
                                 ("tiny.num_layers", 0, "tiny.num_layers"), ("tiny.intermediate_size", "abc", "tiny.intermediate_size"),
                                 ("tiny.seed", "abc", "tiny.seed"), ("tokens", 0, "tokens"), ("tokens", -5, "tokens"),
                                 ("tokens", "abc", "tokens"), ("tokens", 100000, "tokens"),
                                 ("quant.weight.bits", 17, "bits"), ("quant.weight.bits", "abc", "bits"),
                                 ("quant.weight.group_size", 100, "group_size"), ("quant.weight.group_size", -1, "group_size")]:
        add("demo", [f"{key}={value}"], expected)
    # a node given a plain value: was a TypeError of run(**cfg.tiny)
    add("demo", ["tiny=5"], "tiny=5: must be a mapping with the keys ['dtype', 'fork_rng', 'hidden_size'")

    # qat-train: values checked before any model loads
    for over, expected in [("trainer.max_steps=-5", "max_steps"), ("trainer.max_steps=abc", "max_steps"),
                           ("optim.optimizer.lr=-1", "lr"), ("optim.optimizer.lr=abc", "lr"),
                           ("optim.optimizer.weight_decay=-1", "weight_decay"), ("optim.optimizer.betas=[2,0]", "betas"),
                           ("eval.max_blocks=0", "eval.max_blocks"), ("eval.max_blocks=-2", "eval.max_blocks"),
                           ("eval.max_blocks=abc", "eval.max_blocks"), ("eval.split=train", "eval.split"),
                           ("eval.after=maybe", "eval.after"), ("eval.baselines=2", "eval.baselines"),
                           ("data.path={tmp}/missing.txt", "missing.txt"), ("data.path={tmp}/empty.txt", "empty.txt"),
                           ("data.block_size=0", "block_size"), ("data.block_size=100000", "block_size"),
                           ("data.batch_size=0", "batch_size"), ("data.batch_size=-3", "batch_size"),
                           ("data.val_fraction=1.5", "val_fraction"), ("data.sample_by=word", "sample_by"),
                           ("model.path={tmp}/nomodel", "nomodel"), ("model.dtype=float13", "float13"),
                           ("ckpt_path={tmp}/missing.ckpt", "missing.ckpt"), ("ckpt_path={tmp}/garbage.ckpt", "garbage.ckpt"),
                           ("+init.name=nope", "nope"), ("+trainer.nosuch=1", "nosuch"),
                           ("trainer.precision=13-true", "precision"), ("module.kd={weight:2}", "kd.weight"),
                           ("module.kd={weight:0.5,teacher:nope}", "kd.teacher"), ("eval.after=no_way", "eval.after"),
                           ("module.freeze_embeddings=maybe", "freeze_embeddings"),
                           ("module.range_init_batches=-1", "range_init_batches"), ("seed=abc", "seed"),
                           ("module.learned_rotations=1.5", "module.learned_rotations=1.5; give null or a mapping"),
                           ("module.learned_rotations={lrr:1.5}", "module.learned_rotations: unknown key(s) ['lrr']"),
                           ("module.learned_rotations={lr:-1}", "module.learned_rotations.lr=-1; give a number > 0"),
                           ("module.learned_rotations={lr:abc}", "module.learned_rotations.lr='abc'"),
                           ("module.learned_rotations={momentum:1}", "module.learned_rotations.momentum=1; give a number in [0, 1)"),
                           ("module.learned_rotations={init:nope}", "module.learned_rotations.init='nope'; choose one of"),
                           ("module.learned_rotations={r1:maybe}", "module.learned_rotations.r1='maybe'; choose true or false"),
                           ("module.learned_rotations={r2:2}", "module.learned_rotations.r2=2; choose true or false"),
                           ("module.learned_rotations={}", "module.learned_rotations={} turns nothing on; give null"),
                           ("module.learned_rotations={alone:-1}", "module.learned_rotations.alone=-1; give a whole number"),
                           ("module.learned_rotations={alone:1000000}", "module.learned_rotations.alone=1000000 with trainer.max_steps="),
                           ("module.lean_ste=maybe", "lean_ste"),
                           ("trainer._target_=nosuch.Trainer", "trainer: cannot import _target_ 'nosuch.Trainer'"),
                           ("optim.optimizer._target_=torch.optim.Adamm", "cannot import _target_ 'torch.optim.Adamm'")]:
        add("train", TR + [over], expected)
    # learned rotations under a sharding strategy: refused before any model loads, naming both keys
    add("train", TR + ["trainer=fsdp", "module.learned_rotations={lr:1.5}"],
        "module.learned_rotations with trainer.strategy=qat.lit.parallel.FSDP2Strategy: a sharded strategy")
    add("train", TR + ["+trainer.strategy=deepspeed_stage_3", "module.learned_rotations={r2:false}"],
        "module.learned_rotations with trainer.strategy=deepspeed_stage_3: a sharded")
    # a PTQ initialisation writes weights a learned rotation computes (W @ R): refused, as its solution would be lost
    add("train", TR + ["init=gptq", "module.learned_rotations={lr:1.5}"],
        "init=gptq with module.learned_rotations: the PTQ initialisation solves the weights the rotations parametrize")
    add("train", TR + ["init=gptq", "~quant"], "quant")
    add("train", TR + ["quant=null"], "quant=null: quant is set by default ('w4a16_g128'); choose from")
    add("ptq", ["quant=null"], "quant=null: quant is set by default ('w4a16_g128'); choose from")
    # a Hugging Face folder of config.json + weights only: transformers would build a 1-token tokenizer (it said
    # "only 48 tokens" long after); refused naming the folder and data.tokenizer= before anything loads
    add("train", TR + ["model.path={tmp}/weights_only"], "weights_only: no tokenizer could be loaded")
    add("ptq", ["model.path={tmp}/weights_only"], "weights_only: no tokenizer could be loaded")
    add("compare", CMP + ["model.path={tmp}/weights_only"], "data.tokenizer=")
    add("eval", EV + ["model.path={tmp}/weights_only"], "pass tokenizer=")
    # another model's tokenizer: its ids index past the embedding table (an IndexError deep in the forward before)
    add("ptq", ["model.path={tmp}/weights_only", "data.tokenizer={tmp}/wide_tokenizer", "method=rtn",
                "calibration.samples=8"],
        "gives token id 575, but the model")
    add("eval", EV + ["model.path={tmp}/weights_only", "tokenizer={tmp}/wide_tokenizer"], "embedding rows")

    # qat-ptq
    # configs/method holds qat-compare's rows too: qat-ptq lists only its PTQ methods
    add("ptq", ["method=nope"], "method=nope: no such method option; choose one of awq, gptq, rtn, smoothquant")
    for over, expected in [("+method.nosuch=1", "nosuch"), ("method.actorder=maybe", "actorder"),
                           ("calibration.samples=0", "calibration.samples"), ("calibration.samples=abc", "calibration.samples"),
                           ("calibration.seq_len=-1", "calibration.seq_len"), ("eval.max_blocks=0", "eval.max_blocks"),
                           ("eval.max_blocks=-2", "eval.max_blocks"), ("eval.split=bogus", "eval.split"),
                           ("eval.batch_size=0", "eval.batch_size"), ("save=no_way", "save"), ("save=2", "save"),
                           ("progress=maybe", "progress"), ("export=zip", "zip"), ("data.path={tmp}/empty.txt", "empty.txt"),
                           ("data.path={tmp}/missing.txt", "missing.txt"), ("model.path={tmp}/nomodel", "nomodel"),
                           ("data.block_size=0", "block_size"), ("seed=abc", "seed"), ("quant.weight.bits=1", "bits"),
                           ("method.damp=-1", "damp"), ("calibration.split=bogus", "bogus")]:
        add("ptq", [over], expected)
    # an export format that cannot hold the recipe's schemes: refused before quantizing (the writer's own check)
    add("ptq", ["method=rtn", "quant=w8a8_static", "export=compressed_tensors"], "static input scheme")
    add("ptq", ["method=qat_gptq"], "method: name qat (configs/method/qat*.yaml) is a qat-compare row, not a PTQ method; qat-ptq runs awq, gptq")
    add("ptq", ["method=fp"], "qat-eval model=<model> evaluates the float model")
    add("sensitivity", ["seed=abc"], "seed='abc'")
    add("ptq", ["method=rtn", "quant=mxfp4", "export=gptq"], "GPTQ needs int bits")
    add("ptq", ["distributed.processes=4096"], "CPU core(s) this host lets qat use; choose 1..")  # before spawning
    # the device: a name torch does not take here, a CUDA device no host has (refused on a GPU host too)
    add("ptq", ["device=gpu"], "device='gpu'; choose auto, cpu, cuda or cuda:N")
    add("ptq", ["device=cuda:99"], "device='cuda:99'")
    add("ptq", ["device=7"], "device=7; choose auto, cpu, cuda or cuda:N")
    # a constructor's ConfigError (QATModule's prepare): its own line, not after Hydra's "Error in call to target"
    add("train", TR + ["quant=gguf_tq2_0_lsq", "quant.gguf_fallback=false"], "qat-train: error: cannot prepare the "
        "model: 12 module(s) on the GGUF TQ2_0 grid have rows of 128 columns, not a multiple of its 256-wide blocks "
        "(model.layers.0.self_attn.q_proj, ")

    # qat-compare
    for over, expected in [("methods=[nope]", "nope"), ("quants=[nope]", "nope"), ("results=[{tmp}/notes.txt]", "notes.txt"),
                           ("results=[{tmp}/abc.json]", "ppl"), ("results=[{tmp}/missing.json]", "missing.json"),
                           ("results=[{tmp}/list.json]", "list.json"), ("eval.max_blocks=0", "eval.max_blocks"),
                           ("calibration.samples=0", "calibration.samples"), ("fail_on_error=maybe", "fail_on_error"),
                           ("methods=[{label:x}]", "name"), ("eval.split=bogus", "eval.split"),
                           ("quants=[]", "quants"), ("methods=[]", "methods")]:
        add("compare", CMP + [over], expected)
    add("compare", ["-m", "method=nope", "quant=w4a16_g128"], "nope")
    add("compare", ["-m", "method=gptq", "quant=w4a16_g128", "calibration.samples=0"], "calibration.samples")
    add("compare", ["-m", "method=rtn,gptq", "quant=w4a16_g128", "eval.max_blocks=-1"], "eval.max_blocks")
    add("compare", CMP + ["device=tpu"], "device='tpu'; choose auto, cpu, cuda or cuda:N")
    add("compare", ["-m", "method=rtn", "quant=w4a16_g128", "device=cuda:99"], "device='cuda:99'")

    # qat-eval
    for over, expected in [("model.path={tmp}/nomodel", "nomodel"),
                           ("max_blocks=0", "max_blocks"), ("max_blocks=-2", "max_blocks"), ("max_blocks=abc", "max_blocks"),
                           ("split=bogus", "split"), ("max_new_tokens=-1", "max_new_tokens"),
                           ("data.path={tmp}/empty.txt", "empty.txt"), ("data.path={tmp}/missing.txt", "missing.txt"),
                           ("tokenizer={tmp}/notok", "notok"), ("model.dtype=float13", "float13"),
                           ("data.block_size=0", "block_size"), ("quant=w8a8_static", "static"),
                           ("model.path={tmp}/garbage.gguf", "garbage.gguf"),
                           ("tasks=[qat_tiny_lambda]", "qat_tiny_lambda"),
                           ("tasks=[qat_tiny_ppl] harness.limit=-3", "harness.limit"),
                           ("tasks=[qat_tiny_ppl] harness.limit=2.5", "harness.limit"),
                           ("tasks=[qat_tiny_ppl] harness.batch_size=0", "harness.batch_size"),
                           ("device=tpu", "device='tpu'; choose auto, cpu, cuda or cuda:N"),
                           ("device=cuda:99", "device='cuda:99'"),
                           ("~data max_new_tokens=0", "nothing to evaluate"), ("~data prompt=null", "nothing to evaluate")]:
        add("eval", EV + over.split(" "), expected)

    # qat-export
    for over, expected in [("format=zip", "zip"), ("gguf_type=Q9_9", "Q9_9"), ("gguf_type=q4_k_m", "Q4_K_M"), ("overwrite=no output={tmp}/existing.gguf", "existing.gguf"),
                           ("overwrite=maybe", "overwrite"), ("gguf_pure=no_way", "gguf_pure"), ("gguf_pure=2", "gguf_pure"),
                           ("output=???", "output"), ("output={tmp}/existing.gguf", "existing.gguf"),
                           ("checkpoint={tmp}/missing.ckpt", "checkpoint"),
                           ("quant=w4a16_g128 checkpoint={tmp}/missing.ckpt", "missing.ckpt"),
                           ("imatrix=calibrate", "data"), ("imatrix={tmp}/notes.txt", "imatrix"),
                           ("model.path={tmp}/nomodel", "nomodel"), ("tokenizer={tmp}/notok", "notok"),
                           ("model.dtype=float13", "float13"), ("output={tmp}/existing", "existing"),
                           ("imatrix=calibrate data=fixture calibration.samples=abc", "calibration.samples"),
                           ("imatrix=calibrate data=fixture calibration.seq_len=1", "calibration.seq_len"),
                           ("quant=w8a8_static", "static"), ("output={tmp}/notes.txt/out.gguf", "not writable")]:
        add("export", EXP + over.split(" "), expected)
    add("export", ["model=tiny", "format=native", "output={tmp}/existing", "overwrite=no"], "existing")
    add("export", ["model=tiny", "format=native", "output={tmp}/existing.gguf"], "existing.gguf")
    add("export", ["model=tiny", "format=native", "output={tmp}/nat"], "quant")
    add("export", ["model=tiny", "quant=gguf_q4_k", "format=compressed_tensors", "output={tmp}/ct"], "fp8_block")
    add("export", ["model=tiny", "quant=w4a8_kv4_rot", "quant.input.clip_ratio=0.9", "format=compressed_tensors",
                   "output={tmp}/ct"], "clips its dynamic input scheme (int8 sym per_token dyn clip0.9")
    add("export", ["model=tiny", "quant=w4a16_g128", "checkpoint={tmp}/garbage.ckpt", "format=native",
                   "output={tmp}/nat"], "garbage.ckpt")

    # qat-sensitivity: refused before any model loads
    for over, expected in [("mode=nope", "mode='nope'"), ("mode=solve", "mode=solve needs scores="),
                           ("menu=gguf quant=w8a8", "cannot combine with the GGUF candidate(s)"),
                           ("quant=w4a16_g128_mixed", "quant.overrides[0].weight"), ("name=a/b", "name="),
                           ("candidates=[nope]", "not in the menu"), ("menu=nope", "nope"),
                           ("device=mps", "device='mps'; choose auto, cpu, cuda or cuda:N"),
                           ("device=cuda:99", "device='cuda:99'")]:
        add("sensitivity", over.split(" "), expected)

    # qat-assets (argparse)
    add("assets", ["--verify", "--cache", "{tmp}/nonexistent"], "nonexistent")
    add("assets", ["--verify", "--cache", "{tmp}/notes.txt"], "notes.txt")
    add("assets", ["--only", "nope"], "nope")
    add("assets", ["--bogus"], "--bogus")
    return c


CASES = _cases()

HYDRA_APPS = {"demo": [], "train": TR, "ptq": [], "compare": CMP, "eval": EV, "export": EXP, "sensitivity": []}
# the sweep of a multirun: qat-compare's -m runs one job per method x quant (its methods / quants lists are for a
# plain run); the others sweep quant itself
SWEEP = {"compare": ["method=rtn"]}
INTERPOLATED = {"demo": "tokens", "export": "gguf_type"}  # the key given a bad interpolation (default data.block_size)


def _hydra_cases() -> list[tuple[str, list[str], str]]:
    """Command lines Hydra refuses before any task runs (and a few with one value error the task refuses): each must
    be one "<app>: error: ..." line naming the override (and the valid options of a group), exit 2, and show no
    traceback nor Hydra's HYDRA_FULL_ERROR advice.
    Every Hydra app gets the common ones; qat-ptq (and a few on qat-train) every kind."""
    c: list[tuple[str, list[str], str]] = []
    for app, base in HYDRA_APPS.items():
        c += [(app, base + ["quant=nosuch"], "quant=nosuch: no such recipe; choose one of ct_w4a16, "),
              (app, base + ["qunt=w4a16_g128"], "qunt=w4a16_g128: no such key 'qunt' (did you mean quant"),
              (app, base + ["a=b=c"], "a=b=c: not a valid override (mismatched input '='"),
              (app, ["-m", *base, *SWEEP.get(app, []), "quant=w4a16_g128,nosuch"], "quant=nosuch: no such recipe"),
              (app, base + ["hydra/launcher=nosuch"], "hydra/launcher=nosuch: no such hydra/launcher option; "
                                                      "choose one of basic")]
    for argv, expected in [
            (["modle=tiny"], "modle=tiny: no such key 'modle' (did you mean model?); the keys here: calibration, "),
            (["quant="], "quant=: no recipe given; choose one of"),
            (["model="], "model=: no model option given; choose one of smollm2_135m, tiny"),
            (["data=nosuch"], "data=nosuch: no such data option; choose one of fixture, shakespeare, wiki"),
            (["quant=[w4a16_g128"], "quant=[w4a16_g128: not a valid override"),
            (["hydra.run.dir={tmp}/run]"], "not a valid override"),
            (["seed={"], "seed={: not a valid override"),
            (["quant=w4a16_g128,w8a8"], "add -m (--multirun)"),
            (["+seed=1"], "+seed=1: seed is already in the config; set it with seed=1"),
            (["+quant=w8a8"], "+quant=w8a8: quant is in the defaults list already; choose its option with quant=w8a8"),
            (["~missing"], "~missing: there is no missing in the config to delete"),
            (["~model.tiny.nosuch"], "~model.tiny.nosuch"),
            (["model.tiny.layerz=4"], "model.tiny.layerz=4: no such key 'model.tiny.layerz' (did you mean "
                                      "model.tiny.num_layers?); the keys of model.tiny: hidden_size"),
            (["hydra.nosuch=1"], "hydra.nosuch=1: no such key 'hydra.nosuch'; the keys of hydra: callbacks"),
            (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe: Value 'maybe' is not a valid bool"),
            (["hydra.output_subdir=${oc.env:QAT_NO_SUCH_VARIABLE_X}"], "hydra.output_subdir: KeyError raised while "
                                                                      "resolving interpolation: \"Environment variable "
                                                                      "'QAT_NO_SUCH_VARIABLE_X' not found\""),
            (["hydra.job.env_set.X=1"], "no such key 'hydra.job.env_set.X'; hydra.job.env_set has no keys: add one "
                                        "with +hydra.job.env_set.X=1"),
            (["--config-name", "nosuch"], "--config-name=nosuch: no such config"),
            (["--bogus"], "unrecognized arguments: --bogus"),
            (["--info", "quant=nosuch"], "argument --info/-i: invalid choice: 'quant=nosuch'"),
            (["-m", "--cfg", "job"], "Only one of --run, --multirun, --cfg"),
            (["--help", "quant=nosuch"], "quant=nosuch: no such recipe"),
            (["--cfg", "job", "quant=nosuch"], "quant=nosuch: no such recipe"),
            # Hydra printed "# @package data" before --resolve failed, and its own line (exit 1) for a bad package
            (["--cfg", "job", "--resolve", "--package", "data", "data.block_size=${nope}"],
             "qat-ptq: error: data.block_size: Interpolation key 'nope' not found"),
            (["--cfg", "job", "--package", "nosuch"], "qat-ptq: error: --package nosuch: --cfg job has no such node; "
             "give a key of it (a.b for a nested one): calibration, data, device, "),
            (["--cfg", "hydra", "-p", "hydra.nosuch"], "--package hydra.nosuch: --cfg hydra has no such node; give a "
             "key of it (a.b for a nested one): hydra")]:
        c.append(("ptq", argv, expected))
    # a field of a scheme the recipe leaves at its default is no missing key; a group of another app's config
    for argv, expected in [
            (["method=rtn", "quant.weight.scale_dtype=float16"], "quant.weight.scale_dtype=float16: the recipe leaves "
             "scale_dtype at its default; set it with +quant.weight.scale_dtype=float16"),
            (["method=rtn", "quant=w8a8_static", "quant.input.static_global=maybe"], "quant.input.static_global=maybe: "
             "the recipe leaves static_global at its default; set it with +quant.input.static_global=maybe"),
            (["method=rtn", "quant.gguf_fallback=true"], "quant.gguf_fallback=true: the recipe leaves gguf_fallback "
             "at its default; set it with +quant.gguf_fallback=true"),
            (["method=rtn", "quant=w4a16_g128", "+quant.gguf_fallback=true"], "quant.gguf_fallback=true trains the rows "
             "a GGUF super-block type cannot hold on llama.cpp's fallback type; it applies to weights on the grids"),
            (["method=rtn", "quant=w4a16_g128_mixed", "quant.overrides.0.weight.observer=mse"],
             "quant.overrides.0.weight.observer=mse: the recipe leaves observer at its default"),
            (["method=rtn", "quant.weight.scale_dtyp=fp16"], "no such key 'quant.weight.scale_dtyp' (did you mean "
             "quant.weight.scale_dtype?); the fields of a quant scheme (QuantSpec): bits, dtype, symmetric"),
            (["experiment=tiny_qat"], "experiment=tiny_qat: qat-ptq has no experiment group (it is qat-train's); its "
                                      "groups: data, method, model, paths, quant"),
            (["+experiment=tiny_qat"], "+experiment=tiny_qat: qat-ptq has no experiment group"),
            # a recipe's value errors name the user's key, not the QuantSpec class; one error is one line
            (["method=rtn", "quant.weight.bits=abc"], "qat-ptq: error: quant.weight.bits='abc'; expected an integer"),
            (["method=rtn", "quant.weight.bits="], "qat-ptq: error: quant.weight.bits=''; expected an integer"),
            (["method=rtn", "quant=w8a8_static", "+quant.input.static_global=maybe"],
             "qat-ptq: error: quant.input.static_global='maybe'; use true or false"),
            (["method=rtn", "quant=w4a8_kv4_rot", "quant.input.clip_ratio=1.5"],
             "qat-ptq: error: quant.input.clip_ratio=1.5; expected a number in (0, 1] (1: no clipping)"),
            (["method=rtn", "quant=w8a8_static", "+quant.input.clip_ratio=0.9"],
             "qat-ptq: error: quant.input.clip_ratio=0.9 clips the range each tensor of a dynamic scheme on the "
             "uniform grid (int, fp8) takes, not a held or another grid's range (int8 sym per_tensor pact)"),
            (["method=rtn", "quant=w4a16_g128_mixed", "quant.overrides.0.weight.bits=abc"],
             "qat-ptq: error: quant.overrides[0].weight.bits='abc'; expected an integer"),
            (["seed=abc"], "qat-ptq: error: seed='abc'; must be an integer >= 0")]:
        c.append(("ptq", argv, expected))
    c += [("train", TR + ["seed=abc"], "qat-train: error: seed='abc'; must be an integer >= 0"),
          ("eval", EV + ["max_blocks=0"], "qat-eval: error: max_blocks=0; must be an integer >= 1 or null"),
          ("compare", CMP + ["eval.max_blocks=0"], "qat-compare: error: eval.max_blocks=0; must be an integer >= 1"),
          ("demo", ["model=tiny"], "model=tiny: qat-demo has no model group (it is qat-compare's"),
          ("sensitivity", ["mode=solve", "scores={tmp}/nonexist.json"], "nonexist.json: no such file; give the "
                                                                        "scores.json an earlier qat-sensitivity run"),
          ("sensitivity", ["mode=solve", "scores={tmp}/notok"], "notok: a directory, not a file"),
          ("compare", ["methods=[rtn,bogus]", "quants=[w4a16_g128]"], "methods entry 'bogus': no such method; "
           "methods=[...] takes fp, awq, gptq, rtn, smoothquant; qat, qat_awq, qat_gptq run with -m: qat-compare -m"),
          ("compare", ["methods=[qat_gptq]", "quants=[w4a16_g128]"], "methods entry 'qat_gptq': a QAT method runs one "
                                                                     "job per method x scheme"),
          ("export", ["model=tiny", "quant=nvfp4_w4a4", "format=compressed_tensors", "output={tmp}/ct"],
           "qat-export: error: quant: recipe 'nvfp4_w4a4' has a static input scheme (fp4_e2m1 sym g16 nvfp4 "
           "static-global), which needs calibration (a float model quantized on load gets none); give "
           "checkpoint=<a calibrated qat-ptq / qat-train checkpoint> with it, or quantize and export in one run: "
           "qat-ptq quant=nvfp4_w4a4 export=compressed_tensors")]
    # a bad interpolation on the command line names its key and the missing node, whether Hydra resolves it
    # (--cfg job --resolve) or the job reads it
    for app, base in HYDRA_APPS.items():
        key = INTERPOLATED.get(app, "data.block_size")
        for flags in (["--cfg", "job", "--resolve"], []):
            c.append((app, flags + base + [f"{key}=${{nope}}"],
                      f"{APPS[app]}: error: {key}: Interpolation key 'nope' not found"))
    # a key below one that is not there: the missing one named, the keys of its parent listed
    c += [("export", EXP + ["data.block_size=4"], "data.block_size=4: no data option is chosen (the config leaves the "
                                                  "data group out); choose one with data=<fixture, shakespeare, wiki>"),
          ("ptq", ["model.tiny.a.b=4"], "model.tiny.a.b=4: no such key 'model.tiny.a'; the keys of model.tiny: "
                                        "hidden_size, intermediate_size")]
    c.append(("ptq", ["~data"], "calibration.seq_len: Interpolation key 'data.block_size' not found"))
    c += [("train", TR + ["modle=tiny"], "modle=tiny: no such key 'modle' (did you mean module or model?)"),
          ("train", TR + ["+trainer.max_steps=2"], "+trainer.max_steps=2: trainer.max_steps is already in the"),
          ("eval", EV + ["qunt=fp8_dynamic"], "(did you mean quant?)")]  # a group whose default is null
    return c


HYDRA_CASES = _hydra_cases()


def make_files(tmp: str | os.PathLike) -> Path:
    """The files the cases name under {tmp}: an empty corpus, a text file, bad result rows, a garbage checkpoint
    and GGUF, exports that already exist, recipe files that are not YAML / not a valid recipe, and a tiny model
    folder without tokenizer files."""
    tmp = Path(tmp)
    (tmp / "empty.txt").write_text("")
    (tmp / "notes.txt").write_text("these are notes, not JSON\n")
    row = {"method": "rtn", "quant": "w4a16_g128", "ppl": "abc", "bits_per_weight": 4.25, "size_mb": 1.0}
    (tmp / "abc.json").write_text(json.dumps(row))
    (tmp / "list.json").write_text(json.dumps([1, 2, 3]))
    (tmp / "garbage.ckpt").write_bytes(b"not a checkpoint" * 10)
    (tmp / "garbage.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    (tmp / "existing").mkdir(exist_ok=True)
    (tmp / "existing" / "keep.txt").write_text("an earlier export")
    (tmp / "existing.gguf").write_bytes(b"an earlier export")
    (tmp / "notok").mkdir(exist_ok=True)
    if not (tmp / "weights_only" / "config.json").is_file():  # a model folder without tokenizer files
        from qat.testing import tiny_model
        tiny_model("qwen2", num_layers=1).save_pretrained(tmp / "weights_only")
    if not (tmp / "wide_tokenizer" / "tokenizer.json").is_file():  # 576 ids (every word unknown: 575) for 512 rows
        _wide_tokenizer(576).save_pretrained(tmp / "wide_tokenizer")
    (tmp / "broken_recipe.yaml").write_text("name: [w4\n")
    (tmp / "bits17_recipe.yaml").write_text("name: w17\nweight: {bits: 17}\n")
    (tmp / "c,d.yaml").write_text("name: comma\nweight: {bits: 4}\n")  # Hydra reads quant=c,d.yaml as a sweep
    return tmp


def _wide_tokenizer(size: int):
    """A word-level tokenizer of `size` ids whose unknown word (every word of the corpora) is the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[UNK]")


def argv_for(argv: list[str], tmp: str | os.PathLike, app: str) -> list[str]:
    """The case's arguments with {tmp} filled in (and Hydra's run folders under it)."""
    full = [a.replace("{tmp}", str(tmp)) for a in argv]
    return full if app == "assets" else full + [a.replace("{tmp}", str(tmp)) for a in RUN]


def run_in_process(app: str, argv: list[str]) -> tuple[int, str]:
    """Run `qat.cli.<app>.main(argv)` here; returns (exit status, stdout + stderr)."""
    main = importlib.import_module(f"qat.cli.{app}").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
            code = code if isinstance(code, int) else 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=out)
        except Exception:  # noqa: BLE001 - what the interpreter would print (QAT_DEBUG / HYDRA_FULL_ERROR)
            traceback.print_exc(file=out)
            code = 1
    return code, out.getvalue()
