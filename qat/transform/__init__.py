from qat.transform.convert import convert, to_float
from qat.transform.match import matches
from qat.transform.prepare import Plan, apply_plan, plan, prepare
from qat.transform.recipe import QuantRecipe, as_recipe, load_recipe

__all__ = ["convert", "to_float", "matches", "Plan", "apply_plan", "plan", "prepare", "QuantRecipe", "as_recipe", "load_recipe"]
