"""The layering of docs/ARCHITECTURE.md, checked on the source: who may import whom, no cycles.

The allowed imports are the doc's table ("Layout and what may import what"), parsed here: the doc
is the one copy, so it cannot drift from what is checked. Every import counts, also those inside
functions: a lazy import that dodges a cycle is still a cycle.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
MARKER = "<!-- layering table:"
NOT_LIBRARY = ("tests", "bench")  # packages of scripts and tests: they may import anything, nothing imports them
UP = "(up)"  # the table's mark for an entry naming a row above the importer's


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def packages() -> list[str]:
    """Every top-level package of the project (a new one must get a row in the table)."""
    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in NOT_LIBRARY)


def modules() -> dict[str, Path]:
    found = {}
    for pkg in packages():
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


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def parse_table(text: str) -> list[tuple[list[str], list[str], set[str]]]:
    """The doc's rows, top to bottom: (importer prefixes, allowed prefixes, allowed ones marked (up))."""
    lines = text[text.index(MARKER):].splitlines()[1:]
    assert lines[0].startswith("| module") and set(lines[1]) <= set("|-"), "the layering table lost its header"
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = line.strip().strip("|").split("|")
        assert len(cells) == 2, f"a layering row has two cells: {line}"
        importers = re.findall(r"`([\w.]+)`", cells[0])
        allowed = re.findall(r"`([\w.]+)`(?:\s*`\(up\)`)?", cells[1])
        up = set(re.findall(r"`([\w.]+)`\s*`\(up\)`", cells[1]))
        assert importers, f"a layering row names no module: {line}"
        rows.append((importers, allowed, up))
    return rows


def row_of(module: str, rows) -> int | None:
    """Index of the row whose longest importer prefix names `module`."""
    best = None
    for i, (importers, _, _) in enumerate(rows):
        for prefix in importers:
            if under(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    return best and best[0]


def violations(g: dict[str, set[str]], rows) -> list[str]:
    bad = []
    for a, deps in sorted(g.items()):
        i = row_of(a, rows)
        if i is None:
            bad.append(f"{a}: no row of the table names it")
            continue
        bad += [f"{a} -> {b}" for b in sorted(deps) if not any(under(b, ok) for ok in rows[i][1])]
    return bad


ROWS = parse_table(DOC.read_text())


def test_every_import_is_in_the_table():
    bad = violations(graph(), ROWS)
    assert not bad, "imports the layering table of docs/ARCHITECTURE.md does not allow:\n" + "\n".join(bad)


def test_table_is_well_formed():
    """Each name in the table is a real module; each row imports only rows below it (or its own)
    except entries marked (up); each importer prefix has a row of its own."""
    mods = set(modules())
    seen = set()
    for i, (importers, allowed, up) in enumerate(ROWS):
        for name in importers + allowed:
            assert any(under(m, name) for m in mods), f"the layering table names {name}, which is no module"
        assert not seen & set(importers), f"row {importers} repeats a prefix"
        seen |= set(importers)
        for name in allowed:
            j = row_of(name, ROWS)
            assert j is not None and (j > i or j == i and name in importers) or name in up and j < i, \
                f"row {importers}: {name} is not below it (mark it (up) if that is meant)"
    assert ROWS[-1][0] == ["models"] and ROWS[0][0] == ["engine.cli"]


def test_checker_catches_what_the_table_forbids():
    """The check fails on an import the table does not list and on a module no row names."""
    assert violations({"models.llama": {"engine.config"}}, ROWS) == ["models.llama -> engine.config"]
    assert violations({"engine.plan": {"engine.checkpoints.tags"}}, ROWS) == ["engine.plan -> engine.checkpoints.tags"]
    assert violations({"engine.model": {"engine.checkpoints.tags"}}, ROWS)  # only files is allowed up
    assert violations({"engine.newleaf": {"models"}}, ROWS)  # the `engine` row: nothing of ours
    assert violations({"kernels.x": set()}, ROWS) == ["kernels.x: no row of the table names it"]
    # a new file in a package takes the package's row
    assert not violations({"engine.checkpoints.newfile": {"engine.model", "models.newthing"}}, ROWS)


def test_shared_layers_import_no_family():
    """Families sit above models' shared layers (docs/ARCHITECTURE.md): outside the family modules
    only models.pipeline (liger_blocks: llama's attention and head) imports one."""
    from models import FAMILIES

    families = set(FAMILIES.values())
    bad = {a: deps & families for a, deps in graph().items()
           if a.startswith("models") and a not in families | {"models.pipeline"} and deps & families}
    assert not bad, f"shared layers importing a family module: {bad}"


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
