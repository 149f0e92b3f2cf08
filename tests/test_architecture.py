"""The dependency direction: ops <- models <- tasks <- train / evaluate, data beside models.

Two checks. A static one reads every ``import`` statement of every module,
including the ones inside functions, which is where an import cycle hides.
A dynamic one imports each module alone, in an interpreter that has imported
no jfcnn module (only, to save time, the libraries its part may use), and
looks at what it pulled in (transitively), which also proves each module
imports on its own, whatever was imported before it.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import jfcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each part of jfcnn may import from jfcnn (by module prefix). Every part
# may import the package itself and the leaf `jfcnn.errors`.
ALLOWED: dict[str, set[str]] = {
    "jfcnn.errors": set(),
    "jfcnn.ops": {"jfcnn.ops"},
    "jfcnn.models": {"jfcnn.ops", "jfcnn.models"},
    "jfcnn.visualize": set(),
    "jfcnn.cli": set(),
    "jfcnn.distributed": set(),
    "jfcnn.config_validation": set(),
    "jfcnn.data": {"jfcnn.data", "jfcnn.visualize"},
    "jfcnn.checkpoint": set(),
    "jfcnn.workdir": set(),
    "jfcnn.tasks": {
        "jfcnn.ops",
        "jfcnn.models",
        "jfcnn.tasks",
        "jfcnn.config_validation",
        "jfcnn.visualize",
    },
    "jfcnn.train_state": {"jfcnn.tasks", "jfcnn.models", "jfcnn.ops", "jfcnn.checkpoint"},
    # Reading weight files and mapping torchvision keys: NumPy only (torch lazily, for .pth).
    "jfcnn.weights": set(),
}
# The top: everything below it, but evaluation and prediction never import the training loop.
TOP = {
    "jfcnn.evaluate": {"jfcnn.train"},
    "jfcnn.predict": {"jfcnn.train"},
    "jfcnn.train": set(),
    "jfcnn.convert": set(),
    # Step-0 checkpoints fine-tuned on other classes: for train and convert, below them.
    "jfcnn.finetune": {"jfcnn.train", "jfcnn.evaluate", "jfcnn.predict", "jfcnn.convert"},
}
# Third-party modules a part must not pull in, even transitively.
FORBIDDEN_LIBRARIES = {
    "jfcnn.ops": {"tensorflow", "tensorflow_datasets", "optax", "orbax", "ml_collections"},
    "jfcnn.models": {"tensorflow", "tensorflow_datasets", "orbax", "ml_collections"},
    "jfcnn.tasks": {"tensorflow", "tensorflow_datasets", "orbax"},
    "jfcnn.weights": {"torch", "tensorflow", "jax", "flax"},
}


def _modules() -> list[str]:
    names = ["jfcnn"]
    for info in pkgutil.walk_packages(jfcnn.__path__, "jfcnn."):
        names.append(info.name)
    return sorted(names)


def _part(module: str) -> str:
    for prefix in sorted({**ALLOWED, **TOP}, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} belongs to no part of the layout; add it to ALLOWED")


def _allowed(module: str, imported: str) -> bool:
    if imported in ("jfcnn", "jfcnn.errors"):
        return True
    importer, target = _part(module), _part(imported)
    if importer == target:
        return True
    if importer in TOP:
        return target not in TOP[importer]
    return target in ALLOWED[importer]


def _reachable(part: str) -> set[str]:
    """The parts ``part`` may load, directly or through the parts it imports."""
    if part in TOP:
        return set(ALLOWED) | set(TOP) - TOP[part]
    seen, todo = {part}, [part]
    while todo:
        for target in ALLOWED[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _loadable(module: str, loaded: str) -> bool:
    """Whether importing ``module`` may (transitively) load ``loaded``."""
    if loaded in ("jfcnn", "jfcnn.errors"):
        return True
    return _part(loaded) in _reachable(_part(module))


def _static_imports(module: str) -> list[tuple[str, int]]:
    """Every jfcnn module named by an import statement of ``module``, with its line."""
    spec = __import__("importlib").util.find_spec(module)
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    package = module if spec.origin.endswith("__init__.py") else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((base, node.lineno))
            # `from jfcnn import tasks` names the submodule jfcnn.tasks.
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    known = set(_modules())
    return [(name, line) for name, line in found if name in known]


MODULES = _modules()


def test_every_module_belongs_to_a_part():
    assert len(MODULES) > 20
    for module in MODULES[1:]:
        assert _part(module)  # Raises for a module outside the layout.


@pytest.mark.parametrize("module", [m for m in MODULES if m != "jfcnn"])
def test_imports_point_down_even_inside_functions(module):
    bad = [
        f"{module}:{line} imports {name}"
        for name, line in _static_imports(module)
        if not _allowed(module, name)
    ]
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


# Importing the libraries (JAX, TensorFlow) is most of the time of a fresh
# interpreter, so each module imports in a child forked from a server that has
# already imported the libraries its part may use, and nothing of jfcnn: which
# jfcnn modules a module pulls in, and whether it imports at all on its own, is
# seen as in a fresh interpreter. A part's forbidden libraries are never
# preloaded for it (the server's own modules are checked against them too).
PRELOADS = {
    "jax": ("numpy", "jax", "jax.numpy", "flax.linen"),
    "training": (
        "numpy",
        "jax",
        "jax.numpy",
        "flax.linen",
        "optax",
        "ml_collections",
        "tensorflow",
        "tensorflow_datasets",
        "orbax.checkpoint",
    ),
}

# Imports the modules named on its command line, prints what is loaded.
_IMPORT = """
import importlib, json, os, sys, traceback
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)), flush=True)
"""
# Then forks a child per module name read from stdin and prints what it loaded.
_SERVER = (
    _IMPORT
    + """
