"""A run as a pod runs it: processes joined by jax.distributed on localhost, each given its own
directory as the hosts of a pod have their own disks; every wait on another process has a
deadline, and a second SIGTERM ends a process whatever it is doing."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from hf_peer import PEERS
from sft_runs import LLAMA_SFT, as_args, cli, overrides
from test_train import _free_port, logged

from lora_jax import models, sharding
from lora_jax.hosts import cluster_processes
from lora_jax.machine import cpu_alone, on_tpu_vm
from lora_jax.models import reading

FOUR_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")


def two_processes(sft, outs, *extra, **changes):
    """`lora-jax train` as processes 0 and 1 of one run, process i writing to outs[i]."""
    port, procs = _free_port(), []
    for pid, out in enumerate(outs):
        join = {"distributed.coordinator": f"localhost:{port}", "distributed.num_processes": 2,
                "distributed.process_id": pid, "mesh.fsdp": 8, "mesh.devices": -1,
                "train.grad_accum": 1}  # fmt: skip
        sets = overrides(sft, out, **join, **changes)
        procs.append(cli("train", "--config", LLAMA_SFT, *as_args(sets), *extra, env=FOUR_DEVICES))
    return procs


def test_processes_that_share_no_output_dir_are_refused_at_start(sft, tmp_path):
    """Two processes, each with an output_dir of its own (a pod's hosts and their disks):
    both stop before anything loads, in one line naming the process that cannot see process
    0's directory; no directory is left behind. (Before, both wrote their shards into their
    own checkpoint directories and waited at the first checkpoint forever.)"""
    outs = [tmp_path / "host0" / "run", tmp_path / "host1" / "run"]
    for p in two_processes(sft, outs, **{"checkpoint.every": 2}):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-3000:]
        line = err.splitlines()[-1]
        assert line.startswith("lora-jax train: output_dir ") and "Traceback" not in err
        assert "is not one directory the run's processes share: process 1 cannot see" in line
        assert "a bucket (output_dir=gs://...) or a shared mount" in line
    assert not outs[0].exists() and not outs[1].exists()


PEER = """
import os, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from lora_jax import hosts
print(hosts.gather(sys.argv[2], "agreeing", 60), flush=True)
if sys.argv[2] == "1":
    sys.stdin.read()  # never at the barrier: until the test closes stdin
    sys.exit(0)
try:
    hosts.barrier("checkpointing step 7", 2)
except hosts.NoAnswer as err:
    print(err, flush=True)
    os._exit(0)  # as `lora-jax` does: at exit jax.distributed would wait for process 1
"""


def test_a_wait_past_its_deadline_names_the_process_that_did_not_answer(tmp_path):
    script, port = tmp_path / "peer.py", _free_port()
    script.write_text(PEER)
    procs = [subprocess.Popen([sys.executable, script, f"localhost:{port}", str(pid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in range(2)]  # fmt: skip
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate("", timeout=120)
    assert procs[0].returncode == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0] == "['0', '1']"  # both met once: the values in process order
    assert lines[1].startswith("process 0: process 1 did not answer within 2 s while "
                               "checkpointing step 7 (")  # fmt: skip
    assert lines[1].endswith("(distributed.timeout_s); stopped.")


def test_a_second_sigterm_ends_a_process_stuck_waiting_for_another(sft, tmp_path):
    """Process 1 frozen mid-run (SIGSTOP): process 0 waits for it inside the coordination
    service or a collective, where Python's handlers cannot run: Ctrl-C and SIGTERM, the
    first asking for a checkpoint that cannot come, end the process at once, in one line."""
    out = tmp_path / "run"
    procs = two_processes(sft, [out, out], **{"train.steps": 400, "distributed.timeout_s": 600})
    metrics = out / "metrics.jsonl"
    while procs[0].poll() is None and len(logged(metrics)) < 2:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGSTOP)
    try:  # two kinds: two SIGTERMs sent together may reach it as one
        procs[0].send_signal(signal.SIGINT)
        procs[0].send_signal(signal.SIGTERM)
        _, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].communicate(timeout=60)
    assert procs[0].returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.splitlines()[-1] == ("lora-jax: stopped at once by a second signal (SIGTERM); "
                                    "the steps since the last checkpoint are lost")  # fmt: skip


def test_a_bad_eval_row_read_by_one_process_stops_both_with_the_training_kept(sft, tmp_path):
    """The eval file's last row truncated, read by one process in the eval after the last
    step: both stop in one line (that one naming file and row, the other naming it), the last
    step checkpointed. (Before, the other process waited in the eval's collectives.)"""
    whole = (sft / "eval.jsonl").read_text()
    eval_file = tmp_path / "eval.jsonl"  # past the rows setup checks (256)
    eval_file.write_text(whole * (300 // whole.count("\n") + 1) + '{"prompt": "ab')
    out = tmp_path / "run"
    procs = two_processes(sft, [out, out], **{"data.eval": eval_file, "train.steps": 2})
    lines = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
        lines.append(err.splitlines()[-1])
    assert all("in the eval after the last step: checkpoint written" in line for line in lines)
    named = [line for line in lines if f"{eval_file}:" in line]
    others = [line for line in lines if "read a bad row of the eval split (see its line)" in line]
    assert len(named) == 1 and len(others) == 1, lines
    assert (out / "checkpoints" / "2").is_dir() and not (out / "adapter").exists()


@pytest.mark.parametrize(
    ("environ", "count"),
    [
        ({}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, 16),
        ({"SLURM_NTASKS": "16"}, 1),  # not in a SLURM job: someone's variable
        ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, 4),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, 4),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, 1),  # a single-host TPU VM
        ({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "a,b"}, 4),  # 2 slices of 2
    ],
)
def test_the_launchers_variables_say_how_many_processes_a_job_has(environ, count):
    assert cluster_processes(environ) == count


