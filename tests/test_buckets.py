"""Everything in a bucket: the base, the data and the run's outputs on a real GCS-protocol
server on localhost (the `gcs` fixture, tests/buckets.py), read and written through the path
layer (`lora_jax.files`) by the same commands as local paths, as a pod's hosts, each with its
own disk, run them."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from buckets import Server
from hf_peer import PEERS, peer_logits
from sft_runs import LLAMA_SFT, as_args, cli, losses, overrides
from test_failures import one_line

from lora_jax import files
from lora_jax.cli import main as cli_main
from lora_jax.sources import open_rows

IDS = np.array([[5, 9, 13, 21, 30, 41]])


def steps(sft, out, count, *extra, **changes):
    """`lora-jax train` of the tiny SFT run for `count` steps into `out`, to its end."""
    sets = overrides(sft, out, **{"train.steps": count, "checkpoint.every": 3, **changes})
    run = cli("train", "--config", LLAMA_SFT, *as_args(sets), *extra)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    return out + err


@pytest.fixture
def in_bucket(gcs, sft):
    """The tiny SFT set and its checkpoint uploaded to a fresh folder of the bucket."""
    return gcs.put(sft, gcs.folder())


def bucket_overrides(folder):
    return {"model.path": f"{folder}/llama", "data.train": f"{folder}/train.jsonl",
            "data.eval": f"{folder}/eval.jsonl"}  # fmt: skip


def test_a_run_in_a_bucket_is_the_local_run(gcs, sft, in_bucket, tmp_path):
    """Base, data and output_dir in a bucket: the run, its --resume and its outputs are the
    local run's, loss for loss; orbax's checkpoints commit there, the lock goes with the run;
    `lora-jax merge` reads the base and the adapter from the bucket and writes the merged
    model there, and the adapter read back loads in peft and merges to the same model."""
    out, paths = f"{in_bucket}/run", bucket_overrides(in_bucket)
    steps(sft, out, 6, **paths)
    names = gcs.names(out)
    assert {"config.json", "metrics.jsonl", "eval.json", "loss.png", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "checkpoints/3/commit_success.txt",
            "checkpoints/6/commit_success.txt"} <= names, names  # fmt: skip
    assert ".lock" not in names and any(n.startswith("tensorboard/events") for n in names)
    err = steps(sft, out, 8, "--resume", **paths)
    assert f"resumed from step 6 ({out}/checkpoints)" in err
    local = tmp_path / "local"
    steps(sft, local, 6)
    steps(sft, local, 8, "--resume")
    in_bucket_losses = [json.loads(line)["loss"] for line in
                        gcs.fs().cat(f"{out}/metrics.jsonl").decode().splitlines()]  # fmt: skip
    np.testing.assert_allclose(in_bucket_losses, losses(local), rtol=1e-6)

    merged = f"{in_bucket}/merged"
    assert cli_main(["merge", "--base", paths["model.path"], "--adapter", f"{out}/adapter",
                     "--out", merged]) == 0  # fmt: skip
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= gcs.names(merged)
    adapter = gcs.get(f"{out}/adapter", tmp_path / "adapter")
    model = gcs.get(merged, tmp_path / "merged")
    base = PEERS["llama"][1].from_pretrained(sft / "llama")
    peer = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        expected = peer_logits(peer.merge_and_unload(), IDS)
    np.testing.assert_allclose(peer_logits(PEERS["llama"][1].from_pretrained(model), IDS),
                               expected, atol=1e-4)  # fmt: skip


def test_two_hosts_with_their_own_disks_finish_through_a_bucket(gcs, sft, in_bucket, tmp_path):
    """Two jax.distributed processes, each with a directory and a cache of its own (a pod's
    hosts), the run's output_dir in the bucket: SIGTERM to one stops both after the same step
    with a checkpoint committed in the bucket; --resume on both finishes the one-process
    curve."""
    from test_train import _free_port

    out = f"{in_bucket}/run"
    common = {"train.steps": 12, "checkpoint.every": 2, "data.pack": False, "mesh.fsdp": 4,
              "mesh.tensor": 2, "mesh.devices": -1, **bucket_overrides(in_bucket)}  # fmt: skip

    def start(*extra):
        port, procs = _free_port(), []
        for pid in range(2):
            host = tmp_path / f"host{pid}"
            host.mkdir(exist_ok=True)
            env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                       LORA_JAX_CACHE=str(host / "cache"), TMPDIR=str(host))  # fmt: skip
            join = {"distributed.coordinator": f"localhost:{port}",
                    "distributed.num_processes": 2, "distributed.process_id": pid}  # fmt: skip
            sets = overrides(sft, out, **common, **join)
            procs.append(cli("train", "--config", LLAMA_SFT, *as_args(sets), *extra, env=env,
                             cwd=host))  # fmt: skip
        return procs

    procs = start()
    first = f"{out}/checkpoints/2/commit_success.txt"
    while procs[0].poll() is None and not gcs.fs().exists(first):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    stopped = set()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        stopped.add(one_line(err).split(":")[1])
    assert len(stopped) == 1 and "stopped by SIGTERM at step" in stopped.pop()
    for p in start("--resume"):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    single = tmp_path / "single"
    steps(sft, single, 12, **{**common, "mesh.devices": 8, **bucket_overrides(sft)})
    in_bucket_losses = [json.loads(line)["loss"] for line in
                        gcs.fs().cat(f"{out}/metrics.jsonl").decode().splitlines()]  # fmt: skip
    # As in test_train's two-process run: the all-reduce sums in another order.
    np.testing.assert_allclose(in_bucket_losses, losses(single), rtol=1e-4)
    assert "adapter/adapter_config.json" in gcs.names(out)


def test_bucket_faults_stop_in_one_line_before_anything_loads(gcs, sft, in_bucket, capsys):
    """A missing bucket, base or data file, a bucket that refuses writes and a folder another
    run holds: exit 2 with one line naming it, and nothing written."""
    out = f"{in_bucket}/run"
    good = bucket_overrides(in_bucket)
    cases = [
        ({"output_dir": "gs://no-such-bucket-lj/run"},
         "the bucket no-such-bucket-lj does not exist"),
        ({"model.path": f"{in_bucket}/absent"}, f"{in_bucket}/absent: not a checkpoint directory"),
        ({"data.train": f"{in_bucket}/absent.jsonl"},
         f"data file {in_bucket}/absent.jsonl does not exist"),
    ]  # fmt: skip
    before = gcs.names(in_bucket)
    for change, message in cases:
        sets = overrides(sft, out, **{**good, **change})
        assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 2
        line = one_line(capsys.readouterr().err)
        assert message in line, line
        assert gcs.names(in_bucket) == before
    refused = f"{gcs.folder()}/run"
    with gcs.refusing_writes():
        sets = overrides(sft, refused, **good)
        assert cli_main(["train", "--config", LLAMA_SFT, *as_args(sets)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"output_dir {refused}: cannot write there" in line, line
    assert gcs.names(in_bucket) == before and not gcs.fs().exists(refused)
    gcs.fs().pipe(f"{out}/.lock", b"pid 7 on host-a (1234)")  # a run elsewhere holds it
    assert cli_main(["train", "--config", LLAMA_SFT, *as_args(overrides(sft, out, **good))]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"output_dir {out} is in use by another run (pid 7 on host-a (1234))" in line, line
    assert f"remove {out}/.lock" in line and gcs.names(out) == {".lock"}


def test_a_data_file_in_a_bucket_is_fetched_once_per_generation(gcs, tmp_path):
    """Rows of a JSONL object are read from a local copy, fetched again only when the object
    changes (its generation), never served stale."""
    url = f"{gcs.folder()}/rows.jsonl"
    gcs.fs().pipe(url, b'{"a": 1}\n{"a": 2}\n')
    assert [open_rows(url).read(i)[0]["a"] for i in range(2)] == [1, 2]
    assert open_rows(url).path == open_rows(url).path  # the same copy, not fetched anew
    gcs.fs().pipe(url, b'{"a": 3}\n')
    rows = open_rows(url)
    assert len(rows) == 1 and rows.read(0) == ({"a": 3}, f"{url}:1")


def test_an_adapter_in_a_bucket_is_replaced_whole(gcs, checkpoints):
    """save_adapter into a bucket folder holding an earlier adapter: only the new one's files
    remain, its config last; a folder holding other files is refused, untouched."""
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from lora_jax import models

    model, params, hf_config = models.from_pretrained(checkpoints / "llama")
    url = gcs.folder()
    for rank in (4, 2):
        config = lj.LoraConfig(rank=rank, targets=("q_proj", "v_proj"))
        layouts = lj.kernel_layouts(model, jnp.asarray(IDS))
        adapted = lj.init(jax.random.key(rank), params, config, layouts)
        lj.save_adapter(url, lj.split(adapted, config)[0], config, hf_config=hf_config)
    assert gcs.names(url) == {"adapter_config.json", "adapter_model.safetensors"}
    loaded, config = lj.load_adapter(url, params)
    assert config.rank == 2
    gcs.fs().pipe(f"{url}/notes.txt", b"mine")
    refused = r"holds files that are not a peft adapter's \(notes.txt\)"
    with pytest.raises(ValueError, match=refused):
        lj.save_adapter(url, loaded, config, hf_config=hf_config)
    assert files.path(url).is_dir() and "notes.txt" in gcs.names(url)


def test_a_bucket_lost_mid_run_stops_it_and_keeps_the_last_whole_checkpoint(gcs, sft, tmp_path):
    """The server killed once the first checkpoint is committed: the run stops in one line
    naming what it could not write (its writes bounded by distributed.timeout_s), exit 2, not
    a hang; with the server back, --resume continues from that last whole checkpoint (the
    half-written one is never listed) and finishes."""
    server = Server(str(tmp_path / "gcs"))
    out = f"{server.folder()}/run"
    sets = overrides(sft, out, **{"train.steps": 400, "checkpoint.every": 20,
                                  "distributed.timeout_s": 20, "train.grad_accum": 1})  # fmt: skip
    run = cli("train", "--config", LLAMA_SFT, *as_args(sets),
              env=dict(os.environ, STORAGE_EMULATOR_HOST=server.url))  # fmt: skip
    first = f"{out}/checkpoints/20/commit_success.txt"
    while run.poll() is None and not server.fs().exists(first):
        time.sleep(0.1)
    server.process.kill()
    server.process.wait()
    _, err = run.communicate(timeout=600)
    assert run.returncode == 2, err[-3000:]
    line = one_line(err)
    assert line.startswith("lora-jax train: writing ") and f"{out}" in line, line
    server = Server(str(tmp_path / "gcs"))  # the same objects, a new port
    try:
        env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url)
        resumed = cli("train", "--config", LLAMA_SFT, *as_args(sets), "--set", "train.steps=40",
                      "--resume", env=env)  # fmt: skip
        printed, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, err[-3000:]
        assert f"resumed from step 20 ({out}/checkpoints)" in printed, [
            line for line in err.splitlines() if "checkpoint" in line
        ][:5]
        assert "adapter/adapter_config.json" in server.names(out)
    finally:
        server.stop()


def test_a_frozen_server_ends_the_run_in_one_line_not_a_hang(sft, tmp_path):
    """A server that takes connections and never answers: every request gives up after
    $LORA_JAX_BUCKET_TIMEOUT_S of silence (and the client's retries), and the run stops in one
    line naming its output_dir, exit 2, nothing trained."""
    server = Server(str(tmp_path / "gcs"))
    out = f"{server.folder()}/run"
    env = dict(os.environ, STORAGE_EMULATOR_HOST=server.url, LORA_JAX_BUCKET_TIMEOUT_S="1")
    try:
        with server.frozen():
            run = cli("train", "--config", LLAMA_SFT, *as_args(overrides(sft, out)), env=env)
            printed, err = run.communicate(timeout=600)
        assert run.returncode == 2, err[-3000:]
        line = one_line(err)
        assert f"output_dir {out}: cannot use it (" in line and "BUCKET_TIMEOUT_S=1 " in line, line
        assert "step" not in printed and not server.fs().exists(out)
    finally:
        server.stop()


def test_of_two_writers_racing_for_an_object_one_creates_it(gcs):
    """The run's lock on a bucket: an object created only where none is (GCS's
    ifGenerationMatch=0), so of two runs taking one folder, the second is told it is held."""
    lock = files.path(f"{gcs.folder()}/.lock")
    assert files.create(lock, b"first") and not files.create(lock, b"second")
    assert lock.read_text() == "first"


def test_a_config_file_in_a_bucket_is_the_local_one(gcs, tmp_path):
    """--config gs://...: the config file fetched and run as the local copy is, its errors
    naming the URL and line."""
    from lora_jax.settings import load_config

    folder = gcs.folder()
    url = gcs.put(Path(LLAMA_SFT), f"{folder}/sft.py")
    assert load_config(url, ["train.steps=7"]) == load_config(LLAMA_SFT, ["train.steps=7"])
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return {'model': 1 / 0}\n")
    url = gcs.put(broken, f"{folder}/broken.py")
    with pytest.raises(ValueError, match=rf"^{url}:2: ZeroDivisionError"):
        load_config(url)
    with pytest.raises(FileNotFoundError, match=rf"config file {folder}/absent.py does not"):
        load_config(f"{folder}/absent.py")
