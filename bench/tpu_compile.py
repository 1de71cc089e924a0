"""Per-chip HBM of lora_jax's LoRA train step on TPU slices, from the real TPU compiler run
here ahead of time (libtpu, no TPU): one table, model shapes x slices x tokens a chip x remat.

Each row runs `lora-jax compile --json` on a shipped config in its own process, with the
model's real config.json (written here: no weights, no network). Beside it:
  bound   an analytical lower bound (`lower_bound`): the sharded base and adapter state,
          the activations the remat policy saves, one layer's least working set and one
          loss chunk
  probe   the plain-JAX FSDP LoRA step of ../shared/bench/tpu_probe.py (no Flax) at the same
          shape, slice, tokens and remat ("projections" against its "dots"), if present

    python bench/tpu_compile.py                  # every row (about 20 minutes on 2 cores)
    python bench/tpu_compile.py --rows 70b       # rows whose name contains this
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from train_throughput import run_script

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT.parent / "shared" / "bench" / "tpu_probe.py"
GIB = 2**30
LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
              tie_word_embeddings=False,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                high_freq_factor=4.0,
                                original_max_position_embeddings=8192))  # fmt: skip
MODELS = {  # config.json of each shape, as the hub has it
    "1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
               rope_scaling=dict(LLAMA3["rope_scaling"], factor=32.0)),
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),
    "70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
    "qwen3-32b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                      hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"],
                         vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-5,
                         rope_theta=1000000.0, router_aux_loss_coef=0.02,
                         tie_word_embeddings=False),
}  # fmt: skip
# (model, shipped config, topology, rows a chip, tokens a row, remat); the configs' own
# settings first. A DPO row is a pair: two sequences of its length.
ROWS = [
    ("8b", "llama3_8b_sft.py", "v5e:4x4", 4, 2048, "full"),
    ("8b", "llama3_8b_sft.py", "v5e:4x4", 1, 2048, "full"),
    ("8b", "llama3_8b_sft.py", "v5e:4x4", 1, 2048, "projections"),
    ("8b", "llama3_8b_dpo.py", "v5e:4x4", 2, 2048, "full"),  # pairs a chip, tokens a side
    ("70b", "llama3_70b_sft.py", "v5e:8x8", 1, 2048, "full"),
    ("70b", "llama3_70b_qlora.py", "v5e:2x4", 1, 2048, "full"),
    ("qwen3-32b", "qwen3_32b_sft.py", "v5e:4x8", 1, 2048, "full"),
    ("mixtral-8x7b", "mixtral_8x7b_sft.py", "v5e:4x4", 2, 2048, "full"),
    ("8b", "llama3_8b_sft.py", "v5e:2x2", 32, 2048, "full"),  # oversized: must not fit
    ("1b", "llama3_1b_sft.py", "v5e:2x2", 2, 1024, "projections"),
    ("1b", "llama3_1b_sft.py", "v5e:1x1", 8, 1024, "projections"),
]
PROBE_REMAT = {"full": "full", "projections": "dots"}


def chips(topology: str) -> int:
    n = 1
    for side in topology.split(":")[1].split("x"):
        n *= int(side)
    return n


def lower_bound(hf: dict, n: int, rows: int, length: int, remat: str, nf4: bool = False,
                rank: int = 16, expert: int = 1) -> float:  # fmt: skip
    """Bytes a chip cannot do without, bfloat16 base and float32 adapter: its shard of the
    base, of the adapter, its gradient and AdamW's two moments; the activations the remat
    policy saves (each layer's input; under "projections" each projection's output too);
    while a layer's backward runs, its largest kernel gathered whole and its projections'
    outputs for the chip's tokens with their gradients; one loss chunk's float32 logits
    (1024 tokens a chip) with their gradient. `nf4`: QLoRA's 4-bit kernels and tables
    (their block scales left out). A mixture (Mixtral): E experts' MLP kernels and adapters,
    each token through k of them, a layer's stacked expert kernel gathered whole; over an
    expert axis of `expert` chips, E / expert of them, and the rows of the tokens of the
    chips along the axis that can reach this chip's experts (the ring of experts)."""
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    vocab = hf["vocab_size"]
    experts, top_k = hf.get("num_local_experts", 1), hf.get("num_experts_per_tok", 1)
    hd = hf.get("head_dim") or d // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * hd, hf["num_key_value_heads"] * hd
    attention, mlp = [(d, q), (d, kv), (d, kv), (q, d)], [(d, f), (d, f), (f, d)]
    tables = 1 if hf.get("tie_word_embeddings") else 2  # the embedding, and the LM head
    per_layer = lambda fn, copies: sum(map(fn, attention)) + copies * sum(map(fn, mlp))  # noqa: E731
    weights = layers * per_layer(lambda s: s[0] * s[1], experts) + tables * vocab * d
    base = (weights * (0.5 if nf4 else 2) + (2 * layers + 1) * d * 2) / n  # NF4: 4 bits
    trained = layers * per_layer(lambda s: rank * (s[0] + s[1]), experts) * 4 * 4 / n
    tokens = rows * length
    outputs = per_layer(lambda s: s[1], top_k)  # each projection's output, per token
    saved = layers * tokens * (d + (outputs if remat == "projections" else 0)) * 2
    local = experts // expert
    largest = max(max(i * o for i, o in attention), local * max(i * o for i, o in mlp))
    mlp_rows = tokens * expert * min(top_k, local)  # a dense MLP: one row a token
    computed = tokens * sum(o for _, o in attention) + mlp_rows * sum(o for _, o in mlp)
    layer = largest * 2 + computed * 2 * 2
    return base + trained + saved + layer + 1024 * vocab * 4 * 2


