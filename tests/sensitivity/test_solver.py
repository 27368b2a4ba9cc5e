"""The solver is exact (checked against brute force on small random problems), keeps tied modules together and
never exceeds the budget; a saved table re-solves with no model."""
from __future__ import annotations

import itertools
import random

import pytest

from qat.errors import BadFileError, ConfigError
from qat.sensitivity import ModuleEntry, ScoreTable, budget_bits, pareto_solve, solve, tie_groups


def _brute(options, budget):
    best = None
    for combo in itertools.product(*[list(o) for o in options]):
        cost = sum(o[k][0] for o, k in zip(options, combo))
        score = sum(o[k][1] for o, k in zip(options, combo))
        if cost <= budget and (best is None or score < best[0] - 1e-12):
            best = (score, cost, combo)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_pareto_solve_equals_brute_force(seed):
    rng = random.Random(seed)
    options = []
    for _ in range(rng.randint(1, 6)):
        keys = rng.sample("abcdefg", rng.randint(1, 4))
        # some equal costs and equal scores on purpose: ties in the front must be handled
        options.append({k: (rng.choice([3, 5, 8, 8, 13, 21]) * rng.randint(1, 3), rng.choice([0.0, 1.0, rng.random()]))
                        for k in keys})
    lo = sum(min(c for c, _ in o.values()) for o in options)
    hi = sum(max(c for c, _ in o.values()) for o in options)
    budget = rng.randint(lo, hi)
    chosen, cost, score = pareto_solve(options, budget)
    best = _brute(options, budget)
    assert cost <= budget
    assert score == pytest.approx(best[0], abs=1e-9)
    assert cost == sum(o[k][0] for o, k in zip(options, chosen))
    assert score == pytest.approx(sum(o[k][1] for o, k in zip(options, chosen)))


def _table(rng, layers=2):
    """A random table shaped like a decoder: q/k/v, o, gate/up, down per layer; candidates a..d, some not fitting."""
    modules = []
    for i in range(layers):
        for part, n in [("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32),
                        ("self_attn.o_proj", 64), ("mlp.gate_proj", 128), ("mlp.up_proj", 128), ("mlp.down_proj", 128)]:
            bits = {"a": 2 * n + 8, "b": 4 * n + 8, "c": 8 * n + 8, "f": 16 * n}
            if rng.random() < 0.2:
                bits.pop("b")  # a candidate that does not fit this module
            scores = {k: (0.0 if k == "f" else rng.random() * 2 ** -bits[k] * 2 ** 10 * rng.random()) for k in bits}
            modules.append(ModuleEntry(f"model.layers.{i}.{part}", (4, n // 4), bits, scores))
    return ScoreTable(modules, {k: {"weight": None, "gguf_type": None} for k in "abcf"}, "random")


def _brute_modules(table, budget, ties):
    groups = tie_groups([m.name for m in table.modules], ties)
    by = {m.name: m for m in table.modules}
    options = [{c: (sum(by[n].bits[c] for n in g), sum(by[n].scores[c] for n in g))
                for c in by[g[0]].bits if all(c in by[n].bits for n in g)} for g in groups]
    return _brute(options, budget)


@pytest.mark.parametrize("seed", range(6))
def test_solve_with_ties_is_optimal_and_within_budget(seed):
    rng = random.Random(100 + seed)
    table = _table(rng, layers=1)
    ties = [r"(.*\.self_attn)\.[qkv]_proj", r"(.*\.mlp)\.(?:gate|up)_proj"]
    for bpw in (2.5, 3.0, 4.0, 6.0, 9.0):
        budget = budget_bits(table, bits_per_weight=bpw)
        sol = solve(table, budget, ties)
        assert sol.bits <= budget and sol.bits == sum(m.bits[sol.choice[m.name]] for m in table.modules)
        for a, b in [("q_proj", "k_proj"), ("q_proj", "v_proj"), ("gate_proj", "up_proj")]:
            assert sol.choice[f"model.layers.0.{'mlp' if 'up' in b else 'self_attn'}.{a}"] == \
                   sol.choice[f"model.layers.0.{'mlp' if 'up' in b else 'self_attn'}.{b}"]
        assert sol.score == pytest.approx(_brute_modules(table, budget, ties)[0], abs=1e-12)


def test_budget_is_exact_and_bytes_work():
    table = _table(random.Random(7), layers=2)
    sol = solve(table, budget_bits(table, bits_per_weight=4.0))
    # a budget of exactly the chosen bits keeps that layout; one bit less must change it
    again = solve(table, sol.bits)
    assert again.bits == sol.bits and again.score == pytest.approx(sol.score)
    less = solve(table, sol.bits - 1)
    assert less.bits <= sol.bits - 1 and less.score >= sol.score
    assert budget_bits(table, nbytes=1000) == 8000
    least = sum(min(m.bits.values()) for m in table.modules)
    assert solve(table, least).bits == least
    with pytest.raises(ConfigError, match="smallest layout"):
        solve(table, least - 1, ties=[])


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"), ({"bits_per_weight": 4, "nbytes": 5}, "exactly one"),
    ({"bits_per_weight": -1}, "budget.bits_per_weight"), ({"bits_per_weight": "4"}, "budget.bits_per_weight"),
    ({"nbytes": 0}, "budget.bytes"), ({"nbytes": 1.5}, "budget.bytes"),
])
def test_bad_budgets_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        budget_bits(_table(random.Random(1)), **kwargs)


def test_ties_and_candidates_are_checked():
    table = _table(random.Random(3))
    with pytest.raises(ConfigError, match=r"ties\[0\]"):
        solve(table, 10 ** 9, ["(["])
    with pytest.raises(ConfigError, match="not in the scores' menu"):
        solve(table, 10 ** 9, allowed=["zzz"])
    only = solve(table, 10 ** 9, allowed=["a", "f"])
    assert set(only.choice.values()) <= {"a", "f"}


def test_saved_table_resolves_the_same(tmp_path):
    table = _table(random.Random(11), layers=3)
    table.save(tmp_path / "scores.json")
    loaded = ScoreTable.load(tmp_path / "scores.json")
    for bpw in (3.0, 5.0):
        a, b = solve(table, budget_bits(table, bpw)), solve(loaded, budget_bits(loaded, bpw))
        assert a.choice == b.choice and a.bits == b.bits


def test_damaged_score_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BadFileError, match="not a scores JSON"):
        ScoreTable.load(bad)
    bad.write_text('{"version": 1, "modules": [{"name": "x"}]}')
    with pytest.raises(BadFileError, match="not a qat-sensitivity scores file"):
        ScoreTable.load(bad)
