"""The input pipeline (`lora_jax.data`): JSONL read by index, the per-epoch order and its
split over processes, resumable streams, padding to buckets, bad rows found mid-run, and
memory that does not grow with the number of rows."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sft_runs import LLAMA_SFT, as_args, overrides
from test_train import _free_port

from lora_jax import data as data_lib
from lora_jax.cli import main as cli_main
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS


def _rows(path):
    """The reference: every non-blank line parsed, with its line number."""
    lines = Path(path).read_bytes().decode().splitlines()
    return [(json.loads(t), n) for n, t in enumerate(lines, 1) if t.strip()]


def test_jsonl_rows_by_index_across_chunks_blank_lines_and_crlf(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "_CHUNK", 7)  # lines cross every chunk boundary
    rng = np.random.default_rng(0)
    parts = []
    for i in range(60):
        parts.append(json.dumps({"text": "w" * int(rng.integers(0, 20)), "label": i}))
        parts.append(["\n", "\r\n", "\n\n", "\n  \n", "\n\r\n"][i % 5])
    path = tmp_path / "rows.jsonl"
    path.write_bytes("".join(parts).rstrip().encode())  # the last line has no newline
    rows = data_lib.JsonlRows(path)
    want = _rows(path)
    assert len(rows) == len(want) == 60
    for i, (row, line) in enumerate(want):
        assert rows.read(i) == (row, f"{path}:{line}")


def test_the_index_is_built_once_per_version_of_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    first = data_lib.JsonlRows(path)
    built = first.index.stat().st_mtime_ns
    assert data_lib.JsonlRows(path).index.stat().st_mtime_ns == built  # reused
    with path.open("a") as f:
        f.write('{"a": 3}\n')
    os.utime(path, ns=(built + 10**9, built + 10**9))  # a new version, whatever the clock
    again = data_lib.JsonlRows(path)
    assert again.index != first.index and len(again) == 3 and again.read(2)[0] == {"a": 3}
    with pytest.raises(data_lib.BadRow, match=rf"{re.escape(str(path))}:2: not a JSON object"):
        path.write_text('{"a": 1}\n{"a": \n')
        data_lib.JsonlRows(path).read(1)


def test_the_order_is_a_new_shuffle_each_epoch_and_processes_split_each_batch():
    size, batch = 21, 4  # 5 whole batches an epoch; one row left out of each epoch
    whole = data_lib.Order(size, batch, seed=3)
    first, second = ([whole(k) for k in range(e * 20, e * 20 + 20)] for e in (0, 1))
    assert len(set(first)) == len(set(second)) == 20 and first != second
    assert [data_lib.Order(size, batch, seed=4)(k) for k in range(20)] != first
    halves = [data_lib.Order(size, batch, seed=3, rows=slice(h, h + 2)) for h in (0, 2)]
    for b in range(10):  # process h reads rows h, h+1 of every global batch
        got = [half(k) for half in halves for k in (2 * b, 2 * b + 1)]
        assert got == [whole(k) for k in range(4 * b, 4 * b + 4)]


@pytest.fixture
def sft_examples(sft):
    """The tiny SFT set's train split as the task's examples, rows of 32 tokens."""
    model = sft / "llama"
    tokenizer = data_lib.Tokenizer(model, json.loads((model / "config.json").read_text()))
    data = DataSettings(task="sft", template="{prompt}", max_length=32)
    rows = data_lib.JsonlRows(sft / "train.jsonl")
    return data_lib.Encode(rows, TASKS["sft"], tokenizer, data, None)


@pytest.mark.parametrize("pack", [True, False])
def test_a_stream_resumes_exactly_where_its_state_was_taken(sft_examples, pack):
    def stream():
        return iter(data_lib.train_stream(sft_examples, 8, 0, slice(None), pack))

    it = stream()
    for _ in range(5):  # into the second epoch (64 rows: 8 batches unpacked, fewer packed)
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    after = [next(it) for _ in range(10)]
    again = stream()
    again.set_state(state)
    for want in after:
        got = next(again)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    shape = after[0]["input_ids"].shape
    # Packed: rows of max_length; unpacked: the bucket of the longest (11 tokens -> 16).
    assert shape == ((8, 32) if pack else (8, 16))
    share = np.mean([data_lib.padding_share(b) for b in after])
    assert share < (0.4 if pack else 0.35), share  # 22 of 32 tokens packed, 11 of 16 padded


def test_buckets_bound_the_shapes():
    assert data_lib.buckets(1024) == [128, 256, 512, 1024]
    assert data_lib.buckets(24) == [8, 16, 24]
    assert data_lib.bucket(129, 1024) == 256 and data_lib.bucket(3, 24) == 8


TWO_PROCESSES = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from lora_jax import data as data_lib, sharding
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS
mesh = sharding.make_mesh(1, 8, 1, devices=jax.devices())
rows = sharding.local_rows(mesh, 8)
model = sys.argv[3]
tokenizer = data_lib.Tokenizer(model, json.load(open(model + "/config.json")))
data = DataSettings(task="classify", text_field="prompt", labels=(), max_length=8)
split = data_lib.Encode(data_lib.JsonlRows(sys.argv[4]), TASKS["classify"], tokenizer, data,
                        None)
it = iter(data_lib.train_stream(split, 8, 0, rows, pack=False))
print(json.dumps([next(it)["labels"].tolist() for _ in range(int(sys.argv[5]))]))
"""


