"""Every callable a config `_target_` can reach, and which of them import code, execute a string, unpickle or start
a program (used by tests/test_target_reach.py).

Reachable (automodel/config/instantiate.py's rule): a public module under the trusted packages that `DENIED` does
not cover, and in it a public top-level function or class, or a public method of such a class. The modules are read
as source with `ast`, not imported (importing all of transformers would take minutes and run its code).

Flagged: a callable whose body, or a private helper of the same module or class it calls, calls one of `ACTS`
(resolved through the module's imports: `from pickle import loads as l` makes `l(...)` pickle.loads), or calls
transformers' dynamic-module loaders. A class is flagged when one of its special methods is (building it runs
`__init__`, the recipe then calls, iterates or indexes it); its public methods are checked one by one. Calls between public callables of different
modules are not followed: the callee is enumerated and checked on its own. Only files whose text holds one of the
act names are parsed: an act is a call by one of those names, so a file without any holds none.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from automodel.config.trust import DEFAULT_ALLOWED, denied_by

# Resolved dotted call names (exact, or a prefix ending in '.'), grouped by what they do.
ACTS: dict[str, tuple[str, ...]] = {
    "imports code": ("importlib.import_module", "importlib.__import__", "importlib.reload", "importlib.util.",
                     "importlib.machinery.", "imp.", "runpy.", "__import__", "builtins.__import__", "ctypes.CDLL",
                     "ctypes.PyDLL", "ctypes.cdll.", "ctypes.pydll.",
                     "torch.ops.load_library", "torch.utils.cpp_extension.", "torch.hub.", "torch.package.",
                     "torch.jit.load", "zipimport.", "transformers.dynamic_module_utils.get_class_from_dynamic_module",
                     "transformers.dynamic_module_utils.get_class_in_module"),
    "executes a string": ("eval", "exec", "compile", "builtins.eval", "builtins.exec", "builtins.compile",
                          "code.InteractiveInterpreter", "yaml.unsafe_load", "yaml.full_load"),
    "unpickles": ("pickle.", "_pickle.", "cPickle.", "dill.", "cloudpickle.", "joblib.load", "marshal.load",
                  "marshal.loads", "shelve.open", "pandas.read_pickle", "jsonpickle.", "torch.load",
                  "torch.serialization.load", "numpy.load", "np.load", "yaml.load"),
    "starts a program": ("subprocess.", "os.system", "os.popen", "os.exec", "os.spawn", "os.posix_spawn",
                         "pty.spawn", "asyncio.create_subprocess_", "webbrowser."),
}
# Methods whose name alone gives them away on any object (`spec.loader.exec_module(module)`).
ACT_METHODS = {"exec_module": "imports code", "load_module": "imports code"}
SAFE_WRITES = ("pickle.dump", "pickle.dumps", "pickle.HIGHEST_PROTOCOL", "pickle.Pickler",
               "marshal.dump", "dill.dump", "dill.Pickler", "dill.extend", "cloudpickle.dump")
# Words without which a file cannot hold an act: plain substring tests first (a regex over 3,700 files is slow),
# then a regex for the words that also appear in harmless spellings (`model.eval()`, `re.compile(`, `from torch
# import nn`).
_NEEDLES = (b"exec(", b"__import__", b"import_module", b"importlib", b"runpy", b"ctypes", b"load_library",
            b"cpp_extension", b"torch.hub", b"torch.package", b"torch.jit", b"subprocess", b"os.system", b"os.popen",
            b"os.exec", b"os.spawn", b"posix_spawn", b"import pty", b"pty.spawn", b"create_subprocess", b"pickle",
            b"Unpickler", b"dill", b"joblib", b"marshal", b"shelve", b"webbrowser", b"torch.load",
            b"torch.serialization", b"np.load", b"numpy.load", b"yaml", b"exec_module", b"load_module",
            b"dynamic_module_utils", b"zipimport", b"InteractiveInterpreter")
_MAYBE = (b"eval(", b"compile(", b"from torch import", b"from os import", b"from numpy import", b"from builtins import")
_MAYBE_ACT = re.compile(rb"(?<![.\w])(eval|compile)\(|from (torch|os|numpy|builtins) import[^\n]*\b(load|system|popen|"
                        rb"exec\w*|spawn\w*|eval|compile)\b")


def may_act(text: bytes) -> bool:
    if any(needle in text for needle in _NEEDLES):
        return True
    return any(needle in text for needle in _MAYBE) and _MAYBE_ACT.search(text) is not None


@dataclass
class Callable_:
    name: str                 # dotted, as a config would name it
    kind: str                 # function, class or method
    acts: set[str] = field(default_factory=set)  # what it does, with the call that does it


def package_files(prefix: str) -> Iterator[tuple[str, Path]]:
    """(module name, file) for every module under the dotted `prefix`."""
    spec = importlib.util.find_spec(prefix)
    if spec is None or spec.origin is None:
        return
    origin = Path(spec.origin)
    if origin.name != "__init__.py":
        yield prefix, origin
        return
    for path in sorted(origin.parent.rglob("*.py")):
        relative = path.relative_to(origin.parent).with_suffix("")
        parts = [p for p in relative.parts if p != "__init__"]
        yield ".".join([prefix, *parts]), path


def is_public(module: str) -> bool:
    return all(part.isidentifier() and not part.startswith("_") for part in module.split("."))


def _dotted(node: ast.AST) -> str | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


class ModuleScan:
    """One module's imports, definitions and the acts of its functions."""

    def __init__(self, module: str, tree: ast.Module, is_package: bool):
        self.module = module
        package = module if is_package else module.rpartition(".")[0]
        self.aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname \
                        else alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        self.functions: dict[str, ast.AST] = {}  # qualified name in the module -> def
        self.classes: dict[str, list[str]] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                self.classes[node.name] = [m.name for m in methods]
                for method in methods:
                    self.functions[f"{node.name}.{method.name}"] = method
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.functions[target.id] = node.value

    def resolve(self, call: ast.Call) -> str | None:
        dotted = _dotted(call.func)
        if dotted is None:
            return None
        root, _, rest = dotted.partition(".")
        if root in self.aliases:
            return f"{self.aliases[root]}.{rest}" if rest else self.aliases[root]
        return dotted

    def direct_acts(self, body: ast.AST) -> tuple[set[str], set[str]]:
        """What `body` does itself, and the names of this module's functions it calls."""
        acts, calls = set(), set()
        for node in ast.walk(body):
            if not isinstance(node, ast.Call):
                continue
            name = self.resolve(node)
            if name is None:
                continue
            act = act_of(name, node)
            if act:
                acts.add(f"{act} ({name})")
            elif isinstance(node.func, ast.Attribute) and node.func.attr in ACT_METHODS:
                acts.add(f"{ACT_METHODS[node.func.attr]} (.{node.func.attr})")
            root, _, rest = name.partition(".")
            if name in self.functions:
                calls.add(name)
            elif root in ("self", "cls") and rest:
                calls.add(rest)  # a method of the same class: matched below by its last name
        return acts, calls


