"""Build objects from config mappings.

Two kinds of section:
- a mapping with `_target_: dotted.path` is built by calling that callable with the other keys
  (nested `_target_` mappings first), plus whatever the recipe injects (a tokenizer, the parameters);
- a section without `_target_` is read into the recipe's own config dataclass for it, with every key
  and type checked, so a typo or a wrong type is caught before any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any, Literal, TypeVar, Union

from automodel.config.loader import did_you_mean
from automodel.config.trust import HOW_TO_ALLOW, TargetPolicy, check_not_denied, find_targets, is_allowed
from automodel.errors import UserError

T = TypeVar("T")


def resolve_target(dotted: str, key: str, policy: TargetPolicy = TargetPolicy()) -> Any:
    """Import the module a target names and take the callable from it: `pkg.module.name` or `pkg.module.Class.name`.

    Only inside the trusted packages of `policy`, checked before importing (an import runs module code). The name
    is looked up in the module it names, never walked through another module reached as an attribute, and what it
    reaches must be defined in the trusted packages (config/trust.py)."""
    if not isinstance(dotted, str) or not dotted:
        raise UserError(f"{key}._target_: expected a dotted path such as torch.optim.AdamW, got {dotted!r}")
    policy.check(dotted, key)
    parts = dotted.split(".")
    odd = next((part for part in parts if not part.isidentifier() or part.startswith("_")), None)
    if odd is not None:
        raise UserError(f"{key}._target_: '{dotted}': '{odd}' is not a public name; a target is a public class or "
                        "function of a module, such as torch.optim.AdamW")
    module, names = _import_module_of(parts, dotted, key, policy)
    if not names:
        raise UserError(f"{key}._target_: '{dotted}' is a module; name a class or function in it")
    if len(names) > 2:
        raise UserError(f"{key}._target_: '{dotted}': expected module.function or module.Class.method, not a "
                        f"chain of {len(names)} attributes")
    obj = module
    for depth, attr in enumerate(names):
        if not hasattr(obj, attr):
            raise UserError(f"{key}._target_: '{dotted}' not found: {getattr(obj, '__name__', obj)} has no attribute "
                            f"'{attr}'{did_you_mean(attr, [a for a in dir(obj) if not a.startswith('_')])}")
        obj = getattr(obj, attr)
        reached = ".".join(parts[: len(parts) - len(names) + depth + 1])
        if inspect.ismodule(obj):
            raise UserError(f"{key}._target_: '{dotted}' passes through {reached}, which is the module "
                            f"{obj.__name__} reached as an attribute; name the callable by its own module")
        if not callable(obj):  # a constant: no module of its own to check
            raise UserError(f"{key}._target_: '{dotted}' is not callable")
        home = getattr(obj, "__module__", None)
        if not isinstance(home, str) or not (is_allowed(home, policy.prefixes) or is_allowed(
                f"{home}.{getattr(obj, '__qualname__', attr)}", policy.prefixes)):
            raise UserError(f"{key}._target_: '{dotted}' is {home}.{getattr(obj, '__qualname__', attr)}, defined "
                            f"outside the trusted packages ({', '.join(policy.prefixes)}); {HOW_TO_ALLOW}")
    check_not_denied(f"{obj.__module__}.{getattr(obj, '__qualname__', names[-1])}", key, written=dotted)
    return obj


def check_targets(cfg: dict[str, Any], policy: TargetPolicy) -> None:
    """Every `_target_` of `cfg` resolved (its module imported, the callable checked) before anything is built, so
    a refused one stops the command before a model is loaded or a file written."""
    policy.check_config(cfg)
    for key, dotted in find_targets(cfg):
        if isinstance(dotted, str) and dotted:
            resolve_target(dotted, key, policy)


def _import_module_of(parts: list[str], dotted: str, key: str, policy: TargetPolicy) -> tuple[Any, list[str]]:
    """The longest importable module that `parts` starts with, inside the trusted packages, and the names after it."""
    # A prefix may name a callable (--allow-target collections.OrderedDict): its module is imported then.
    matching = [p for p in policy.prefixes if is_allowed(dotted, [p])]
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        if not is_allowed(module_name, policy.prefixes) and not any(p.startswith(module_name + ".")
                                                                     for p in matching):
            break  # a shorter prefix lies outside the trusted packages: never imported
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only 'this prefix is not a module' means try a shorter one; a module that fails on its own
            # missing dependency is a real error to report.
            if err.name and not module_name.startswith(err.name) and err.name != module_name:
                raise UserError(f"{key}._target_: importing {module_name} failed: {err}") from None
            continue
        if getattr(module, "__name__", None) != module_name and \
                not is_allowed(getattr(module, "__name__", ""), policy.prefixes):  # sys.modules aliasing another
            raise UserError(f"{key}._target_: '{dotted}': {module_name} is the module {module.__name__}, outside the "
                            f"trusted packages; {HOW_TO_ALLOW}")
        return module, parts[split:]
    raise UserError(f"{key}._target_: cannot import '{dotted}': no module named '{'.'.join(parts[:-1]) or parts[0]}' "
                    "in the trusted packages")


def _accepted_keywords(fn) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: let the call itself check
        return set(), True
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}, takes_any


def _mismatch(value: Any, default: Any) -> bool:
    """Whether a config value cannot stand where the callable's default has this type (YAML types only)."""
    if isinstance(default, bool):
        return not isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (bool, str, list, dict))
    if isinstance(default, str):
        return isinstance(value, (bool, int, float, list, dict))
    if isinstance(default, tuple):
        return isinstance(value, (str, dict))
    return False


