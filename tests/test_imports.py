"""Imports point one way (the design's STYLE.md, rule 12). fastross's import graph, read from the source, has no
cycle, counting the imports inside functions too (issue 22: checkpoint <-> export <-> ross_format was held together
by those); checkpoint.py stays DCP only, below the formats; config.py imports nothing of the data side."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastross": ROOT / "fastross", "fastross.kernels": ROOT / "kernels"}  # kernels/ is fastross.kernels


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imported(tree: ast.Module, name: str, known: dict[str, Path]) -> dict[str, int]:
    """The fastross modules a module imports anywhere in its body (functions included) -> the line of the first."""
    package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: kernels' `from ._common import ...`
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import fastross.data.x` imports fastross.data.x
                target = target.rpartition(".")[0]
            if target and target != name and target not in PACKAGES:  # the roots import nothing of fastross
                out.setdefault(target, node.lineno)
    return out


@functools.cache
def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imported(ast.parse(path.read_text()), name, known) for name, path in known.items()}


def closure(g: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in g[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def find_cycle(g: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(g):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    """The reader sees the edges that exist, in functions and at module level, so that the checks below can fail."""
    g = graph()
    assert "fastross.checkpoint_read" in g["fastross.checkpoint"]  # module level
    assert "fastross.generate" in g["fastross.eval"]  # inside `evaluate`
    assert "fastross.kernels._common" in g["fastross.kernels.adaln"]  # relative
    assert {"fastross.export", "fastross.ross_format", "fastross.checkpoint"} <= set(g["fastross.weights"])
    cyclic = {**g, "fastross.checkpoint": {**g["fastross.checkpoint"], "fastross.export": 1}}
    assert find_cycle(cyclic) is not None  # the circle of issue 22, put back, is found


def test_no_import_cycle_even_through_imports_inside_functions():
    g = graph()
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(f"{a} (line {g[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_checkpoint_is_below_the_formats_and_the_model():
    """fastross.checkpoint is DCP save/resume only: what chooses among a checkpoint, an export and the reference
    layout (model.init_from) is fastross.weights, above them; nothing it imports reaches the model or the data."""
    reach = closure(graph(), "fastross.checkpoint")
    assert reach <= {"fastross.checkpoint_read", "fastross.config", "fastross.towers"}, sorted(reach)


def test_config_imports_nothing_of_the_data_side_or_the_model():
    reach = closure(graph(), "fastross.config")
    assert reach <= {"fastross.towers"}, sorted(reach)


def test_config_imports_light():
    """`import fastross.config` (the data side's and every tool's first import) pulls in no torch, no model, no
    data module."""
    code = (
        "import sys, fastross.config\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastross')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(["fastross", "fastross.config", "fastross.towers"])


def test_each_import_of_fastross_inside_a_function_says_why():
    """An import of a fastross module inside a function is the exception (an optional part, a heavy import kept off
    a light path): each says why, in a comment on its line or just above."""
    bare = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not any(n.split(".")[0] == "fastross" for n in names) and not (
                    isinstance(node, ast.ImportFrom) and node.level
                ):
                    continue
                own = lines[node.lineno - 1 : node.end_lineno]
                i = node.lineno - 2  # the comment may stand above a group of such imports
                while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
                    i -= 1
                above = lines[i].strip() if i >= 0 else ""
                if not any("#" in line for line in own) and not above.startswith("#"):
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bare, f"imports inside functions without a comment saying why: {bare}"