def ours(config: str, topology: str, rows: int, length: int, remat: str, config_dir: Path) -> dict:
    """`lora-jax compile --json` of a shipped config at this shape, or its error."""
    sets = {"model.path": config_dir, "model.remat": remat, "data.max_length": length,
            "train.batch_size": rows * chips(topology), "train.grad_accum": 1}  # fmt: skip
    command = [sys.executable, "-m", "lora_jax.cli", "compile", "--json", "--topology", topology,
               "--config", str(ROOT / "configs" / config)]  # fmt: skip
    command += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:120]}
    return json.loads(done.stdout)


def probe(model: str, topology: str, rows: int, length: int, remat: str) -> str:
    """The plain-JAX probe's per-chip total (GiB), or why there is none."""
    if not PROBE.exists() or model not in ("8b", "70b") or remat not in PROBE_REMAT:
        return "-"
    command = [sys.executable, str(PROBE), topology, model, str(rows), str(length),
               PROBE_REMAT[remat]]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_HOSTNAMES="localhost")  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, env=env).stdout
    if "COMPILE FAILED" in out:
        return "no fit"
    return out.split(" total ")[1].split()[0] if " total " in out else "failed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="", help="only rows whose name contains this")
    p.add_argument("--no-probe", action="store_true", help="skip the plain-JAX probe")
    args = p.parse_args()
    header = ("row", "chips", "tokens/chip", "args GiB", "temp GiB", "total GiB", "HBM GiB",
              "fits", "bound GiB", "x bound", "probe GiB", "x probe", "compile s")  # fmt: skip
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    with tempfile.TemporaryDirectory() as tmp:
        for model, config, topology, rows, length, remat in ROWS:
            name = f"{config[:-3]} {remat} {topology} {rows}x{length}"
            if args.rows not in name:
                continue
            config_dir = Path(tmp) / model
            config_dir.mkdir(exist_ok=True)
            (config_dir / "config.json").write_text(json.dumps(MODELS[model]))
            got = ours(config, topology, rows, length, remat, config_dir)
            quantized = "qlora" in config
            if "error" in got:
                print(f"{name} | failed: {got['error']}")
                continue
            sequences = rows * (2 if "dpo" in config else 1)
            bound = lower_bound(MODELS[model], got["chips"], sequences, length, remat, quantized,
                                expert=got["mesh"]["expert"])  # fmt: skip
            plain = (
                "-"
                if args.no_probe or quantized or sequences > rows
                else probe(model, topology, rows, length, remat)
            )
            total = got["bytes"] / GIB
            against = f"{total / float(plain):.2f}" if plain.replace(".", "").isdigit() else "-"
            args_gib = (got["bytes"] - got["temp_bytes"]) / GIB
            print(" | ".join([name, str(got["chips"]), str(got["tokens_per_chip"]),
                              f"{args_gib:.2f}", f"{got['temp_bytes'] / GIB:.2f}", f"{total:.2f}",
                              f"{got['hbm_bytes'] / GIB:.2f}", "yes" if got["fits"] else "NO",
                              f"{bound / GIB:.2f}", f"{got['bytes'] / bound:.2f}", plain, against,
                              f"{got['compile_s']:.0f}"]), flush=True)  # fmt: skip


if __name__ == "__main__":
    run_script(main)