def test_a_tpu_vm_is_told_by_its_chips(tmp_path):
    """A Cloud TPU VM joins its slice's other workers (jax reads them from its metadata):
    it is told by its chips' device files; this machine has none."""
    assert not on_tpu_vm()
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the control file every vfio host has
    assert not on_tpu_vm(tmp_path)
    (tmp_path / "accel0").touch()
    assert on_tpu_vm(tmp_path)  # libtpu is installed here (the tpu extra)


def test_a_host_without_a_tpu_hears_nothing_from_libtpu(tmp_path):
    """libtpu installed (the test extra) on a host with no TPU: `import lora_jax` keeps jax
    on the CPU before jax loads, so neither a command nor a notebook's `import jax` after it
    prints libtpu's warnings about the TPU VM it did not find. A TPU's chips, or platforms a
    user chose, are left alone."""
    (tmp_path / "tpu").mkdir()
    (tmp_path / "tpu" / "accel0").touch()
    for environ, dev, expected in (({}, tmp_path, "cpu"), ({"JAX_PLATFORMS": "tpu"}, tmp_path,
                                   "tpu"), ({}, tmp_path / "tpu", None)):  # fmt: skip
        cpu_alone(environ, dev)
        assert environ.get("JAX_PLATFORMS") == expected
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    for command in (["-c", "import lora_jax, jax; print(jax.devices())"],
                    ["-m", "lora_jax.cli", "inspect", str(tmp_path / "nowhere")]):  # fmt: skip
        run = subprocess.run([sys.executable, *command], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert "TPU" not in run.stderr and "libtpu" not in run.stderr, run.stderr
        assert "CpuDevice" in run.stdout or run.stderr.startswith("lora-jax inspect: ")


def per_device_bytes() -> dict:
    """The bytes every live jax array holds on each device."""
    held: dict = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.mark.parametrize("name", sorted(PEERS))
def test_a_base_loaded_over_a_mesh_is_built_in_its_shards(checkpoints, monkeypatch, name):
    """Every family (stacked layers, transposed kernels, GPT-2's untransposed Conv1D, a
    mixture's experts assembled from per-expert tensors) over (fsdp 4, tensor 2): each param
    in its family's sharding, equal to the whole load; every read is one device's slice, and
    no device ever holds more than its final shards plus the largest shard in flight."""
    _, whole, hf_config = models.from_pretrained(checkpoints / name)
    expected = {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(whole)}
    del whole
    mesh = sharding.make_mesh(1, 4, 2)
    reads, peaks, read = [], {}, reading.Checkpoint.read

    def watched(self, tensor_name, index):
        out = read(self, tensor_name, index)
        reads.append(out.nbytes)
        for device, n in per_device_bytes().items():
            peaks[device] = max(peaks.get(device, 0), n)
        return out

    monkeypatch.setattr(reading.Checkpoint, "read", watched)
    before = per_device_bytes()
    _, params, _ = models.from_pretrained(checkpoints / name, mesh=mesh)
    specs = sharding.param_shardings(params, mesh, models.hub.family_of(hf_config)[0].rules)
    shards = []
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(specs), strict=True):  # fmt: skip
        assert got.sharding == want, path
        np.testing.assert_array_equal(np.asarray(got), expected[path])
        shards.append(got.addressable_shards[0].data.nbytes)
    split = [d for d in jax.tree.leaves(specs) if d.spec != jax.sharding.PartitionSpec()]
    assert split, "the rules split nothing: the check below would be empty"
    final = per_device_bytes()
    for device, peak in peaks.items():
        assert peak - before.get(device, 0) <= final[device] - before.get(device, 0) + max(shards)
    assert reads and max(reads) <= max(shards)  # each read one device's slice, never whole
