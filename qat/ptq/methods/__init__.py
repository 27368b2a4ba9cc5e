"""PTQ methods by name (see `qat.ptq.methods.base`); one file per algorithm in this package.

    cls = qat.ptq.methods.get_method("gptq"); cls.Config(actorder=True)
"""
import importlib
import pkgutil

from qat.ptq.methods.base import (METHODS, PTQMethod, distributed_methods, get_method, method_of_config,
                                  register_method)

# every module of this package registers its method: adding an algorithm is adding its file (and its YAML)
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "PTQMethod", "register_method", "get_method", "method_of_config", "distributed_methods"]