for line in sys.stdin:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(line.strip())
            out = json.dumps(sorted(sys.modules))
        except BaseException:
            out = json.dumps(traceback.format_exc())
        with os.fdopen(write, "w") as f:
            f.write(out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = f.read()
    status = os.waitpid(pid, 0)[1]
    print(out or json.dumps(f"the import killed the process (wait status {status})"), flush=True)
"""
)


def _preload(module: str) -> str | None:
    """The server ``module`` imports in (None: a fresh interpreter)."""
    if module == "jfcnn":
        return None
    forbidden = FORBIDDEN_LIBRARIES.get(_part(module), set())
    for name, libraries in sorted(PRELOADS.items(), key=lambda item: -len(item[1])):
        if not {lib.split(".")[0] for lib in libraries} & forbidden:
            return name
    return None


def _import_all(preload: str | None, modules: list[str]) -> dict[str, list[str] | str]:
    """What importing each of ``modules`` loads (a list), or why it failed (a str)."""
    if preload is None:
        return {module: _import_fresh(module) for module in modules}
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, *PRELOADS[preload]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        preloaded = {m.split(".")[0] for m in json.loads(server.stdout.readline())}
        assert "jfcnn" not in preloaded, preload
        found = {}
        for module in modules:
            forbidden = FORBIDDEN_LIBRARIES.get(_part(module), set())
            assert not preloaded & forbidden, (preload, module)
            server.stdin.write(module + "\n")
            server.stdin.flush()
            found[module] = json.loads(server.stdout.readline())
        return found
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def _import_fresh(module: str) -> list[str] | str:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT, module],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    if result.returncode != 0:
        return result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, list[str] | str]:
    groups: dict[str | None, list[str]] = {}
    for module in MODULES:
        groups.setdefault(_preload(module), []).append(module)
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
        found = pool.map(lambda group: _import_all(*group), groups.items())
        return {module: loaded for each in found for module, loaded in each.items()}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "jfcnn"])
def test_each_module_imports_alone_and_pulls_in_only_what_it_may(module, fresh_imports):
    loaded = fresh_imports[module]
    assert not isinstance(loaded, str), f"`import {module}` failed on its own:\n{loaded}"
    jfcnn_modules = [m for m in loaded if m == "jfcnn" or m.startswith("jfcnn.")]
    bad = [m for m in jfcnn_modules if not _loadable(module, m)]
    assert not bad, f"`import {module}` loads {bad}"
    forbidden = FORBIDDEN_LIBRARIES.get(_part(module), set())
    pulled = sorted({m.split(".")[0] for m in loaded} & forbidden)
    assert not pulled, f"`import {module}` loads {pulled}"
