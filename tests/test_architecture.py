"""The import table of docs/architecture.md, enforced: each part imports only what the map allows.

Every ``import`` in ``src/lmkernel`` (function-level ones too; not those for type checkers only) is resolved to an absolute module
name and checked against the rules below. A change that needs another edge changes the map
(docs/architecture.md) and this table together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lmkernel"

# Root modules that import nothing of lmkernel but each other: anyone may import them.
LEAVES = ("lmkernel.errors", "lmkernel._struct", "lmkernel._version", "lmkernel.testing", "lmkernel._compat")

# part (module prefix) -> what it may import of lmkernel besides itself and the leaves.
ALLOWED: dict[str, tuple[str, ...]] = {
    "lmkernel.kernel": ("lmkernel.plugins.contract", "lmkernel.plugins.contract_async", "lmkernel.plugins.discovery",
                        "lmkernel.plugins.gguf"),
    "lmkernel.backends": ("lmkernel.plugins.contract", "lmkernel.plugins.contract_async", "lmkernel.plugins.detokenize",
                          "lmkernel.plugins.gguf", "lmkernel.plugins.tokens"),
    "lmkernel.plugins.conformance": ("lmkernel.plugins", "lmkernel.kernel", "lmkernel.kernel.messages"),
    "lmkernel.plugins.conformance_async": ("lmkernel.plugins",),
    "lmkernel.plugins": (),
    "lmkernel.sdk": ("lmkernel.kernel", "lmkernel.kernel.messages", "lmkernel.kernel.config",
                     "lmkernel.kernel.runtime"),
    "lmkernel.cli": ("lmkernel", "lmkernel.sdk", "lmkernel.plugins.discovery", "lmkernel.kernel.serve",
                     "lmkernel.kernel.config", "lmkernel.kernel.downloads"),
    "lmkernel._compat": ("lmkernel.kernel.config", "lmkernel.kernel.messages", "lmkernel.sdk"),
    "lmkernel.__main__": ("lmkernel.cli",),
    "lmkernel": ("lmkernel.sdk", "lmkernel.kernel.config", "lmkernel.kernel.messages"),  # __init__: re-exports
}
# Leaves import only leaves.
for leaf in LEAVES:
    ALLOWED.setdefault(leaf, ())


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imports(path: Path) -> list[tuple[int, str]]:
    """Absolute names of the lmkernel modules ``path`` imports, with line numbers."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target.count(".") < 2:  # `from . import x`: x may be a module
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, target) for line, target in found if target == "lmkernel" or target.startswith("lmkernel.")]


def part_of(name: str) -> str:
    return max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len)


def allowed(source: str, target: str) -> bool:
    part = part_of(source)
    if target == part or (part != "lmkernel" and target.startswith(part + ".")):
        return True
    if any(target == leaf or target.startswith(leaf + ".") for leaf in LEAVES):
        return True
    if part in LEAVES and not part.startswith("lmkernel._compat"):
        return False
    # A name imported from a package (`from lmkernel.kernel import messages`) counts as the module.
    return any(target == ok or (ok != "lmkernel" and target.startswith(ok + ".")) for ok in ALLOWED[part])


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_follow_the_map(path):
    source = module_name(path)
    wrong = [f"line {line}: {target}" for line, target in imports(path) if not allowed(source, target)]
    assert not wrong, f"{source} ({part_of(source)}) may not import: {wrong}"


def test_kernel_internals_are_private_to_the_kernel():
    # Outside kernel/, only the kernel's public modules are imported (no underscore module).
    for path in FILES:
        source = module_name(path)
        if source.startswith("lmkernel.kernel"):
            continue
        for line, target in imports(path):
            if target.startswith("lmkernel.kernel."):
                assert not any(p.startswith("_") for p in target.split(".")[2:]), f"{source}:{line} imports {target}"


def test_the_rules_refuse_the_edges_the_map_forbids():
    assert not allowed("lmkernel.plugins.conformance", "lmkernel.sdk._connection")
    assert not allowed("lmkernel.kernel._kernel", "lmkernel")  # the root package
    assert not allowed("lmkernel.cli", "lmkernel.kernel._catalog")
    assert not allowed("lmkernel.backends.mlx", "lmkernel.kernel.messages")
    assert not allowed("lmkernel.errors", "lmkernel.kernel.messages")
    assert allowed("lmkernel.kernel._catalog", "lmkernel.testing")