def test_two_processes_read_disjoint_rows_whose_union_is_the_epoch(sft, tmp_path):
    """jax.distributed on localhost: each process reads its own rows of each global batch;
    together they read each batch of the one-process order, so each epoch's rows once."""
    path = tmp_path / "ids.jsonl"  # the label is the row's id
    path.write_text("".join(json.dumps({"prompt": "w3 w4", "label": i}) + "\n" for i in range(43)))
    script, port, steps = tmp_path / "read.py", _free_port(), 10  # 5 whole batches an epoch
    script.write_text(TWO_PROCESSES)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, script, f"localhost:{port}", str(pid),
                               sft / "llama", path, str(steps)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]  # fmt: skip
    read = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        read.append(json.loads(out.splitlines()[-1]))
    order = data_lib.Order(43, 8, seed=0)
    for step in range(steps):
        mine, theirs = read[0][step], read[1][step]
        assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)
        assert sorted(mine + theirs) == sorted(order(k) for k in range(8 * step, 8 * step + 8))
    for epoch in (read[0][:5] + read[1][:5], read[0][5:] + read[1][5:]):
        ids = [i for batch in epoch for i in batch]
        assert len(ids) == len(set(ids)) == 40  # 43 rows: whole batches only


MEMORY = """
import json, resource, sys
from lora_jax import data as data_lib
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS
model = sys.argv[1]
tokenizer = data_lib.Tokenizer(model, json.load(open(model + "/config.json")))
data = DataSettings(task="sft", template="{prompt}", max_length=32)
split = data_lib.Encode(data_lib.JsonlRows(sys.argv[2]), TASKS["sft"], tokenizer, data, None)
split.check_first()
next(iter(data_lib.train_stream(split, 8, 0, slice(None), pack=True)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_setup_memory_does_not_grow_with_the_number_of_rows(sft, tmp_path):
    """Peak RSS up to the first batch: 1M rows within 1.25x of 10k rows (a Python object a
    row would take about 1.7 GB more)."""
    row = json.dumps({"prompt": "w3 w4 w5 w6 w7", "response": "w8 w9 w10"}) + "\n"
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    peaks = []
    for rows in (10_000, 1_000_000):
        path = tmp_path / f"{rows}.jsonl"
        path.write_text(row * rows)
        proc = subprocess.run([sys.executable, script, sft / "llama", path], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks.append(int(proc.stdout.split()[-1]))
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_a_bad_row_found_mid_run_stops_after_a_checkpoint(sft, tmp_path, capsys):
    """Row 300 lacks its response; the first 256 rows pass the check before compiling, so
    the run finds it when its batch is read: exit 2, one line naming the file and line, and
    a checkpoint of the steps before it, from which --resume can go on once it is fixed.
    Unpacked, so that the batch that reads it is known: 8 rows a step."""
    good = json.dumps({"prompt": "w3 w4", "response": "w5"})
    path = tmp_path / "train.jsonl"
    path.write_text("".join((good if n != 300 else '{"prompt": "w3"}') + "\n"
                            for n in range(1, 321)))  # fmt: skip

    def read_at(seed):  # where the bad row (index 299) comes in the epoch's order
        return [data_lib.Order(320, 8, seed)(k) for k in range(320)].index(299)

    seed = next(s for s in range(100) if read_at(s) >= 8)  # not in the first batch
    step = read_at(seed) // 8
    out = tmp_path / "out"
    sets = overrides(sft, out, **{"data.train": path, "train.steps": 40, "train.seed": seed,
                                  "train.grad_accum": 1, "data.pack": False})  # fmt: skip
    code = cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1] == (f"lora-jax train: {path}:300: no field 'response' (the row has "
                       "['prompt']); set data.text_field / label_field / response_field, or "
                       f"the template's fields. (stopped at step {step}: checkpoint written in "
                       f"{out / 'checkpoints'}; fix the row, then --resume)")  # fmt: skip
    assert (out / "checkpoints" / str(step)).is_dir()
    assert len([line for line in (out / "metrics.jsonl").open()]) == step
