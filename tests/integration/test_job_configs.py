"""The job configs' schemas (qat.jobs.config): every shipped config passes, a misspelt key anywhere fails
before any work, naming the key, where it is and the valid ones."""
import inspect

import pytest
from hydra import compose, initialize_config_dir

from qat.data import LOADER_KEYS, CorpusConfig, corpus_from_mapping
from qat.jobs.config import DATA, SCHEMAS, check_keys, unknown_keys
from qat.recipes import CONFIG_DIR

JOB_CONFIGS = {"train": [], "ptq": [], "compare": [], "export": ["output=x"], "eval": [], "demo": [], "sensitivity": []}


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(JOB_CONFIGS))
def test_every_job_config_passes_its_schema(name):
    assert unknown_keys(_compose(name, JOB_CONFIGS[name]), SCHEMAS[name]) == []


def test_data_schema_is_the_data_modules_arguments():
    from qat.lit import TextDataModule

    params = set(inspect.signature(TextDataModule.__init__).parameters) - {"self"}
    assert params == set(CorpusConfig.__dataclass_fields__) | set(LOADER_KEYS)
    assert set(DATA) == params | {"_target_"}


@pytest.mark.parametrize("name, override, match", [
    ("ptq", "+data.blok_size=3", r"data: unknown key\(s\) \['blok_size'\]; valid keys are .*'block_size'"),
    ("ptq", "+calibration.sample=3", r"calibration: unknown key\(s\) \['sample'\]; valid keys are .*'samples'"),
    ("ptq", "+eval.splt=test", r"eval: unknown key\(s\) \['splt'\]"),
    ("ptq", "+model.tiny.layerz=1", r"model.tiny: unknown key\(s\) \['layerz'\]; valid keys are .*'num_layers'"),
    ("compare", "+qat.steps=3", r"qat: unknown key\(s\) \['steps'\]"),
    ("compare", "+titel=x", r"config: unknown key\(s\) \['titel'\]"),
    ("export", "+calibration.sample=3", r"calibration: unknown key\(s\) \['sample'\]"),
    ("eval", "+max_block=3", r"config: unknown key\(s\) \['max_block'\]"),
    ("train", "+init.calibration.sample=3", r"init.calibration: unknown key\(s\) \['sample'\]"),
    ("train", "+data.blok_size=3", r"data: unknown key\(s\) \['blok_size'\]"),
])
def test_misspelt_key_anywhere_is_named(name, override, match):
    overrides = [*JOB_CONFIGS[name], override] + (["init=gptq"] if "init." in override else [])
    with pytest.raises(ValueError, match=match):
        check_keys(_compose(name, overrides), name)


def test_every_offender_at_once():
    cfg = {"data": {"path": "x", "blok_size": 3}, "eval": {"splt": "test"}, "seeed": 1}
    with pytest.raises(ValueError) as err:
        check_keys(cfg, "ptq")
    assert str(err.value).count("unknown key") == 3


def test_unknown_schema_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"'trian'; registered: \['compare', 'demo'"):
        check_keys({}, "trian")


def test_data_node_keys_are_not_dropped_silently():
    assert corpus_from_mapping({"path": "wiki", "block_size": 32, "batch_size": 4, "_target_": "x"}).block_size == 32
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['blok_size'\]"):
        corpus_from_mapping({"path": "wiki", "blok_size": 32})


def test_ptq_job_refuses_a_misspelt_data_key_before_loading(tmp_path, monkeypatch):
    import qat.jobs.ptq
    from qat.jobs.ptq import run_ptq_job

    monkeypatch.setattr(qat.jobs.ptq, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = {"model": {"path": "tiny"}, "data": {"path": "x", "blok_size": 3}, "quant": "w4a16_g128",
           "method": {"name": "rtn"}, "calibration": {"samples": 1, "seq_len": 8}, "eval": {"split": "test"}}
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['blok_size'\]"):
        run_ptq_job(cfg, tmp_path)
