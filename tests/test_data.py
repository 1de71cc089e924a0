"""The input pipeline (`lora_jax.data`): JSONL, Arrow, Parquet and TFDS read by index, the
per-epoch order and its split over processes, resumable streams, padding to buckets, bad
rows found mid-run, and memory that does not grow with the number of rows."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pyarrow import parquet
from sft_runs import LLAMA_SFT, as_args, cli, losses, overrides
from test_train import _free_port

from lora_jax import data as data_lib
from lora_jax import sources
from lora_jax.cli import main as cli_main
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS, Encoder


def _rows(path):
    """The reference: every non-blank line parsed, with its line number."""
    lines = Path(path).read_bytes().decode().splitlines()
    return [(json.loads(t), n) for n, t in enumerate(lines, 1) if t.strip()]


def test_jsonl_rows_by_index_across_chunks_blank_lines_and_crlf(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 7)  # lines cross every chunk boundary
    rng = np.random.default_rng(0)
    parts = []
    for i in range(60):
        parts.append(json.dumps({"text": "w" * int(rng.integers(0, 20)), "label": i}))
        parts.append(["\n", "\r\n", "\n\n", "\n  \n", "\n\r\n"][i % 5])
    path = tmp_path / "rows.jsonl"
    path.write_bytes("".join(parts).rstrip().encode())  # the last line has no newline
    rows = sources.JsonlRows(path)
    want = _rows(path)
    assert len(rows) == len(want) == 60
    for i, (row, line) in enumerate(want):
        assert rows.read(i) == (row, f"{path}:{line}")


def test_the_index_is_built_once_per_version_of_the_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    first = sources.JsonlRows(path)
    built = first.index.stat().st_mtime_ns
    assert sources.JsonlRows(path).index.stat().st_mtime_ns == built  # reused
    with path.open("a") as f:
        f.write('{"a": 3}\n')
    os.utime(path, ns=(built + 10**9, built + 10**9))  # a new version, whatever the clock
    again = sources.JsonlRows(path)
    assert again.index != first.index and len(again) == 3 and again.read(2)[0] == {"a": 3}
    with pytest.raises(sources.BadRow, match=rf"{re.escape(str(path))}:2: not a JSON object"):
        path.write_text('{"a": 1}\n{"a": \n')
        sources.JsonlRows(path).read(1)


def _write_arrow(path, table, new=pa.ipc.new_stream):
    """An Arrow IPC file; the stream format is what `datasets.save_to_disk` writes."""
    with pa.OSFile(str(path), "wb") as sink, new(sink, table.schema) as out:
        out.write_table(table, max_chunksize=5)


def test_arrow_and_parquet_rows_read_as_the_jsonl_rows_do(tmp_path):
    rows = [{"prompt": f"w{i}", "response": "w" * i, "label": i, "tags": [i, i + 1]}
            for i in range(23)]  # fmt: skip
    rows[4]["response"] = None
    table = pa.Table.from_pylist(rows)
    parquet.write_table(table, tmp_path / "one.parquet", row_group_size=7)
    _write_arrow(tmp_path / "stream.arrow", table)
    _write_arrow(tmp_path / "file.arrow", table, pa.ipc.new_file)
    (tmp_path / "saved").mkdir()  # as datasets.save_to_disk lays a split out
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "hub").mkdir()  # as the hub's Parquet export does
    for k, (start, stop) in enumerate([(0, 10), (10, 11), (11, 23)]):
        _write_arrow(tmp_path / "saved" / f"data-0000{k}-of-00003.arrow", table[start:stop])
        parquet.write_table(table[start:stop], tmp_path / "hub" / f"train-0000{k}-of-00003.parquet")
    for name in ("one.parquet", "stream.arrow", "file.arrow", "saved", "hub"):
        split = sources.open_rows(tmp_path / name)
        assert len(split) == 23 and [split.read(i)[0] for i in range(23)] == rows, name
        again = pickle.loads(pickle.dumps(split))  # as a grain worker receives it
        assert again.read(22) == split.read(22)
    where = sources.open_rows(tmp_path / "one.parquet").read(4)[1]
    assert where == f"{tmp_path / 'one.parquet'}: row 5"
    shard = tmp_path / "saved" / "data-00002-of-00003.arrow"
    assert sources.open_rows(tmp_path / "saved").read(11) == (rows[11], f"{shard}: row 1")
    # Parquet is converted once per version of the file.
    converted = sources.ArrowRows(tmp_path / "one.parquet").files[0]
    built = converted.stat().st_mtime_ns
    assert sources.ArrowRows(tmp_path / "one.parquet").files[0].stat().st_mtime_ns == built
    parquet.write_table(table[:3], tmp_path / "one.parquet")
    os.utime(tmp_path / "one.parquet", ns=(built + 10**9, built + 10**9))
    assert len(sources.open_rows(tmp_path / "one.parquet")) == 3
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable Parquet file"):
        sources.open_rows(tmp_path / "bad.parquet")
    (tmp_path / "bad.arrow").write_text('{"prompt": "JSONL by another name"}')
    with pytest.raises(ValueError, match=r"bad\.arrow: not an Arrow IPC file"):
        sources.open_rows(tmp_path / "bad.arrow")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: a directory with no \.arrow or \.parq"):
        sources.open_rows(tmp_path / "empty")


def _build_tfds(splits):
    """A prepared TFDS dataset `tiny_sft` in $TFDS_DATA_DIR, in ArrayRecord files, as
    `tfds build --file_format=array_record` leaves one (no network, no TensorFlow)."""
    import tensorflow_datasets as tfds

    class TinySft(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            text = tfds.features.Text()
            features = tfds.features.FeaturesDict({"prompt": text, "response": text})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(rows) for name, rows in splits.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    TinySft(data_dir=os.environ["TFDS_DATA_DIR"], file_format="array_record").download_and_prepare()


def test_a_tfds_split_trains_as_its_rows_in_jsonl_do(sft, tmp_path, monkeypatch, capsys):
    """A TFDS dataset built here trains with the losses and eval of its rows written to
    JSONL in TFDS's order (the build shuffles them). Missing TFDS, or a set not prepared,
    is one line that says what to do, before anything runs."""
    read = {name: sources.read_rows(sft / f"{name}.jsonl") for name in ("train", "eval")}
    _build_tfds({"train": read["train"], "validation": read["eval"]})
    twins = {}
    for name, split in (("train", "train"), ("eval", "validation")):
        twins[name] = tmp_path / f"{name}.jsonl"
        rows = sources.read_rows(f"tfds:tiny_sft:{split}", ["prompt", "response"])
        assert sorted(map(str, rows)) == sorted(map(str, read[name]))
        twins[name].write_text("".join(json.dumps(row) + "\n" for row in rows))

    def train(out, **changes):
        sets = overrides(sft, out, **{"train.steps": 3, **changes})
        return cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)])

    splits = {"data.train": "tfds:tiny_sft:train", "data.eval": "tfds:tiny_sft:validation"}
    assert train(tmp_path / "tfds", **splits) == 0
    twins = {"data.train": twins["train"], "data.eval": twins["eval"]}
    assert train(tmp_path / "jsonl", **twins) == 0
    np.testing.assert_array_equal(losses(tmp_path / "tfds"), losses(tmp_path / "jsonl"))
    evals = [json.loads((tmp_path / name / "eval.json").read_text()) for name in ("tfds", "jsonl")]
    assert evals[0] == evals[1]
    capsys.readouterr()
    assert train(tmp_path / "missing", **{"data.train": "tfds:tiny_missing:train"}) == 2
    assert "Prepare it once, with network: `tfds build tiny_missing" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    assert train(tmp_path / "none", **splits) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lora-jax train: 'tfds:tiny_sft:train' needs tensorflow-datasets: pip install "
                   "'lora_jax[tfds]'."]  # fmt: skip
    assert not (tmp_path / "missing").exists() and not (tmp_path / "none").exists()


def test_worker_processes_give_the_batches_of_reader_threads(sft, tmp_path):
    """data.workers=2 (grain worker processes): the losses of data.workers=0, exit 0 and
    nothing on stderr but the run's own lines."""
    runs = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        sets = overrides(sft, out, **{"data.workers": workers, "train.steps": 4})
        proc = cli("train", "--config", LLAMA_SFT, *as_args(sets))
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        runs[workers] = losses(out)
        assert "Traceback" not in err and "Error" not in err, err[-3000:]
    np.testing.assert_array_equal(runs[0], runs[2])


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
    rows = sources.JsonlRows(sft / "train.jsonl")
    return data_lib.Encode(rows, Encoder(TASKS["sft"], tokenizer, data))


