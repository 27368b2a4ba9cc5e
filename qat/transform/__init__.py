from qat.transform.convert import convert, to_float
from qat.transform.match import matches
from qat.transform.prepare import Plan, plan, prepare
from qat.transform.recipe import QuantRecipe, as_recipe, load_recipe

__all__ = ["convert", "to_float", "matches", "Plan", "plan", "prepare", "QuantRecipe", "as_recipe", "load_recipe"]
