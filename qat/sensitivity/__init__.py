"""Sensitivity analysis and automatic mixed precision under a size budget.

Score every (module, candidate format) once (`score_model`: Fisher by default, Hutchinson Hessian trace and
measured KL for checking; one file per method, registered by name in `SCORERS`), save the scores (`ScoreTable`,
JSON), and solve for a budget in bits per weight or bytes (`solve`: exact, with ties) as often as wanted without
the model. The layout becomes a recipe (`to_recipe`), GGUF per-tensor types and `llama-quantize` arguments.

    menu = build_menu({"int4": {"weight": {...}}, "int8": {...}, "float": {"weight": None}})
    table = score_model(model, menu, batches)          # or ScoreTable.load("scores.json")
    table = score_model(model, menu, batches, base="w4a8_kv8")   # scored with A8 / KV8, the recipe keeps them
    sol = solve(table, budget_bits(table, bits_per_weight=4.5))
    qat.prepare(model, to_recipe(sol, table))
"""
from qat.sensitivity import fisher, hutchinson, kl  # noqa: F401  (register the scorers)
from qat.sensitivity.base import apply_context, check_base
from qat.sensitivity.layout import (gguf_tensor_types, llama_quantize_args, markdown_table, plot_report,
                                    report_rows, to_recipe, write_recipe)
from qat.sensitivity.menu import Candidate, build_menu
from qat.sensitivity.scores import (SCORERS, ModuleEntry, Scorer, ScoreTable, build_scorer, quantized_weight,
                                    register_scorer, score_model, target_modules)
from qat.sensitivity.solver import DEFAULT_TIES, Solution, budget_bits, pareto_solve, solve, tie_groups

__all__ = ["apply_context", "check_base", "Candidate", "build_menu", "SCORERS", "ModuleEntry", "Scorer", "ScoreTable",
           "build_scorer",
           "quantized_weight", "register_scorer", "score_model", "target_modules", "DEFAULT_TIES", "Solution",
           "budget_bits", "pareto_solve", "solve", "tie_groups", "gguf_tensor_types", "llama_quantize_args",
           "markdown_table", "plot_report", "report_rows", "to_recipe", "write_recipe"]
