"""`lora-jax compile`: a run's train step compiled ahead of time for a TPU slice, on any
machine, before renting the slice.

With libtpu installed (`pip install "lora_jax[tpu]"`), `jax.experimental.topologies` gives
the devices of a TPU topology (v5e:4x4 is 16 chips) without a TPU, and `jit(...).lower(...)
.compile()` on them runs the real TPU compiler: it assigns every buffer of the step in a
chip's HBM and refuses a step that does not fit, exactly as it would on the slice. Nothing
is read but the checkpoint's config.json (the params are shapes, `abstract_pretrained`),
nothing is allocated, and the step is the one `lora-jax train` builds (`lora_jax.run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax import run, sharding
from lora_jax.settings import RunConfig

CHIPS = ("v2", "v3", "v4", "v5e", "v5p", "v6e")
# Cloud TPU slice names: v5e / v6e count chips (a 2D torus), v4 / v5p TensorCores, two a
# chip (a 3D torus of chips); the topology each names, as `gcloud` creates it.
TORUS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}  # fmt: skip
TORUS_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8",
            512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}  # fmt: skip
FORMS = (
    "CHIP:SHAPE with CHIP one of v2, v3, v4, v5e, v5p, v6e (v5e:4x4, v4:2x2x2), or a Cloud "
    f"TPU type: v5e-N / v5litepod-N / v6e-N (N chips: {', '.join(map(str, TORUS_2D))}), v4-N / "
    f"v5p-N (N TensorCores: {', '.join(map(str, TORUS_3D))})"
)
# Policies by how much the backward recomputes, least first (the fastest step that fits).
REMAT_ORDER = ("none", "dots", "projections", "dots_no_batch", "full")
# The TPU compiler's refusal: "... HLO temporaries (40.00G) exceeds available HBM (15.75G)".
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\) exceeds available HBM "
                         r"\(([\d.]+)([KMGT])\)")  # fmt: skip
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_hbm(err: Exception) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the compiler's refusal, else None."""
    if m := _OUT_OF_HBM.search(str(err)):
        return round(float(m[1]) * _UNITS[m[2]]), round(float(m[3]) * _UNITS[m[4]])
    return None


def topology_name(name: str) -> str:
    """jax's CHIP:SHAPE name for a topology given in either form; ValueError listing both."""
    if (m := re.fullmatch(r"(v\w+):[1-9]\d*(x[1-9]\d*){1,2}", name)) and m[1] in CHIPS:
        return name
    if (m := re.fullmatch(r"(v5e|v5litepod|v6e)-(\d+)", name)) and int(m[2]) in TORUS_2D:
        return f"{'v6e' if m[1] == 'v6e' else 'v5e'}:{TORUS_2D[int(m[2])]}"
    if (m := re.fullmatch(r"(v4|v5p)-(\d+)", name)) and int(m[2]) in TORUS_3D:
        return f"{m[1]}:{TORUS_3D[int(m[2])]}"
    raise ValueError(f"topology {name!r} is not a TPU topology this knows; give {FORMS}.")


