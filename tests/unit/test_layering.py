"""The tree is the architecture diagram: every module of fulmine sits on a floor and imports only
from its own floor or below (function-level and type-checking imports included), so there are no
circles between packages. A new package or top-level module must be placed here."""

from __future__ import annotations

import ast
from pathlib import Path

import fulmine

# bottom to top
FLOORS = [
    "config", "request", "energy", "kernels", "layers", "models", "chat_template", "gguf_tokenizer", "tokenizer",
    "reasoning", "kv_cache", "sampling",
    "executors", "speculative", "engine", "llm", "plan", "server", "benchmark", "replicas", "cli", "__main__",
    "__init__",
]  # fmt: skip
ROOT = Path(fulmine.__file__).parent


def floor_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> set[str]:
    """The fulmine floors a module imports from."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module = node.module
            if module == "fulmine":  # a package, or a name of the lazy public API (its constants: none)
                names.update(a.name if a.name in FLOORS else "__init__" for a in node.names if a.name != "__version__")
            elif module.startswith("fulmine."):
                names.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fulmine."))
    return names


def test_no_module_imports_from_a_floor_above_it() -> None:
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        floor = floor_of(path)
        assert floor in FLOORS, f"{path.relative_to(ROOT)}: place {floor!r} on a floor in FLOORS"
        for name in imported(path):
            assert name in FLOORS, f"{path.relative_to(ROOT)} imports fulmine.{name}, which is on no floor"
            if FLOORS.index(name) > FLOORS.index(floor):
                upward.append(f"{path.relative_to(ROOT)} ({floor}) imports fulmine.{name}")
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)
