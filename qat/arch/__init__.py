"""Architecture adapters by Hugging Face model_type (see `qat.arch.base`); one file per family in this package.

    adapter = qat.arch.get_arch(model)            # by model.config.model_type
    adapter.gguf_name("model.layers.0.mlp.down_proj.weight", n_blocks=2)   # 'blk.0.ffn_down.weight'
"""
import importlib
import pkgutil

from qat.arch.base import (ARCHS, ArchAdapter, Mapping, find_arch, get_arch, gguf_reader_arch, gguf_reader_archs,
                           model_type_of, register_arch, registered_archs, tensor_name_map)

# every module of this package registers its family: adding a family is adding its file
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ARCHS", "ArchAdapter", "Mapping", "register_arch", "get_arch", "find_arch", "registered_archs",
           "model_type_of", "gguf_reader_arch", "gguf_reader_archs", "tensor_name_map"]
