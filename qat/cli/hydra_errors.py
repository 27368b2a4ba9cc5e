"""Hydra's refusals of a command line (an unknown key or group option, bad override syntax, a bad flag) as one line.

Hydra words these for its own `run_and_report`: several lines, the options one per line, its config search path and
"Set the environment variable HYDRA_FULL_ERROR=1 ...". `qat.cli.boundary.run_hydra` has Hydra raise them instead
(HYDRA_FULL_ERROR set while it composes) and prints `hydra_message` as "<app>: error: <message>":

    quant=nosuch: no such recipe; choose one of ct_w4a16, fp8_block, ..., w8a8_static or a path to a recipe .yaml
    qunt=w4a16_g128: no such key 'qunt' (did you mean quant?); the keys here: calibration, data, ..., seed
    a=b=c: not a valid override (mismatched input '=' expecting <EOF>); write key=value and quote ...

A bad interpolation (`data.block_size='${nope}'`) is named by the node that holds it (`omegaconf_message`), whether
the job read it or Hydra resolved it for `--cfg job --resolve`; `check_interpolations` resolves the command line's
own interpolations as a job starts, before anything loads.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Sequence

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, InterpolationResolutionError,
                              OmegaConfBaseException)

from qat.recipes import CONFIG_DIR
from qat.spec import ROLES, QuantSpec
from qat.transform.recipe import QuantRecipe

GRAMMAR = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"
# a field of a quant scheme node: quant.weight.bits, quant.overrides.0.input.dynamic (the recipe YAML leaves most out)
_SCHEME_FIELD = re.compile(rf"quant\.(?:overrides(?:\.\d+|\[\d+\])\.)?(?:{'|'.join(ROLES)})\.(?P<field>\w+)")
_BOILERPLATE = ("Set the environment variable HYDRA_FULL_ERROR", "See https://hydra.cc/")
_RESOLVING = "_resolve_interpolation_from_parse_tree"  # OmegaConf's method resolving one node's interpolation


def hydra_message(exc: BaseException, overrides: Sequence[str] = (), groups: Sequence[str] = (),
                  options: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """One line for an error Hydra raised while reading the command line or composing the config, naming the
    override, the key or the group option and what would be valid; None when `exc` is not one (a bug).

    Args:
        exc: what Hydra raised (a HydraException, an OmegaConf error, or a ValueError of Hydra's own flag checks).
        overrides: the command line's arguments, to quote the user's own `group=option` back.
        groups: the config groups of the app's defaults list (offered for a misspelt top-level key with the keys).
        options: {group: the options this app takes} where it takes fewer than the group holds (qat-ptq's
            `method`: configs/method serves qat-compare's rows too); other groups list all their options.
    Example:
        >>> hydra_message(OverrideParseException("a=b=c", "mismatched input '=' expecting <EOF>"))
        "a=b=c: not a valid override (mismatched input '=' expecting <EOF>); write key=value and quote ..."
    """
    if isinstance(exc, OverrideParseException):
        return (f"{exc.override}: not a valid override ({one_line(exc.message)}); write key=value and quote a value "
                f"with special characters, as key='a=b' ({GRAMMAR})")
    if isinstance(exc, MissingConfigException):
        return _missing_config(exc, overrides, options or {})
    if isinstance(exc, HydraException):
        return _composition(exc, overrides, groups)
    if isinstance(exc, OmegaConfBaseException):
        return omegaconf_message(exc)
    if isinstance(exc, ValueError) and _raised_in_hydra(exc):  # its flag checks: "Only one of --run, --multirun..."
        return one_line(str(exc))
    return None


def omegaconf_message(exc: OmegaConfBaseException) -> str:
    """An OmegaConf error ("Interpolation key 'x' not found\\n    full_key: seed\\n    object_type=dict") as
    "seed: Interpolation key 'x' not found".

    A bad interpolation is named by the node that holds it, wherever it was read from:
    `data.block_size: Interpolation key 'nope' not found` (and "(needed by calibration.seq_len)" when
    another node's interpolation led there). OmegaConf's own `full_key` is the node being read, or nothing at all
    when `OmegaConf.resolve` raised (Hydra's `--cfg job --resolve`).
    """
    text, key = _omegaconf_text(exc), getattr(exc, "full_key", None)
    holder = interpolation_node(exc) if isinstance(exc, InterpolationResolutionError) else None
    if holder is not None:
        needed = f" (needed by {key})" if key and key != holder else ""
        return f"{holder}: {text}{needed}"
    return f"{key}: {text}" if key and not text.startswith(f"{key}") else text


def interpolation_node(exc: BaseException) -> str | None:
    """The full key of the innermost config node whose interpolation was being resolved when `exc` was raised,
    from the frames of its traceback; None when there is none (or OmegaConf's internals differ)."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == _RESOLVING:  # Container._resolve_interpolation_from_parse_tree(parent, value, key)
            parent, key = frame.f_locals.get("parent"), frame.f_locals.get("key")
            try:
                found = parent._get_full_key(key)
            except Exception:  # noqa: BLE001 - another OmegaConf: the message goes without the node
                pass
        tb = tb.tb_next
    return found or None


def check_interpolations(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Resolve the interpolations the command line gives (`data.block_size='${nope}'`), so that a bad one is
    refused as the job starts, before any model loads, naming its key (`omegaconf_message`).

    Raises:
        InterpolationResolutionError: the first override whose interpolation does not resolve.
    """
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or "${" not in value or key.startswith(("~", "hydra.", "hydra/")):
            continue
        node = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        if isinstance(node, (DictConfig, ListConfig)):  # a mapping or list given whole: its items too
            OmegaConf.to_container(node, resolve=True)


def _omegaconf_text(exc: OmegaConfBaseException) -> str:
    """The message of an OmegaConf error without its "full_key: ... object_type=..." lines."""
    return one_line(str(getattr(exc, "msg", None) or exc).split("\n    full_key:", 1)[0])


def one_line(text: str) -> str:
    """Hydra's multi-line text in one line, its lines joined by "; ", without its config search path and its
    HYDRA_FULL_ERROR / documentation advice."""
    parts: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(_BOILERPLATE) or line.startswith("provider=") or line == "Config search path:":
            continue
        if parts and not parts[-1].endswith((".", ":", ";")):
            parts[-1] += ";"
        parts.append(line)
    return " ".join(parts).replace("\t", " ")


def _raised_in_hydra(exc: BaseException) -> bool:
    """True when the innermost frame of `exc` is Hydra's own code (not a callback or task of ours it called)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("hydra.")


def _given(group: str, overrides: Sequence[str]) -> str | None:
    """The user's own `group=...` (`+group=`, `++group=`, `-m group=a,b`) on the command line, if any."""
    for arg in overrides:
        key, sep, _ = arg.partition("=")
        if sep and key.lstrip("+~") == group:
            return arg
    return None


def _options(group: str, exc: MissingConfigException) -> list[str]:
    """The group's options: Hydra's list, else the YAML files of configs/<group>."""
    if exc.options:
        return list(exc.options)
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _missing_config(exc: MissingConfigException, overrides: Sequence[str],
                    options: Mapping[str, Sequence[str]]) -> str:
    """`quant=nosuch: no such recipe; choose one of ...`, `--config-name=x: no such config; ...`."""
    text = str(exc)
    primary = re.match(r"Cannot find primary config '([^']*)'", text)
    if primary:
        configs = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        return f"--config-name={primary.group(1)}: no such config; the configs of {CONFIG_DIR}: {configs}"
    found = re.match(r"(?:In '(?P<parent>[^']*)': )?Could not find '(?P<path>[^']*)'", text)
    if not found or "/" not in found["path"]:
        return one_line(text)
    group, option = found["path"].rsplit("/", 1)
    what = "recipe" if group == "quant" else f"{group} option"
    problem = f"no such {what}" if option else f"no {what} given"
    choices = ", ".join(options.get(group) or _options(group, exc)) or "(none found)"
    tail = " or a path to a recipe .yaml" if group == "quant" else ""
    given = _given(group, overrides)
    if given is not None:
        where = f"{given.split('=', 1)[0]}={option}"
    else:  # not the command line's: a config's defaults list (an experiment's, say) names it
        where = f"configs/{found['parent']}.yaml selects {group}={option} in its defaults"
    return f"{where}: {problem}; choose one of {choices}{tail}"


def _composition(exc: HydraException, overrides: Sequence[str], groups: Sequence[str]) -> str:
    """Hydra's ConfigCompositionException & co.: an unknown key, a bad value, `+key=` on an existing key..."""
    text = str(exc)
    cause = exc.__cause__
    head = re.match(r"(?:Could not override '(?P<key>[^']+)'|Error merging override (?P<override>\S+))", text)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and head and head["key"]:
        return _unknown_key(head["key"], cause, overrides, groups)
    if isinstance(cause, OmegaConfBaseException) and head:
        return f"{head['override'] or head['key']}: {_omegaconf_text(cause)}"
    if isinstance(cause, OmegaConfBaseException):
        return f"{one_line(text)} {omegaconf_message(cause)}"
    added = re.search(r"An item is already at '(?P<key>[^']+)'.*remove \+ prefix: '(?P<plain>[^']+)'.*"
                      r"'(?P<force>\+\+[^']+)'", text, re.DOTALL)
    if added:
        return (f"+{added['plain']}: {added['key']} is already in the config; set it with {added['plain']} "
                f"(or {added['force']} to add it or set it)")
    ambiguous = re.match(r"Ambiguous value for argument '([^']*)'", text)
    if ambiguous:
        return (f"{ambiguous.group(1)}: a comma separates the values of a sweep; add -m (--multirun) to run one job "
                "per value, or write key=[a,b] for a list, key='a,b' for a string")
    twice = re.match(r"(?:(\S+) appears more than once in the final defaults list|Multiple values for (\S+)\.)", text)
    group = twice and (twice.group(1) or twice.group(2))
    given = _given(group, overrides) if group else None
    if group and given is not None and given.startswith("+"):
        return f"{given}: {group} is in the defaults list already; choose its option with {given.lstrip('+')}"
    deleted = re.match(r"Could not delete from config\. '([^']*)' does not exist", text)
    if deleted:
        return f"~{deleted.group(1)}: there is no {deleted.group(1)} in the config to delete"
    return one_line(text)


def _unknown_key(key: str, cause: OmegaConfBaseException, overrides: Sequence[str], groups: Sequence[str]) -> str:
    """`qunt=w4a16_g128: no such key 'qunt' (did you mean quant?); the keys here: ...`; for a key below one that
    is not there (`model.tiny.a.b`), that one (`model.tiny.a`), the keys listed being its parent's."""
    given = next((a for a in overrides if a.partition("=")[0] == key), key)
    missing = getattr(cause, "full_key", None)
    if isinstance(missing, str) and missing and key.startswith(missing + "."):
        if missing in groups:  # a group the defaults leave out (qat-export's data): nothing to set keys of yet
            options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / missing).glob("*.yaml")))
            return (f"{given}: no {missing} option is chosen (the config leaves the {missing} group out); choose one "
                    f"with {missing}=<{options}> to set its keys")
        key = missing
    parent = getattr(cause, "parent_node", None)
    keys = [str(k) for k in parent.keys()] if isinstance(parent, Mapping) else []
    scheme = _SCHEME_FIELD.fullmatch(key)
    if scheme and keys:  # a scheme the recipe writes: its other fields are QuantSpec's defaults, not missing keys
        return _scheme_field(given, key, scheme["field"])
    top = key.removeprefix("quant.")
    if key.startswith("quant.") and top in QuantRecipe.KEYS and keys:  # an optional recipe key the file leaves out
        return f"{given}: the recipe leaves {top} at its default; set it with +{given.lstrip('+')}"
    if "." not in key:  # the top level: a group the defaults leave out (qat-eval's quant) is a key there too
        keys = sorted({k for k in keys if k != "hydra"} | set(groups))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    guess = f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""
    node = f"of {key.rsplit('.', 1)[0]}" if prefix else "here"
    listed = (f"; the keys {node}: {', '.join(sorted(keys))}" if keys else
              f"; {key.rsplit('.', 1)[0]} has no keys: add one with +{given.lstrip('+')}" if prefix else "")
    return f"{given}: no such key {key!r}{guess}{listed}"


def _scheme_field(given: str, key: str, name: str) -> str:
    """`quant.weight.scale_dtype=float16: the recipe leaves scale_dtype at its default; set it with +...`, or
    `no such key` with the fields of a scheme (QuantSpec) when `name` is none of them."""
    names = [f.name for f in fields(QuantSpec)]
    if name in names:
        return (f"{given}: the recipe leaves {name} at its default; set it with +{given.lstrip('+')}")
    close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
    prefix = key.rsplit(".", 1)[0]
    guess = f" (did you mean {' or '.join(f'{prefix}.{c}' for c in close)}?)" if close else ""
    return f"{given}: no such key {key!r}{guess}; the fields of a quant scheme (QuantSpec): {', '.join(names)}"
