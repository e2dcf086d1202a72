"""The layering docs/ARCHITECTURE.md promises, checked on the source: who may import whom, no cycles.

Every import counts, also those inside functions: a lazy import that dodges a cycle is still a cycle.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "data", "engine")
# (importer prefix, imported prefix): forbidden arrows (docs/ARCHITECTURE.md, "Layout", says it in words)
FORBIDDEN = [
    ("models", "data"), ("models", "engine"),
    ("data", "models"), ("data", "engine"),
    ("engine.distributed", "engine"), ("engine.fault_hooks", "engine"),  # leaves
    *(("engine.config", dst) for dst in ("engine.checkpoints", "engine.model", "engine.plan", "engine.training",
                                         "engine.inference", "engine.cli")),
    *(("engine.model", dst) for dst in ("engine.plan", "engine.training", "engine.inference", "engine.cli")),
    *(("engine.plan", dst) for dst in ("engine.checkpoints", "engine.training", "engine.inference", "engine.cli")),
    *(("engine.checkpoints", dst) for dst in ("engine.plan", "engine.training", "engine.inference", "engine.cli")),
    ("engine.inference", "engine.training"), ("engine.inference", "engine.plan"), ("engine.inference", "engine.cli"),
    ("engine.training", "engine.inference"), ("engine.training", "engine.cli"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "hf_remote" not in path.parts:  # written next to exports; imports only torch/transformers
                found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from pkg import mod` counts as pkg.mod when that is a module)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_forbidden_arrows():
    bad = [(a, b) for a, deps in graph().items() for b in deps
           for src, dst in FORBIDDEN if (a == src or a.startswith(src + ".")) and (b == dst or b.startswith(dst + "."))]
    assert not bad, f"imports against the layering: {bad}"


def test_no_import_cycles():
    g = graph()
    # a package's __init__ importing its own modules is how packages re-export; it is not a cycle
    edges = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in g.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"
    assert len(edges) > 40 and sum(map(len, edges.values())) > 60  # the walk really saw the code
