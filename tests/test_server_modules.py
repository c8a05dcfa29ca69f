"""The server modules' structure: the manager knows nothing of the queue, no import cycle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import shareit.backends

BACKENDS = os.path.dirname(shareit.backends.__file__)
MANAGER_SIDE = ("_rpc", "manager", "_manager_server")
QUEUE_SIDE = ("queue", "_queue_hub", "_queue_wire", "_queue_watch")


def _imports(module: str) -> set[str]:
    """The backend modules that ``module``'s source imports, anywhere in it."""
    with open(os.path.join(BACKENDS, module + ".py")) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.removeprefix("shareit.backends."))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("shareit.backends.") for a in node.names)
    return out


def test_the_manager_modules_never_import_the_queue_modules() -> None:
    for module in MANAGER_SIDE:
        assert not _imports(module) & set(QUEUE_SIDE), module


def test_each_server_module_imports_alone_and_no_queue_module_comes_with_the_manager() -> None:
    """In a fresh interpreter each module imports first (a cycle would fail one of them),
    and the manager's modules bring no queue module along."""
    for module in MANAGER_SIDE + QUEUE_SIDE:
        code = (f"import sys, shareit.backends.{module}; "
                f"print(sorted(m for m in sys.modules if m.startswith('shareit.backends.')))")
        out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                             check=True, cwd="/").stdout
        loaded = {m.removeprefix("shareit.backends.") for m in ast.literal_eval(out)}
        if module in MANAGER_SIDE:
            assert not loaded & set(QUEUE_SIDE), (module, loaded)
        else:
            assert "_manager_server" not in loaded or module == "_queue_hub", (module, loaded)
