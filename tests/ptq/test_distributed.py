"""Distributed PTQ (`qat.ptq.distributed`): GPTQ and AWQ over 2 gloo processes, each on its share of the
calibration batches, give exactly (atol=0) the prepared state of one process, on the tiny Llama and, with the
experts' solves spread, on the tiny MoE; what cannot run distributed is refused up front."""
from __future__ import annotations

import os

import pytest
import torch

from qat import testing
from qat.errors import ConfigError
from qat.ptq import apply
from qat.ptq.distributed import Ranks, launch
from qat.ptq.methods.base import get_method
from qat.ptq.api import method_config
from qat.transform import prepare
from qat.transform.recipe import load_recipe

METHOD = {"name": "gptq", "min_tokens": 64}


def _batches(n=5, rows=2, seq=32, vocab=512, seed=1):
    """5 batches: split 3 / 2; 64 rows each, pooled below InputStats.CHUNK (the pooling stays within a batch)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(n)]


def _model():
    model = testing.tiny_llama(num_layers=2, fork_rng=True)
    return prepare(model, load_recipe("w4a16_g128_ragged"))


CASES = {  # name: (model, method, batches); 5 batches split 3 / 2, 3 batches split 2 / 1
    "gptq_llama": ("llama", METHOD, 5),
    "awq_llama": ("llama", {"name": "awq", "min_tokens": 64}, 5),
    "gptq_unstaged": ("llama", {**METHOD, "stage_cache": False}, 5),  # one block forward per stage
    "gptq_all_at_once": ("llama", {**METHOD, "true_sequential": False}, 5),  # every linear on float inputs
    "gptq_moe": ("moe", {"name": "gptq", "min_tokens": 64}, 3),
    "awq_moe": ("moe", {"name": "awq", "min_tokens": 64}, 3),
    "smoothquant_llama": ("llama_w8a8", {"name": "smoothquant", "min_tokens": 64}, 5),  # dynamic int8 inputs
    "gptq_nvfp4_w4a4": ("llama_nvfp4", METHOD, 5),  # static-global inputs: minmax ranges merged over the ranks
}


def _case_model(kind: str):
    if kind == "llama":
        return _model()
    if kind in ("llama_w8a8", "llama_nvfp4"):
        recipe = "w8a8" if kind == "llama_w8a8" else "nvfp4_w4a4"
        return prepare(testing.tiny_llama(num_layers=2, fork_rng=True), load_recipe(recipe))
    return prepare(testing.tiny_moe("qwen3_moe", num_experts=8), load_recipe("w4a16_g128"))


def quantize_cases(distributed: bool, out=None) -> dict:
    """Every case of CASES in one process (or in each rank of a group, saved to `out`/rank{r}_{case}.pt), one
    thread (the same kernels in every process): {case: state dict}, and {"ptq": {case: model.qat_ptq}}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    states, ptq = {}, {}
    try:
        for case, (kind, method, n) in CASES.items():
            model = apply(_case_model(kind), method, _batches(n), progress=False, distributed=distributed)
            states[case], ptq[case] = model.state_dict(), model.qat_ptq
            if out is not None:
                torch.save(states[case], out / f"rank{torch.distributed.get_rank()}_{case}.pt")
    finally:
        torch.set_num_threads(threads)
    return {**states, "ptq": ptq}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One launch of 2 gloo processes running every case: {case: (rank 0's state, rank 1's state, rank 0's qat_ptq)}."""
    out = tmp_path_factory.mktemp("dist")
    rank0 = launch(quantize_cases, 2, True, out)
    assert all(ptq["processes"] == 2 for ptq in rank0["ptq"].values())
    return {case: (rank0[case], torch.load(out / f"rank1_{case}.pt", weights_only=True), rank0["ptq"][case])
            for case in CASES}


@pytest.mark.filterwarnings("ignore:.*min_expert_tokens")
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(case, two_processes):
    """GPTQ (staged, unstaged, all at once), AWQ (scale and clipping searches spread, statistics combined in batch
    order) and GPTQ / AWQ through MoE experts (per-expert solves and searches spread): every tensor of both ranks
    equals the one-process run."""
    kind, method, n = CASES[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = apply(_case_model(kind), method, _batches(n), progress=False)
    finally:
        torch.set_num_threads(threads)
    one, float_state = model.state_dict(), _case_model(kind).state_dict()
    *states, ptq = two_processes[case]
    assert ptq.get("expert_tokens") == model.qat_ptq.get("expert_tokens")  # GPTQ: tokens routed to each expert
    for rank_state in states:
        assert rank_state.keys() == one.keys()
        for key, value in one.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(rank_state[key], value), (case, key)
    changed = [k for k, v in float_state.items() if isinstance(v, torch.Tensor) and not torch.equal(one[k], v)]
    if method["name"] in ("awq", "smoothquant"):  # the scales were folded into the norms
        assert any(k.endswith("post_attention_layernorm.weight") for k in changed), changed
    if method["name"] == "gptq" and kind == "llama":  # every linear of both blocks was solved
        assert sum(k.endswith("proj.weight") for k in changed) == 14, changed
    if kind == "llama_nvfp4":  # every input's global calibrated, on all 5 batches (3 on rank 0, 2 on rank 1)
        held = [k for k in one if k.endswith("input_quantizer.observer.hi")]
        assert len(held) == 14 and all(float(one[k]) > 0 for k in held)
        assert any(not torch.equal(one[k], _one_rank_range(k)) for k in held)
    if kind == "moe":  # the experts were solved / scaled
        assert sum(k.endswith("experts.down_proj") for k in changed) == 2, changed


def _one_rank_range(key: str) -> torch.Tensor:
    """The held range `key` of nvfp4_w4a4 GPTQ on rank 0's share of the batches only (3 of 5): what a rank held
    before the ranges were merged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if "rank0" not in _RANK0:
            _RANK0["rank0"] = apply(_case_model("llama_nvfp4"), METHOD, _batches(5)[:3], progress=False).state_dict()
    finally:
        torch.set_num_threads(threads)
    return _RANK0["rank0"][key]


_RANK0: dict = {}


def test_independent_runs():
    from qat.ptq.methods.awq import independent_runs
    norm, q, k, v, o, up, down = (torch.nn.Linear(2, 2) for _ in range(7))
    assert independent_runs([(norm, [q, k, v]), (v, [o]), (up, [down])]) == [[0, 1, 2]]  # Llama's: one run
    assert independent_runs([(v, [o]), (norm, [q, k, v])]) == [[0], [1]]  # v's rows divided, then read
    assert independent_runs([(norm, [q]), (q, [o])]) == [[0, 1]]  # q is written and is prev, not read


def test_kept_batches_add_up_to_one_process():
    """The sums a process keeps apart, added in batch order to the running sums, are the one-process totals bit
    for bit (Gram and sum |x|); without keep_batches there is nothing to pop."""
    from qat.ptq.stats import InputStats, calibration_batch
    xs = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    one, kept = InputStats(16, per_batch=True), InputStats(16, per_batch=True)
    kept.keep_batches()
    for i, x in enumerate(xs):
        with calibration_batch(i):
            one.update(x)
            kept.update(x)
    totals = [torch.zeros(16, 16), torch.zeros(16)]
    for sums in kept.pop_batches():
        for total, part in zip(totals, sums):
            total.add_(part)
    kept.set_sums(totals, kept.n_tokens)
    assert torch.equal(kept.gram, one.gram) and torch.equal(kept.abs_sum, one.abs_sum)
    with pytest.raises(ValueError, match="keep_batches"):
        one.pop_batches()


def test_refused_before_work():
    with pytest.raises(ConfigError, match="initialised torch.distributed"):
        apply(_model(), METHOD, _batches(), progress=False, distributed=True)
    static = prepare(testing.tiny_llama(num_layers=2, fork_rng=True), load_recipe("w8a8_static"))
    with pytest.raises(ConfigError, match=r"distributed gptq:\n  - static activation ranges"):
        get_method("gptq")(method_config(METHOD)).check_distributed(static, {})
    mlp = prepare(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64)),
                  load_recipe("w4a16_g128_ragged"))
    with pytest.raises(ConfigError, match="Sequential: no repeated decoder blocks found"):
        get_method("awq")(method_config({"name": "awq"})).check_distributed(mlp, {})
    with pytest.raises(ConfigError, match="method rtn does not run distributed .*serves awq, gptq, smoothquant"):
        apply(_model(), {"name": "rtn"}, _batches(), progress=False, distributed=True)
    with pytest.raises(ConfigError, match="distributed.processes=0"):
        launch(quantize_cases, 0, True)
    with pytest.raises(ConfigError, match="at least 4 calibration batches"):
        Ranks(0, 4).shard([1, 2])


def test_shards_and_owners():
    assert [Ranks(r, 2).shard(list(range(5))) for r in range(2)] == [[0, 1, 2], [3, 4]]
    ranks = Ranks(0, 2)
    assert ranks.owners([576 * 576, 192 * 576, 192 * 576]) == [0, 1, 1]  # q alone, k and v together
    assert ranks.owners([100]) == [1]  # a lone linear goes to the rank with less work so far


def test_qat_ptq_distributed_config_refused(monkeypatch):
    import qat.jobs.ptq
    from qat.jobs.ptq import check_processes

    monkeypatch.setattr(qat.jobs.ptq, "usable_cpus", lambda: 8)  # the cases below, on any host
    gptq = {"name": "gptq"}
    assert check_processes({"distributed": {"processes": 2}}, gptq) == 2
    assert check_processes({}, {"name": "awq"}) == 1
    with pytest.raises(ConfigError, match="distributed.processes"):
        check_processes({"distributed": {"processes": 0}}, gptq)
    with pytest.raises(ConfigError) as err:
        check_processes({"distributed": {"processes": 2}, "offload": "stream"}, {"name": "rtn"})
    assert "method='rtn' does not run distributed; use method=awq or method=gptq or method=smoothquant" in str(err.value)
    assert "offload='stream'" in str(err.value)
    assert check_processes({"distributed": {"processes": 2}}, {"name": "awq"}) == 2
    with pytest.raises(ConfigError, match="distributed.processes=N"):  # the typo distributed=2
        check_processes({"distributed": 2}, gptq)
    for key in ("stage_cache", "true_sequential"):  # both paths run distributed (CASES)
        assert check_processes({"distributed": {"processes": 2}}, {"name": "gptq", key: False}) == 2
    with pytest.raises(ConfigError, match=r"distributed.processes=3 needs at least 3 calibration batches; "
                                          r"calibration.samples=16 makes 2 \(batches of 8\)"):  # before spawning
        check_processes({"distributed": {"processes": 3}, "calibration": {"samples": 16}}, gptq)
    assert check_processes({"distributed": {"processes": 2}, "calibration": {"samples": 9}}, gptq) == 2
    # static activation ranges: minmax ones are merged over the ranks; percentile / learned (PACT) ones are refused
    # before spawning, naming the key
    assert check_processes({"distributed": {"processes": 2}, "quant": load_recipe("nvfp4_w4a4").to_dict()}, gptq) == 2
    with pytest.raises(ConfigError, match=r"static activation ranges of quant\.input are not minmax-observed .*"
                                          r"distributed\.processes=1"):
        check_processes({"distributed": {"processes": 2}, "quant": load_recipe("w8a8_static").to_dict()}, gptq)


def test_more_processes_than_cpu_cores_are_refused_before_spawning(monkeypatch):
    """distributed.processes had no upper limit: the ranks are CPU processes, each with a whole model."""
    import qat.jobs.ptq
    from qat.jobs.ptq import check_processes
    from qat.ptq.distributed import usable_cpus

    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    monkeypatch.setattr(qat.jobs.ptq, "usable_cpus", lambda: 4)
    gptq, many = {"name": "gptq"}, {"samples": 1024}
    assert check_processes({"distributed": {"processes": 4}, "calibration": many}, gptq) == 4
    with pytest.raises(ConfigError, match=r"distributed.processes=5 is more than the 4 CPU core\(s\) this host lets "
                                          r"qat use; choose 1..4"):
        check_processes({"distributed": {"processes": 5}, "calibration": many}, gptq)


def fail_on_rank1() -> None:
    """Rank 1 fails at once; rank 0 waits for it in a collective (it would wait an hour without the watcher)."""
    if torch.distributed.get_rank() == 1:
        raise RuntimeError("rank one broke")
    torch.distributed.barrier()


def test_failed_rank_stops_rank0_promptly(tmp_path):
    """A spawned rank's failure ends the launch, raised in rank 0 with the failed rank's own error (not only
    gloo's "connection reset" from rank 0's collective, and not an hour's wait for the group's timeout)."""
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "launch_fail.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
                      "from qat.ptq.distributed import launch\n"
                      "from tests.ptq.test_distributed import fail_on_rank1\n"
                      "if __name__ == '__main__':\n"
                      "    launch(fail_on_rank1, 2)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "rank one broke" in run.stderr


def test_an_existing_group_of_another_backend_is_refused(monkeypatch):
    """device=cuda (nccl) in a process whose gloo group already exists would compute on the CPU: refused, naming
    both; the group's own backend is used as it is."""
    from qat.ptq import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    with pytest.raises(ConfigError, match=r"a process group with backend gloo already exists.*compute on the CPU "
                                          r"\(device=cpu\), not on cuda"):
        distributed.init_from_env("nccl")
    assert distributed.init_from_env("gloo") is True


def test_results_sent_between_gpu_ranks_keep_their_namedtuples():
    """What travels between CUDA ranks is moved tensor by tensor (meta standing in for the GPU): a namedtuple is
    rebuilt from its fields, with its type."""
    from collections import namedtuple

    from qat.ptq import distributed

    Pair = namedtuple("Pair", "scale zero")
    moved = distributed._to(torch.device("meta"), [Pair(torch.ones(2), None), (torch.zeros(1),)], "meta")
    assert type(moved[0]) is Pair and moved[0].scale.device.type == "meta" and moved[0].zero is None
    assert type(moved[1]) is tuple and moved[1][0].device.type == "meta"
