"""The package's layers, as docs/architecture.md draws them: imports point downward only (no
cycle, counting imports for types and inside functions), and the modules stay small enough
to read (the runner's under 500 lines, the peft file loops under 40)."""

import ast
import inspect
import re
from pathlib import Path

from doc_pages import ROOT

import lora_jax
from lora_jax import io

PACKAGE = Path(lora_jax.__file__).parent
# The runner: everything between the settings and the command line.
RUNNER = ("settings", "sources", "data", "tasks", "run", "train", "aot", "checkpoint", "rundir",
          "report", "signals", "cli", "launch")  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """{module: the lora_jax modules it imports anywhere in its source}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
        graph[name] = (found & modules.keys()) - {name, "lora_jax"}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (its modules in order), or [] where there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node], found = "open", []
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    assert {"lora_jax.run", "lora_jax.signals", "lora_jax.sources"} <= graph.keys()
    assert cycle(graph) == []
    # The check finds a cycle where there is one: the runner's old circle, data <-> tasks.
    assert cycle({**graph, "lora_jax.data": graph["lora_jax.data"] | {"lora_jax.tasks"}})


def drawn_layers() -> dict[str, int]:
    """{module: its layer} from the drawing at the top of docs/architecture.md, 0 the lowest;
    a folder (`models/`) stands for every module in it, an indented line continues a layer."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    drawing = re.search(r"```\n(command line.*?)```", page, re.S)[1].splitlines()
    layers: list[list[str]] = []
    for line in drawing:
        if not line.startswith(" "):
            layers.append([])
        layers[-1] += re.findall(r"(\w+)(?:\.py|/)", line)
    return {f"lora_jax.{m}": len(layers) - 1 - i for i, names in enumerate(layers) for m in names}


def layer_of(module: str, layers: dict[str, int]) -> int:
    parts = module.split(".")
    return next(layers[".".join(parts[:n])] for n in range(len(parts), 1, -1)
                if ".".join(parts[:n]) in layers)  # fmt: skip


def upward(graph: dict[str, set[str]], layers: dict[str, int]) -> list[tuple[str, str]]:
    """The imports of `graph` that point to a layer above the importer's."""
    return sorted((m, t) for m, targets in graph.items() if m != "lora_jax"
                  for t in targets if layer_of(t, layers) > layer_of(m, layers))  # fmt: skip


def test_every_import_points_to_its_own_layer_or_one_below_as_drawn():
    graph, layers = imports(), drawn_layers()
    assert len(set(layers.values())) >= 10 and "lora_jax.run" in layers
    unplaced = [m for m in graph if m != "lora_jax" and not any(
        m == p or m.startswith(p + ".") for p in layers)]  # fmt: skip
    assert unplaced == []
    assert upward(graph, layers) == []
    # The check finds an import upward where there is one: the old tasks -> train.
    tasks = {**graph, "lora_jax.tasks.sft": graph["lora_jax.tasks.sft"] | {"lora_jax.train"}}
    assert upward(tasks, layers) == [("lora_jax.tasks.sft", "lora_jax.train")]


def test_the_runner_and_the_peft_file_loops_stay_short():
    # A runner module, or each module of a runner package (tasks/).
    files = [f for m in RUNNER for f in ([PACKAGE / f"{m}.py"] if (PACKAGE / f"{m}.py").exists()
                                         else sorted((PACKAGE / m).glob("*.py")))]  # fmt: skip
    assert len(files) > len(RUNNER)
    lines = {module_name(f): len(f.read_text().splitlines()) for f in files}
    assert {m: n for m, n in lines.items() if n > 500} == {}
    for fn in (io.save_adapter, io.load_adapter):
        assert len(inspect.getsource(fn).splitlines()) < 40, fn.__name__
