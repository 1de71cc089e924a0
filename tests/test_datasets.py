"""The shipped synthetic sets are what their generator writes, and their answers are right."""

import json
import re
from importlib.resources import files

import pytest

from lora_jax.datasets import synthetic


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_shipped_files_are_what_the_generator_writes(task):
    for split, rows in synthetic.splits(task).items():
        shipped = files("lora_jax.datasets").joinpath(task, f"{split}.jsonl").read_text()
        assert [json.loads(line) for line in shipped.splitlines()] == rows
    splits = synthetic.splits(task)
    assert len(splits["train"]) == 2000 and len(splits["test"]) == 200
    train_prompts = {r["prompt"] for r in splits["train"]}
    assert not any(r["prompt"] in train_prompts for r in splits["test"])


def test_answers_are_right():
    for row in synthetic.splits("arithmetic")["test"]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["prompt"]).groups()
        assert int(row["response"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for row in synthetic.splits("reverse")["test"]:
        words = row["prompt"].removeprefix("Reverse the words: ").split()
        assert row["response"].split() == words[::-1] and 3 <= len(words) <= 5
    for row in synthetic.splits("arithmetic_pairs")["test"]:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", row["prompt"]).groups()
        right = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(row["chosen"]) == right and abs(int(row["rejected"]) - right) in (1, 10)
