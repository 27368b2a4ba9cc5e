"""Module matching: class names, module names (exact or dotted suffix), and "re:<regex>" patterns."""
from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from qat.errors import ConfigError
from qat.modules.experts import is_experts

EXPERTS_PATTERNS = ("Experts", "Linear")
"""Class-name patterns that also select transformers' fused-experts modules (E linear layers stored as 3-D
parameters): a recipe's `targets: [Linear]` quantizes the experts of an MoE, `Experts` names only them."""


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"bad regex in pattern 're:{pattern}': {err}") from None


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    """True when `pattern` selects the module called `name`.

    - "re:<regex>": the regex matches the whole module name (re.fullmatch);
    - a class name ("Linear", "LlamaAttention"): the module's class or one of its bases has that name;
      "Linear" and "Experts" also select fused-experts modules (`EXPERTS_PATTERNS`);
    - anything else: the module name equals the pattern or ends with "." + pattern.

    Example:
        >>> matches("re:.*down_proj", "model.layers.0.mlp.down_proj", nn.Linear(2, 2))
        True
    """
    if pattern.startswith("re:"):
        return _compile(pattern[3:]).fullmatch(name) is not None
    if any(cls.__name__ == pattern for cls in type(module).__mro__):
        return True
    if pattern in EXPERTS_PATTERNS and is_experts(module):
        return True
    return name == pattern or name.endswith("." + pattern)