def _literal(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _fixed_import(name: str, call: ast.Call, keywords: dict[str, ast.AST]) -> bool:
    """An import of a module (or C library) named in the code (`import_module("torch.distributed")`), or relative to a package
    named in the code (`import_module(f".{name}", "transformers.models")`, which stays inside that package): not a
    name a config chooses."""
    if not name.endswith(("import_module", "__import__", "find_spec", "CDLL", "PyDLL", "LoadLibrary")) or not call.args:
        return False
    first = call.args[0]
    package = call.args[1] if len(call.args) > 1 else keywords.get("package")
    if _literal(first):
        return True
    relative = isinstance(first, ast.JoinedStr) and first.values and _literal(first.values[0]) and \
        first.values[0].value.startswith(".")
    return bool(relative and _literal(package))


def act_of(name: str, call: ast.Call) -> str | None:
    if name.startswith(SAFE_WRITES):
        return None
    keywords = {k.arg: k.value for k in call.keywords if k.arg}
    if _fixed_import(name, call, keywords):
        return None
    for act, names in ACTS.items():
        if not any(name == n or (n.endswith(".") and name.startswith(n)) or
                   (n in ("os.exec", "os.spawn", "os.posix_spawn", "asyncio.create_subprocess_") and
                    name.startswith(n)) for n in names):
            continue
        if name in ("torch.load", "torch.serialization.load"):
            flag = keywords.get("weights_only")
            if isinstance(flag, ast.Constant) and flag.value is True:
                return None
        if name in ("numpy.load", "np.load"):
            flag = keywords.get("allow_pickle")
            if flag is None or (isinstance(flag, ast.Constant) and flag.value is False):
                return None
        if name == "yaml.load":
            loader = _dotted(keywords["Loader"]) if "Loader" in keywords else None
            if loader and "Safe" in loader:
                return None
        return act
    return None


def scan_module(module: str, path: Path) -> list[Callable_]:
    """The reachable callables of one module, with their acts."""
    text = path.read_bytes()
    classes = re.findall(rb"^class ([A-Za-z]\w*)", text, re.M)
    functions = re.findall(rb"^(?:async )?def ([A-Za-z]\w*)", text, re.M)
    if not may_act(text):  # nothing in it can act: counted, not parsed
        return [Callable_(f"{module}.{n.decode()}", "function") for n in functions] + \
            [Callable_(f"{module}.{n.decode()}", "class") for n in classes]
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []  # not importable either
    scan = ModuleScan(module, tree, path.name == "__init__.py")
    direct = {name: scan.direct_acts(node) for name, node in scan.functions.items()}
    acts = {name: set(found) for name, (found, _) in direct.items()}
    changed = True
    while changed:  # through the module's own helpers and the class's own methods
        changed = False
        for name, (_, calls) in direct.items():
            owner = name.rpartition(".")[0]
            for callee in calls:
                target = callee if callee in acts else f"{owner}.{callee}" if owner else None
                if target in acts and not acts[target] <= acts[name]:
                    acts[name] |= acts[target]
                    changed = True
    found = []
    for name in scan.functions:
        if "." not in name and not name.startswith("_"):
            found.append(Callable_(f"{module}.{name}", "function", acts[name]))
    for cls, methods in scan.classes.items():
        if cls.startswith("_"):
            continue
        # Building it runs __init__ (or __new__, __post_init__); the recipe then calls, iterates or indexes it.
        special = [m for m in methods if m.startswith("__") and m.endswith("__")]
        found.append(Callable_(f"{module}.{cls}", "class", set().union(*(acts[f"{cls}.{m}"] for m in special))))
        found += [Callable_(f"{module}.{cls}.{m}", "method", acts[f"{cls}.{m}"]) for m in methods
                  if not m.startswith("_")]
    return found


def reachable_callables(prefixes: tuple[str, ...] = DEFAULT_ALLOWED) -> tuple[list[Callable_], int]:
    """Every callable a config can name, and the number of modules refused as a whole by `DENIED`."""
    found, refused_modules = [], 0
    for prefix in prefixes:
        for module, path in package_files(prefix):
            if not is_public(module):
                continue
            if denied_by(module):
                refused_modules += 1
                continue
            found += scan_module(module, path)
    return found, refused_modules
