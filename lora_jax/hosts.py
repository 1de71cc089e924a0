"""The run's processes (the hosts of a pod, the nodes of a GPU job): joining them, and every
wait on another process with a deadline.

The waits go through jax.distributed's coordination service (its key-value store and
barriers, which take a timeout), not through device collectives (which wait forever): each
process writes what it brings under a key of its own, so past the deadline the processes
that did arrive name the ones that did not, and what the run was doing. A process that
dies is noticed by the service itself (its heartbeats stop) and ends the others.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from lora_jax.machine import on_tpu_vm

_PREFIX = "lora_jax"
_rounds = itertools.count()  # each wait's own keys: the service keeps a barrier's name


class NoAnswer(TimeoutError):
    """Another process did not reach a wait within the run's deadline."""


def cluster_processes(environ: Mapping[str, str] = os.environ) -> int:
    """How many processes a launcher's variables say the job has (1 where none says), as
    jax's own cluster detection reads them: SLURM (srun, in a job), Open MPI (mpirun), a
    Cloud TPU slice's workers on GKE (times its slices, for several)."""
    counts = [1]
    if "SLURM_JOB_ID" in environ and environ.get("SLURM_NTASKS"):
        counts.append(int(environ["SLURM_NTASKS"]))
    if environ.get("OMPI_COMM_WORLD_SIZE"):
        counts.append(int(environ["OMPI_COMM_WORLD_SIZE"]))
    if workers := environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES"):
        counts.append(len(workers.split(",")) * int(environ.get("MEGASCALE_NUM_SLICES") or 1))
    return max(counts)


def join(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """Joins the run's other processes once (jax.distributed): as the settings say where
    they name several processes, else where the launcher's variables show several or the
    host is a Cloud TPU VM (its slice's workers are in its metadata), by jax's own detection
    of the coordinator and this process's id; a single process has nothing to do."""
    if jax.distributed.is_initialized():
        return
    if num_processes > 1:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif cluster_processes() > 1 or on_tpu_vm():
        jax.distributed.initialize()


def _client() -> Any:
    from orbax.checkpoint import multihost  # the coordination service's client, public there

    return multihost.get_jax_distributed_client()


def gather(value: str, doing: str, timeout_s: float) -> list[str]:
    """Every process's `value`, in process order (one process: its own). Past `timeout_s`
    seconds without every process's, a `NoAnswer` naming those missing and `doing` (what
    the run was doing, for the message)."""
    count = jax.process_count()
    if count == 1:
        return [value]
    client, round_ = _client(), next(_rounds)
    key, me = f"{_PREFIX}/{round_}", jax.process_index()
    client.key_value_set(f"{key}/{me}", value)
    try:
        client.wait_at_barrier(f"{key}/barrier", int(timeout_s * 1000))
    except Exception as err:  # the service's own error type: DEADLINE_EXCEEDED, or a death
        raise _no_answer(client, key, count, f"{doing} ({_first_line(err)})", timeout_s) from None
    values = dict(client.key_value_dir_get(f"{key}/"))
    # Every process has read the round before this one (it came here after): its key goes,
    # so the service holds two rounds at most however long the run.
    if round_:
        client.key_value_delete(f"{_PREFIX}/{round_ - 1}/{me}")
    return [values[f"{key}/{i}"] for i in range(count)]


def from_process_0(value: str, doing: str, timeout_s: float) -> str:
    """Process 0's `value` on every process (what the others pass is ignored)."""
    return gather(value, doing, timeout_s)[0]


def barrier(doing: str, timeout_s: float) -> None:
    """Returns once every process is here; a `NoAnswer` past the deadline."""
    gather("", doing, timeout_s)


def _no_answer(client: Any, key: str, count: int, doing: str, timeout_s: float) -> NoAnswer:
    arrived = {int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"{key}/")
               if k.rsplit("/", 1)[1].isdigit()}  # fmt: skip
    missing = _names(sorted(set(range(count)) - arrived)) or "another process"
    return NoAnswer(f"process {jax.process_index()}: {missing} did not answer within "
                    f"{timeout_s:g} s while {doing} (distributed.timeout_s); stopped.")  # fmt: skip


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _names(processes: Sequence[int]) -> str:
    if not processes:
        return ""
    word = "process" if len(processes) == 1 else "processes"
    return f"{word} {', '.join(map(str, processes))}"