@pytest.mark.parametrize("pack, workers", [(True, 0), (False, 0), (True, 2)])
def test_a_stream_resumes_exactly_where_its_state_was_taken(sft_examples, pack, workers):
    def stream(workers=workers):
        return iter(data_lib.train_stream(sft_examples, 8, 0, slice(None), pack, workers))

    it = stream()  # 64 rows: 8 batches an epoch unpacked, fewer packed
    before = [next(it) for _ in range(5)]  # into the second epoch
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    after = [next(it) for _ in range(10)]
    again = stream()
    again.set_state(state)
    for want in after:
        got = next(again)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    if workers:  # worker processes give the batches of reader threads
        threads = stream(0)
        for want in before + after:
            got = next(threads)
            assert all(np.array_equal(got[key], want[key]) for key in want)
        threads.close()
    it.close()  # the workers stop now (grain's own clean-up at exit prints errors)
    again.close()
    shape = after[0]["input_ids"].shape
    # Packed: rows of max_length; unpacked: the bucket of the longest (11 tokens -> 16).
    assert shape == ((8, 32) if pack else (8, 16))
    share = np.mean([data_lib.padding_share(b[data_lib.SEGMENT_IDS]) for b in after])
    assert share < (0.4 if pack else 0.35), share  # 22 of 32 tokens packed, 11 of 16 padded