def topology_devices(name: str) -> list[Any]:
    """The devices of a TPU topology, for compiling only (no TPU needed, libtpu is)."""
    from jax.experimental import topologies

    jax_name = topology_name(name)
    try:
        import libtpu  # noqa: F401 (the TPU compiler, which jax loads itself)
    except ImportError:
        raise ImportError(
            "compiling for a TPU needs libtpu at jax's version: pip install "
            '"lora_jax[tpu]" (or "jax[tpu]"); no TPU is needed.'
        ) from None
    # Compiling needs no TPU: several processes may hold libtpu at once (the tests do).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    shape = [int(n) for n in jax_name.split(":")[1].split("x")]
    # A slice under a host's 2x2 chips (v5e-1) is one host holding just those chips.
    hosts = (
        {"chips_per_host_bounds": shape + [1] * (3 - len(shape))} if math.prod(shape) < 4 else {}
    )
    # v4 and v5p chips hold two TensorCores, run as one device each ("megacore", as MaxText
    # compiles them): a mesh is laid over chips.
    if jax_name.split(":")[0] in ("v4", "v5p"):
        hosts["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(topology_name=jax_name, platform="tpu", **hosts)
        return list(desc.devices)
    except (RuntimeError, ValueError) as err:  # a shape the compiler refuses
        raise ValueError(f"topology {name!r} ({jax_name}): {str(err).splitlines()[0]}") from None


_HBM: dict[str, int] = {}


def hbm_bytes(devices: list[Any]) -> int:
    """A chip's usable HBM as the TPU compiler counts it (v5e: 15.75 GiB of 16), read off its
    refusal of a step needing a TiB a chip: the compiler's own number, for every chip kind."""
    kind = devices[0].device_kind
    if kind in _HBM:
        return _HBM[kind]
    mesh = Mesh(np.array(devices), ("chips",))
    big = jax.ShapeDtypeStruct((len(devices) * 2**38,), np.float32,  # 1 TiB a chip
                               sharding=NamedSharding(mesh, PartitionSpec("chips")))  # fmt: skip
    try:
        jax.jit(lambda x: x + 1).lower(big).compile()
    except Exception as err:
        if refusal := _out_of_hbm(err):
            _HBM[kind] = refusal[1]
            return _HBM[kind]
        raise
    raise RuntimeError(f"the TPU compiler fit a TiB on one {kind}: its HBM is unknown.")


@dataclasses.dataclass(frozen=True)
class Report:
    """What one compile found, per chip (bytes), with the step's shape."""

    topology: str
    chips: int
    device_kind: str
    hbm_bytes: int
    fits: bool
    bytes: int  # what the step needs: arguments + outputs - donated + temporaries
    base_bytes: int  # the frozen base's share of the arguments
    trained_bytes: int  # the adapter's and its optimizer state's
    temp_bytes: int  # the compiler's temporaries (activations, gathered weights, ...)
    remat: str
    micro_batch: int  # rows a micro-batch, over all chips
    max_length: int
    tokens_per_chip: int  # a micro-batch's tokens on each chip
    compile_s: float
    mesh: dict[str, int]  # the mesh's axis sizes: {"data": 1, "fsdp": 8, "expert": 2, ...}
    compiled: bool = True  # False: the weights alone overflow a chip, found before compiling

    def line(self) -> str:
        """One line a person reads: the bytes, the verdict."""
        gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        verdict = "fits" if self.fits else "does NOT fit"
        how = (f"compiled in {self.compile_s:.0f} s" if self.compiled else
               "not compiled: the weights alone overflow a chip")  # fmt: skip
        return (
            f"{self.topology} ({self.chips} x {self.device_kind}, mesh "
            f"{' x '.join(f'{a} {n}' for a, n in self.mesh.items())}), remat {self.remat!r}, "
            f"{self.tokens_per_chip} tokens a chip: {gib(self.bytes)} a chip (base "
            f"{gib(self.base_bytes)}, adapter + optimizer {gib(self.trained_bytes)}, temporaries "
            f"{gib(self.temp_bytes)}) of {gib(self.hbm_bytes)} HBM: {verdict}; {how}"
        )


def abstract_setup(cfg: RunConfig, hf_config: Mapping[str, Any], devices: list[Any]) -> run.Setup:
    """`run.Setup` of shapes only on `devices`: the model, the adapted params as
    `jax.ShapeDtypeStruct`s and their shardings, built by the train runner's own steps."""
    from lora_jax.models.hub import abstract_pretrained, family_of

    run.check_base(cfg, dict(hf_config), cfg.model.path)
    model, params, hf_config = abstract_pretrained(dict(hf_config), **run.model_options(cfg))
    mesh = run.run_mesh(cfg.mesh, cfg.train, devices)
    example = np.zeros((1, 2), np.int32)
    params = jax.eval_shape(lambda p: run.adapted(cfg, model, p, example), params)
    rules = family_of(hf_config)[0].rules
    return run.Setup(cfg, mesh, model, *run.on_mesh(params, mesh, rules, cfg.lora, put=False))


def _on(tree: Any, shardings: Any) -> Any:
    """Shapes carrying their shardings, as `jit(...).lower` takes abstract arguments."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _per_chip(tree: Any, shardings: Any) -> int:
    """Bytes of one chip's shards of a sharded tree of shapes."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
        tree,
        shardings,
    )
    return sum(jax.tree.leaves(sizes))


