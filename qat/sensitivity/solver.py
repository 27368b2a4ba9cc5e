"""The solver: one candidate per module minimising the summed score under a budget of storage bits, with ties.

Tied modules take one candidate together (a runtime fuses them: q/k/v, gate/up; the experts of one GGUF tensor
are one module already), so a tie group is one item whose options are the candidates that fit every member, at
the members' summed bits and scores. Choosing one option per group under a budget is a multiple-choice knapsack;
it is solved exactly by dynamic programming over the Pareto front of (bits, score) of the groups taken so far:
a partial choice that costs more bits and scores no better than another is dropped, and nothing else is. Costs
are integers (storage bits), so the budget holds exactly. At the sizes here (hundreds of groups, ~10 options)
the front stays in the tens of thousands and the solve takes well under a second or a few.

    choice = solve(table, budget_bits(table, bits_per_weight=4.5), ties=DEFAULT_TIES)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from qat.errors import ConfigError
from qat.sensitivity.scores import ScoreTable

DEFAULT_TIES = (r"(.*\.self_attn)\.[qkv]_proj", r"(.*\.mlp)\.(?:gate|up)_proj")
"""Regexes (re.fullmatch on module names) whose first group names a tie: q/k/v of one attention, gate/up of one MLP."""


def tie_groups(names: Sequence[str], ties: Iterable[str] = DEFAULT_TIES) -> list[list[str]]:
    """Partition module `names` into tie groups (in first-appearance order): two modules are tied when one tie
    regex fullmatches both with the same first group (or whole match, without groups).

    Raises:
        ConfigError: a bad regex, naming it.
    Example:
        >>> tie_groups(["l.0.self_attn.q_proj", "l.0.self_attn.k_proj", "l.0.mlp.down_proj"])
        [['l.0.self_attn.q_proj', 'l.0.self_attn.k_proj'], ['l.0.mlp.down_proj']]
    """
    if isinstance(ties, str):
        raise ConfigError(f"ties={ties!r}; give a list of regexes (e.g. ['(.*\\.mlp)\\.(?:gate|up)_proj'])")
    compiled = []
    for i, t in enumerate(ties):
        try:
            compiled.append(re.compile(t))
        except (re.error, TypeError) as err:
            raise ConfigError(f"ties[{i}]={t!r}: not a regex ({err})") from None
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        key = ("", name)
        for i, pattern in enumerate(compiled):
            m = pattern.fullmatch(name)
            if m:
                key = (str(i), m.group(1) if pattern.groups else m.group(0))
                break
        groups.setdefault(key, []).append(name)
    return list(groups.values())


@dataclass
class Solution:
    """The chosen candidate of every module, and what the choice costs and scores."""

    choice: dict[str, str]
    bits: int
    score: float
    budget_bits: int
    params: int

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params


def group_options(table: ScoreTable, groups: list[list[str]]) -> list[dict[str, tuple[int, float]]]:
    """For each group: {candidate: (summed bits, summed score)} over the candidates every member fits.

    Raises:
        ConfigError: a tie group whose members share no candidate.
    """
    by_name = {m.name: m for m in table.modules}
    out, bad = [], []
    for group in groups:
        common = [c for c in by_name[group[0]].bits if all(c in by_name[n].bits for n in group)]
        if not common:
            bad.append(", ".join(group))
        out.append({c: (sum(by_name[n].bits[c] for n in group), sum(by_name[n].scores.get(c, 0.0) for n in group))
                    for c in common})
    if bad:
        raise ConfigError("tied modules with no candidate that fits them all (untie them in `ties`):\n"
                          + "\n".join(f"  - {b}" for b in bad))
    return out


def pareto_solve(options: list[dict[str, tuple[int, float]]], budget: int) -> tuple[list[str], int, float]:
    """Exact multiple-choice knapsack: one key per item of `options` ({key: (cost, score)}), minimising the
    summed score with summed cost <= `budget`; ties broken toward fewer bits, then menu order.

    Returns:
        (chosen keys, total cost, total score).
    Raises:
        ConfigError: no choice fits the budget, naming the smallest possible cost.
    """
    least = sum(min(c for c, _ in opts.values()) for opts in options)
    if least > budget:
        raise ConfigError(f"budget of {budget} bits is below the smallest layout the menu allows ({least} bits)")
    cost, score = np.zeros(1, np.int64), np.zeros(1, np.float64)
    trail = []  # per item: (parent index, option index) of each front point
    # the cheapest completion of the items still to come: a point that cannot fit them is dropped early
    rest = np.cumsum([min(c for c, _ in opts.values()) for opts in options][::-1])[::-1].tolist() + [0]
    for i, opts in enumerate(options):
        keys = list(opts)
        oc = np.array([opts[k][0] for k in keys], np.int64)
        os_ = np.array([opts[k][1] for k in keys], np.float64)
        c = (cost[:, None] + oc[None, :]).ravel()
        s = (score[:, None] + os_[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(keys))
        option = np.tile(np.arange(len(keys)), len(cost))
        keep = c + rest[i + 1] <= budget
        c, s, parent, option = c[keep], s[keep], parent[keep], option[keep]
        order = np.lexsort((option, s, c))  # by cost, then score, then menu order
        c, s, parent, option = c[order], s[order], parent[order], option[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], s[:-1]]))
        front = s < best_before  # strictly better than every cheaper (or equal-cost, earlier) point
        cost, score = c[front], s[front]
        trail.append((parent[front], option[front], keys))
    best = int(np.argmin(score))  # the first minimum: the cheapest of equal scores
    total_cost, total_score = int(cost[best]), float(score[best])
    chosen, idx = [], best
    for parent, option, keys in reversed(trail):
        chosen.append(keys[int(option[idx])])
        idx = int(parent[idx])
    return chosen[::-1], total_cost, total_score


def budget_bits(table: ScoreTable, bits_per_weight: float | None = None, nbytes: int | None = None) -> int:
    """The budget in storage bits of the scored modules, from bits per weight or bytes (exactly one).

    Raises:
        ConfigError: neither or both given, or a value that is not a positive number.
    """
    if (bits_per_weight is None) == (nbytes is None):
        raise ConfigError(f"budget: give exactly one of budget.bits_per_weight or budget.bytes "
                          f"(got bits_per_weight={bits_per_weight!r}, bytes={nbytes!r})")
    if bits_per_weight is not None:
        if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, (int, float)) or not (
                math.isfinite(bits_per_weight) and bits_per_weight > 0):
            raise ConfigError(f"budget.bits_per_weight={bits_per_weight!r}; must be a positive number")
        return int(math.floor(bits_per_weight * table.params + 1e-9))
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ConfigError(f"budget.bytes={nbytes!r}; must be a positive integer")
    return 8 * nbytes


def solve(table: ScoreTable, budget: int, ties: Iterable[str] = DEFAULT_TIES,
          allowed: Iterable[str] | None = None) -> Solution:
    """The exact best layout of `table` within `budget` storage bits (see the module docstring).

    Args:
        table: the scores (`ScoreTable.load` works: no model needed).
        budget: storage bits of the scored modules (`budget_bits`).
        ties: tie regexes (`tie_groups`).
        allowed: candidate names to choose from (default: every candidate of the table).
    Raises:
        ConfigError: an unknown candidate in `allowed`, tied modules sharing no candidate, an infeasible budget.
    Example:
        >>> sol = solve(ScoreTable.load("scores.json"), budget_bits(table, 4.5))
    """
    if allowed is not None:
        allowed = list(allowed)
        unknown = sorted(set(allowed) - set(table.candidates))
        if unknown:
            raise ConfigError(f"candidates={unknown} not in the scores' menu; choose from {sorted(table.candidates)}")
        table = restrict(table, allowed)
    groups = tie_groups([m.name for m in table.modules], ties)
    options = group_options(table, groups)
    least = sum(min(c for c, _ in opts.values()) for opts in options)
    if least > budget:
        raise ConfigError(f"budget of {budget} bits ({budget / max(table.params, 1):.4f} bits per weight) is below the "
                          f"smallest layout the menu allows: {least} bits ({least / max(table.params, 1):.4f} bits per "
                          "weight); raise the budget or add smaller candidates to the menu")
    chosen, bits, score = pareto_solve(options, budget)
    choice = {name: cand for group, cand in zip(groups, chosen) for name in group}
    choice = {m.name: choice[m.name] for m in table.modules}
    return Solution(choice, bits, score, budget, table.params)


def restrict(table: ScoreTable, allowed: list[str]) -> ScoreTable:
    """A copy of `table` offering only the `allowed` candidates."""
    modules = []
    for m in table.modules:
        bits = {c: b for c, b in m.bits.items() if c in allowed}
        modules.append(type(m)(m.name, m.shape, bits, {c: s for c, s in m.scores.items() if c in bits}, m.gguf))
    return ScoreTable(modules, {c: v for c, v in table.candidates.items() if c in allowed}, table.method, table.meta)