def test_a_parquet_split_streams_the_batches_of_its_jsonl_twin(sft, sft_examples, tmp_path):
    rows = sources.read_rows(sft / "train.jsonl")
    parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=9)
    twin = data_lib.Encode(sources.open_rows(tmp_path / "train.parquet"), sft_examples.encoder)
    want = iter(data_lib.train_stream(sft_examples, 8, 0, slice(None), pack=True))
    got = iter(data_lib.train_stream(twin, 8, 0, slice(None), pack=True))
    for _ in range(10):  # into the second epoch
        a, b = next(want), next(got)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows[6]["response"] = None  # a null in a column: named by file and row, as JSONL's are
    parquet.write_table(pa.Table.from_pylist(rows), tmp_path / "null.parquet")
    split = data_lib.Encode(sources.open_rows(tmp_path / "null.parquet"), sft_examples.encoder)
    with pytest.raises(sources.BadRow, match=r"null\.parquet: row 7: response is None, not a"):
        split.check_first()


def test_buckets_bound_the_shapes():
    assert data_lib.buckets(1024) == [128, 256, 512, 1024]
    assert data_lib.buckets(24) == [8, 16, 24]
    assert data_lib.bucket(129, 1024) == 256 and data_lib.bucket(3, 24) == 8


TWO_PROCESSES = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from lora_jax import data as data_lib, sharding, sources
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS, Encoder
mesh = sharding.make_mesh(1, 8, 1, devices=jax.devices())
rows = sharding.local_rows(mesh, 8)
model = sys.argv[3]
tokenizer = data_lib.Tokenizer(model, json.load(open(model + "/config.json")))
data = DataSettings(task="classify", text_field="prompt", labels=(), max_length=8)
split = data_lib.Encode(sources.JsonlRows(sys.argv[4]), Encoder(TASKS["classify"], tokenizer, data))
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
from lora_jax import data as data_lib, sources
from lora_jax.settings import DataSettings
from lora_jax.tasks import TASKS, Encoder
model = sys.argv[1]
tokenizer = data_lib.Tokenizer(model, json.load(open(model + "/config.json")))
data = DataSettings(task="sft", template="{prompt}", max_length=32)
split = data_lib.Encode(sources.JsonlRows(sys.argv[2]), Encoder(TASKS["sft"], tokenizer, data))
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
                       "['prompt']); set data.text_field / label_field / response_field / "
                       "chosen_field / rejected_field, or the template's fields. (stopped at "
                       f"step {step}: checkpoint written in "
                       f"{out / 'checkpoints'}; fix the row, then --resume)")  # fmt: skip
    assert (out / "checkpoints" / str(step)).is_dir()
    assert len([line for line in (out / "metrics.jsonl").open()]) == step


def test_an_unusable_cache_is_named_by_its_variable(tmp_path, monkeypatch):
    """$LORA_JAX_CACHE naming a file (or a folder that cannot be written): the refusal names
    the variable, the data file and what the cache was for, not a bare errno."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n')
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LORA_JAX_CACHE", str(tmp_path / "a-file"))
    with pytest.raises(OSError, match=rf"^LORA_JAX_CACHE={tmp_path}/a-file: cannot keep {rows}'s"):
        sources.open_rows(rows)
