"""How gpt2ft's modules import each other: no import cycles, and the library never imports the notebook's helpers.

    pytest tests/test_imports.py

Read from the source with `ast`, so imports inside functions (the lazy ones that keep torch or gradio out of a
command that does not need them) count as much as the ones at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2ft"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
# The notebook's helpers and the command line sit on top of the library; nothing below them may import them.
NOT_LIBRARY = {"notebook", "cli", "__main__"}


def imported_modules(module: str, source: str | None = None) -> dict[str, int]:
    """The gpt2ft modules `module` imports, anywhere in its source (read from gpt2ft/ unless given) -> the line of
    the first such import."""
    tree = ast.parse(source if source is not None else (PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        if name in MODULES and name != module:
            found[name] = min(line, found.get(name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "gpt2ft" or (node.module or "").startswith("gpt2ft."):
                base = node.module if node.level == 1 else (node.module or "").removeprefix("gpt2ft").lstrip(".")
                if base:  # from .x import y / from gpt2ft.x import y
                    add(base.split(".")[0], node.lineno)
                else:  # from . import x / from gpt2ft import x: x may be a module, else it comes from __init__
                    for alias in node.names:
                        add(alias.name if alias.name in MODULES else "__init__", node.lineno)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gpt2ft."):
                    add(alias.name.split(".")[1], node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    return {module: imported_modules(module) for module in MODULES}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring modules on the current path)."""
    state: dict[str, str] = {}  # "open": on the current path; "done": fully explored, on no cycle
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_scan_sees_every_form_of_import_at_the_top_and_inside_functions():
    source = """
from .config import TrainConfig
import gpt2ft.logs
from gpt2ft.data import IGNORE_INDEX
from . import __version__

def save():
    from .export import add_n_ctx
    from gpt2ft import notebook
    import torch
    from transformers import Trainer
"""
    found = imported_modules("training", source)
    assert found == {"config": 2, "logs": 3, "data": 4, "__init__": 5, "export": 8, "notebook": 9}
    assert {"export", "notebook", "serve", "training"} <= set(import_graph())  # the real package is scanned


def test_no_import_cycle_among_gpt2ft_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, (
        "import cycle: "
        + " -> ".join(f"{module} (line {graph[module][target]})" for module, target in zip(cycle, cycle[1:]))
        + f" -> {cycle[-1]}"
    )


def test_the_cycle_search_finds_a_planted_cycle():
    graph = {"export": {"notebook": 1}, "notebook": {"training": 2}, "training": {"export": 3}, "config": {}}
    assert find_cycle(graph) == ["export", "notebook", "training", "export"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_library_modules_do_not_import_the_notebook_helpers():
    offenders = {
        f"gpt2ft/{module}.py:{imports['notebook']}"
        for module, imports in import_graph().items()
        if module not in NOT_LIBRARY and "notebook" in imports
    }
    assert not offenders, f"library modules import gpt2ft.notebook: {sorted(offenders)}"


def test_no_stage_module_imports_another_stage():
    """A stage is one module on the shared run library (runs.py): train's and prefer's modules import nothing from
    each other, so a new stage never reaches into an old one."""
    from gpt2ft.cli import STAGES

    stages = {stage.run.split(":")[0].removeprefix("gpt2ft.") for stage in STAGES}
    assert {"training", "prefer"} <= stages
    graph = import_graph()
    offenders = {f"{module} imports {other}" for module in stages for other in graph[module] if other in stages}
    assert not offenders, sorted(offenders)
    assert all("runs" in graph[module] for module in stages)  # each builds on the run library