def compile_step(config: Mapping[str, Any] | RunConfig, hf_config: Mapping[str, Any],
                 topology: str) -> Report:  # fmt: skip
    """Compiles `lora-jax train`'s step for `config` on a TPU `topology` (either form of
    `topology_name`) and reports what a chip needs. A step that overflows HBM is a report
    with fits False, not an error."""
    cfg = RunConfig.from_dict(config)
    devices = topology_devices(topology)
    setup = abstract_setup(cfg, hf_config, devices)
    tx = run.run_tx(setup, False)
    shardings = run.step_shardings(setup, tx)
    step = run.make_train_step(setup, tx, shardings)
    opt_state = jax.eval_shape(tx.init, setup.adapter)
    rows, length = cfg.train.batch_size, setup.task.row_length(cfg.data)
    shapes = setup.task.batch_shapes(cfg.data, rows)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings.batch)
             for k, (shape, dtype) in shapes.items()}  # fmt: skip
    scalar = jax.ShapeDtypeStruct((), np.int32, sharding=shardings.scalar)
    start = time.perf_counter()
    hbm = hbm_bytes(devices)
    base = _per_chip(setup.base, shardings.base)
    trained = _per_chip((setup.adapter, opt_state), (shardings.adapter, shardings.opt_state))
    temp, total, compiled = 0, base + trained, False
    # Weights that overflow a chip alone need no compile (minutes, for an absurd size).
    if total <= hbm:
        lowered = step.lower(_on(setup.adapter, shardings.adapter),
                             _on(opt_state, shardings.opt_state), _on(setup.base, shardings.base),
                             batch, scalar)  # fmt: skip
        compiled = True
        try:
            memory = lowered.compile().memory_analysis()
            temp = memory.temp_size_in_bytes
            total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + temp
                     - memory.alias_size_in_bytes)  # fmt: skip
        except Exception as err:
            if not (refusal := _out_of_hbm(err)):
                raise
            temp = refusal[0]
            total = base + trained + temp  # the compiler stopped before counting the rest
    shards = sharding.batch_shards(setup.mesh)
    micro = rows // cfg.train.grad_accum
    return Report(
        topology=topology, chips=len(devices), device_kind=devices[0].device_kind,
        hbm_bytes=hbm, fits=total <= hbm, bytes=total, base_bytes=base, trained_bytes=trained,
        temp_bytes=temp, remat=cfg.model.remat, micro_batch=micro, max_length=cfg.data.max_length,
        tokens_per_chip=micro * length // shards, compile_s=time.perf_counter() - start,
        mesh=dict(setup.mesh.shape), compiled=compiled,
    )  # fmt: skip


def search(config: Mapping[str, Any] | RunConfig, hf_config: Mapping[str, Any], topology: str,
           policies: tuple[str, ...] = REMAT_ORDER,
           log=print) -> tuple[Report | None, list[Report]]:  # fmt: skip
    """The largest micro-batch a chip holds, and under which remat policy (MaxText's
    estimator does the same): policies in order of least recompute, micro-batches of 1, 2,
    4, ... rows a chip until one does not fit; a later policy (more recompute) is tried only
    from twice the best so far, where it could do better. Returns (the best: most tokens a
    chip, then least recompute; None if nothing fits, every report tried)."""
    base = RunConfig.from_dict(config).to_dict()
    shards = _batch_shards(base, topology)
    tried, best = [], None
    for remat in policies:
        rows = 2 * best.micro_batch // shards if best else 1
        while True:
            report = compile_step(_with(base, remat, rows * shards), hf_config, topology)
            tried.append(report)
            log(report.line())
            if not report.fits:
                break
            best, rows = report, rows * 2
    return best, tried


def _with(config: dict, remat: str, micro: int) -> dict:
    out = {**config, "model": {**config["model"], "remat": remat}}
    accum = config["train"]["grad_accum"]
    out["train"] = {**config["train"], "batch_size": micro * accum}
    return out


def _batch_shards(config: dict, topology: str) -> int:
    """data x fsdp x expert of the config's mesh on this topology: the chips a micro-batch
    splits over."""
    made = run.settings_mesh(RunConfig.from_dict(config).mesh, topology_devices(topology))
    return sharding.batch_shards(made)