def _check_against_defaults(target, kwargs: dict[str, Any], key: str) -> None:
    """A value of another kind than the parameter's default (`lr: abc` where the default is 0.001) is named
    here, instead of failing somewhere inside the callable with a message about neither."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    for name, value in kwargs.items():
        param = params.get(name)
        if param is not None and param.default is not inspect.Parameter.empty and param.default is not None \
                and value is not None and _mismatch(value, param.default):
            raise UserError(f"{key}.{name}: expected a value like the default {param.default!r}, got {value!r}")


def build(node: Any, key: str, *, policy: TargetPolicy = TargetPolicy(), **injected: Any) -> Any:
    """Build `node` if it is a `_target_` mapping (recursively); return plain values as they are.

    `injected` are keyword arguments the recipe supplies (e.g. `tokenizer=`, `params=`); the config's
    own keys win over nothing: a key given both ways is an error, so a config never silently loses.
    `policy` says which packages a `_target_` may come from (config/trust.py).
    """
    if isinstance(node, list):
        return [build(v, f"{key}[{i}]", policy=policy) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: build(v, f"{key}.{k}", policy=policy) for k, v in node.items()}
    target = resolve_target(node["_target_"], key, policy)
    if dataclasses.is_dataclass(target):
        return parse_section(target, {k: v for k, v in node.items() if k != "_target_"}, key)
    kwargs = {k: build(v, f"{key}.{k}", policy=policy) for k, v in node.items() if k != "_target_"}
    _check_against_defaults(target, kwargs, key)
    clash = sorted(kwargs.keys() & injected.keys())
    if clash:
        raise UserError(f"{key}.{clash[0]}: set by the recipe, remove it from the config")
    kwargs.update(injected)
    accepted, takes_any = _accepted_keywords(target)
    if not takes_any:
        for name in kwargs:
            if name not in accepted:
                raise UserError(f"{key}.{name}: {node['_target_']} takes no argument '{name}'"
                                f"{did_you_mean(name, accepted)}; it accepts: {', '.join(sorted(accepted))}")
    try:
        return target(**kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as err:
        # Wrong types or values in the user's keys surface here (e.g. --optimizer.lr abc).
        raise UserError(f"{key}: building {node['_target_']} failed: {err}") from err


# ---- typed dataclass sections -------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(err)
        raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise UserError(f"{key}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}"
                        f"{did_you_mean(str(value), args)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise UserError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def parse_section(cls: type[T], node: dict[str, Any] | None, key: str) -> T:
    """Read a mapping into the dataclass `cls`, naming the key of any unknown field or wrong type."""
    node = {} if node is None else node
    if not isinstance(node, dict):
        raise UserError(f"{key}: expected a mapping of settings, got {node!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for name, value in node.items():
        if name == "_target_":
            continue
        if name not in fields:
            raise UserError(f"{key}.{name}: unknown setting{did_you_mean(name, fields)}; "
                            f"known: {', '.join(fields)}")
        values[name] = _coerce(value, hints[name], f"{key}.{name}")
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{key}: missing required setting(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except ValueError as err:  # __post_init__ checks of cross-field rules
        raise UserError(f"{key}: {err}") from None
