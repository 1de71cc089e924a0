"""Small tasks for the notebooks and the shipped configs, drawn from fixed seeds.

arithmetic: "What is 27 + 45?" -> "72" (sums and differences of two-digit numbers).
reverse: "Reverse the words: sun cat red" -> "red cat sun" (three to five common words).
arithmetic_pairs: preference pairs (DPO) on arithmetic's questions: the right answer chosen,
a near miss ("71", "82") rejected.
SFT rows are {"prompt", "response"}, pairs {"prompt", "chosen", "rejected"}; no test prompt
appears in train. `python -m
lora_jax.datasets.synthetic` rewrites the JSONL files beside this module; a test checks the
shipped files are exactly what it writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple", "bird", "blue", "book", "cat", "cloud", "dog", "door", "fish", "green", "hat",
    "house", "lamp", "moon", "red", "river", "road", "rock", "sea", "shoe", "sky", "star",
    "stone", "sun", "tree", "water", "wind", "wood",
)  # fmt: skip
SIZES = {"test": 200, "train": 2000}  # test first: train skips its prompts


def arithmetic(rng: random.Random) -> dict[str, str]:
    """A sum or difference of two two-digit numbers."""
    a, b, op = rng.randint(10, 99), rng.randint(10, 99), rng.choice("+-")
    return {"prompt": f"What is {a} {op} {b}?", "response": str(a + b if op == "+" else a - b)}


def reverse(rng: random.Random) -> dict[str, str]:
    """Three to five distinct words, to be said in reverse order."""
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "prompt": "Reverse the words: " + " ".join(words),
        "response": " ".join(reversed(words)),
    }


def arithmetic_pairs(rng: random.Random) -> dict[str, str]:
    """An arithmetic question, its answer preferred to one off by one or by ten: wrong in
    the way a model that half-learned the sum is wrong."""
    row = arithmetic(rng)
    miss = int(row["response"]) + rng.choice((-10, -1, 1, 10))
    return {"prompt": row["prompt"], "chosen": row["response"], "rejected": str(miss)}


TASKS = {"arithmetic": arithmetic, "reverse": reverse, "arithmetic_pairs": arithmetic_pairs}


def splits(task: str) -> dict[str, list[dict[str, str]]]:
    """{"test": rows, "train": rows} of `task`, the same on every machine (string seeds)."""
    rng, seen, out = random.Random(f"lora_jax/{task}"), set(), {}
    for split, size in SIZES.items():
        rows = []
        while len(rows) < size:
            row = TASKS[task](rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        out[split] = rows
    return out


def write(root: Path = Path(__file__).parent) -> None:
    """Writes root/TASK/{train,test}.jsonl for every task."""
    for task in TASKS:
        for split, rows in splits(task).items():
            path = root / task / f"{split}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write()
