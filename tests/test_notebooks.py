"""The Colab notebooks: each runs top to bottom, headless, with SMALL=1 (nbclient and a real
Jupyter kernel, as CI runs them); each is committed without outputs, installs from the
repository the docs' badges point at, and uses only the public API the README and docs show."""

import ast
import re
from pathlib import Path

import nbformat
import pytest
from doc_pages import TEXT
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = re.search(r'^Repository = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
NOTEBOOKS = {p.stem: p for p in sorted((ROOT / "colab").glob("*.ipynb"))}
# A notebook's TPU case is 8 cores (v2-8): the SFT notebook runs on 8 simulated devices.
DEVICES = {"quickstart": 1, "llm_sft_tpu": 8, "compose_adapters": 1, "dpo": 1}
# How the docs spell each module a notebook may use.
MODULES = {
    "lora_jax": "lj",
    **{
        f"lora_jax.{m}": m
        for m in ("aot", "compose", "data", "files", "models", "settings", "sources", "train")
    },
}


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS[name], as_version=4)


def code(notebook: nbformat.NotebookNode) -> str:
    """The code cells as Python: IPython's `%pip` / `!` lines become `pass`."""
    cells = [c.source for c in notebook.cells if c.cell_type == "code"]
    return re.sub(r"^(\s*)[%!].*$", r"\1pass", "\n\n".join(cells), flags=re.M)


def test_the_four_notebooks_exist():
    assert set(NOTEBOOKS) == set(DEVICES)


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_notebook_runs_top_to_bottom_with_small_twice_in_one_directory(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES[name]}")
    # Twice, as a Colab user re-runs everything: the second run finds the first one's
    # checkpoints and outputs in its directories and must start over cleanly. The SFT
    # notebook's second run switches its model family to Gemma 3, as a user would.
    for family in ("llama", "gemma3"):
        monkeypatch.setenv("FAMILY", family)
        notebook = read(name)
        client = NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
        )
        client.execute()  # raises CellExecutionError, naming the cell, on any error
        outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
        assert any("image/png" in o.get("data", {}) for o in outputs)  # each draws a plot
        assert (tmp_path / "runs").is_dir()


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_notebook_is_committed_clean_and_installs_from_the_badges_repository(name):
    notebook = read(name)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells)
    assert f'%pip install -q "lora_jax @ git+{REPOSITORY}"' in code_cells[0].source
    colab = REPOSITORY.replace("https://github.com/", "https://colab.research.google.com/github/")
    badge = f"({colab}/blob/main/colab/{name}.ipynb)"
    assert badge in notebook.cells[0].source and badge in TEXT


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_notebook_uses_only_the_public_api_the_docs_show(name):
    tree = ast.parse(code(read(name)))
    local = {}  # name in the notebook -> the docs' spelling of its module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_jax"):
                    assert alias.name in MODULES, alias.name
                    local[alias.asname or alias.name] = MODULES[alias.name]
        elif isinstance(node, ast.ImportFrom) and node.module.startswith("lora_jax"):
            for alias in node.names:
                module = f"{node.module}.{alias.name}"
                assert module in MODULES, f"from {node.module} import {alias.name}"
                local[alias.asname or alias.name] = MODULES[module]
    used = {
        f"{local[node.value.id]}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in local
    }
    assert used, "the notebook uses no lora_jax API"
    assert [u for u in sorted(used) if u not in TEXT or ".__" in u or "._" in u] == []
