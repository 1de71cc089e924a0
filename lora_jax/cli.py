"""`lora-jax`: command-line entry points. `train` runs a config (the offline quickstart by
default), `eval` scores a run's adapter, `generate` continues prompts, `merge` folds a
peft-format adapter into its base and writes a Hugging Face model directory that
transformers, vLLM or TGI serve as is, `inspect` shows what an adapter learned, `compile`
sizes a config's step for a TPU slice with the TPU compiler."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import jax
from flax import traverse_util

from lora_jax.files import check_target, failure, is_remote, path, resolve
from lora_jax.hosts import NoAnswer
from lora_jax.io import base_for, head_for, load_adapter, read_adapter
from lora_jax.models import abstract_pretrained, config_of, from_pretrained
from lora_jax.models.hub import MODEL_FILES
from lora_jax.models.merged import merge_checkpoint
from lora_jax.models.options import DTYPES
from lora_jax.report import weights_bytes
from lora_jax.signals import Interrupts, Stopped
from lora_jax.tree import KERNEL, Params, combine, sites


def merge_command(args: argparse.Namespace) -> None:
    """`lora-jax merge`: the adapter folded into its base, written as a model directory."""
    out = _same_form(args.out)
    for name, given in (("--base", args.base), ("--adapter", args.adapter)):
        if path(given).exists() and out == _same_form(given):
            raise ValueError(f"--out {args.out} is the {name} directory; merge writes a new "
                             "model directory and never over one of its inputs.")  # fmt: skip
    check_target(args.out, "model", MODEL_FILES)  # before the work, not after
    labels, dtype = head_for(args.adapter, args.base), DTYPES[args.dtype]
    model, params, hf_config = abstract_pretrained(config_of(args.base), dtype, num_labels=labels)
    adapter, config = load_adapter(args.adapter, params)  # checked against the base's shapes
    out = merge_checkpoint(args.base, adapter, config, model, hf_config, args.out, dtype,
                           new_head=labels is not None)  # fmt: skip
    print(
        f"merged {path(args.adapter)} ({weights_bytes(args.adapter):,} bytes) "
        f"into {(hf_config.get('architectures') or [type(model).__name__])[0]} "
        f"from {args.base}: wrote {out} "
        f"({weights_bytes(out):,} bytes, {args.dtype})"
    )


def _same_form(where: str) -> str:
    """A path in the form two names of one place share: resolved locally, a URL as is."""
    return where.rstrip("/") if is_remote(where) else str(Path(where).expanduser().resolve())


def train_command(args: argparse.Namespace) -> None:
    """`lora-jax train`: a config run to the end (or to a signal, checkpointed)."""
    from lora_jax.settings import load_config
    from lora_jax.train import train

    train(load_config(args.config, args.set), resume=args.resume)


def eval_command(args: argparse.Namespace) -> None:
    """`lora-jax eval`: a saved adapter's loss and accuracy on the config's eval split."""
    from lora_jax.io import converted_config
    from lora_jax.run import Run, evaluate, saved_adapter
    from lora_jax.settings import RunConfig, load_config
    from lora_jax.variants import BASE_MODIFYING_INITS

    config = RunConfig.from_dict(load_config(args.config, args.set))
    adapter_dir = path(args.adapter) if args.adapter else path(config.output_dir) / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():  # before loading a model
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (train first, or "
                                "pass --adapter DIR).")  # fmt: skip
    if config.lora.init in BASE_MODIFYING_INITS:  # saved for the original base (rank 2r)
        config = dataclasses.replace(config, lora=converted_config(config.lora))
    run = Run.start(config)
    metrics = evaluate(run, saved_adapter(run, adapter_dir))
    print(
        f"{adapter_dir} on {config.data.eval}: "
        + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )


def generate_command(args: argparse.Namespace) -> None:
    """`lora-jax generate`: each prompt continued, with the adapter run factored."""
    from lora_jax.apply import lora_apply
    from lora_jax.data import Tokenizer
    from lora_jax.generation import generate_text

    model, params, hf_config = from_pretrained(args.model, DTYPES[args.dtype])
    apply_fn = None
    if args.adapter:
        adapter, config = load_adapter(args.adapter, params)
        params, apply_fn = combine(adapter, params), lora_apply(model.apply, config)
    texts = generate_text(model, params, Tokenizer(args.model, hf_config), args.prompt,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, key=jax.random.key(args.seed),
                          apply_fn=apply_fn)  # fmt: skip
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(prompt + text)


def compile_command(args: argparse.Namespace) -> int:
    """Exit 0 when the step fits a chip's HBM, 1 when it does not (the report printed)."""
    from lora_jax import aot
    from lora_jax.models.hub import config_of
    from lora_jax.settings import load_config

    aot.topology_name(args.topology)  # a bad name is refused before anything loads
    # Nothing runs here, it is only compiled: this machine's backend is its CPU, even where
    # libtpu is installed (or the TPU of a VM is busy training). libtpu, loading, looks for
    # the TPU VM it runs on and warns on stderr where it finds none; a compile needs none.
    jax.config.update("jax_platforms", "cpu")
    for name, value in (
        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
    ):
        os.environ.setdefault(name, value)
    config = load_config(args.config, args.set)
    hf_config = config_of(resolve(config["model"]["path"]))
    log = (lambda *_: None) if args.json else print
    print(f"compiling for {args.topology} with the TPU compiler (minutes for a large model)...",
          file=sys.stderr)  # fmt: skip
    if args.search:
        best, tried = _waited(lambda: aot.search(config, hf_config, args.topology, log=log))
        if args.json:
            plain = dataclasses.asdict
            print(json.dumps({**(plain(best) if best else {"topology": args.topology,
                                                          "fits": False}),
                              "tried": [plain(r) for r in tried]}, indent=1))  # fmt: skip
        elif best:
            print(f"largest that fits: {best.micro_batch} rows a micro-batch "
                  f"({best.tokens_per_chip} tokens a chip), remat {best.remat!r}")  # fmt: skip
        else:
            print("nothing fits, not even one row a chip under remat 'full'.")
        return 0 if best else 1
    report = _waited(lambda: aot.compile_step(config, hf_config, args.topology))
    print(json.dumps(dataclasses.asdict(report), indent=1) if args.json else report.line())
    return 0 if report.fits else 1


T = TypeVar("T")


def _waited(work: Callable[[], T]) -> T:
    """`work()` in a thread of its own while this one waits for it: XLA's compiler keeps the
    thread that calls it in C++ for as long as it compiles (minutes for a large model),
    where Python's signal handlers cannot run. Waiting here, Ctrl-C and SIGTERM end the
    command within a second; the compile is abandoned with the process."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = work()
        except BaseException as err:  # handed to the waiting thread, which raises it
            done["error"] = err

    thread = threading.Thread(target=run, name="compile", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in done:
        raise done["error"]
    return done["value"]


def _on_base(adapter: Params, base: Params, adapter_dir: str, base_dir: str) -> dict:
    """The adapter read from files with its kernels taken from the base."""
    flat, params = traverse_util.flatten_dict(adapter), traverse_util.flatten_dict(base["params"])
    for site in sites(adapter):
        kernel = params.get((*site.keys, KERNEL))
        if kernel is None or kernel.shape != site.kernel.shape:
            has = f"a kernel {kernel.shape}" if kernel is not None else "no kernel"
            raise ValueError(f"{adapter_dir} does not fit the base {base_dir}: {site.path} needs a "
                             f"kernel {site.kernel.shape}; the base has {has} there.")  # fmt: skip
        flat[(*site.keys, KERNEL)] = kernel
    return traverse_util.unflatten_dict(flat)


def inspect_command(args: argparse.Namespace) -> None:
    """`lora-jax inspect`: the analysis rows of an adapter as a table or JSON, and figures."""
    from lora_jax import analysis, inspection

    params, config = read_adapter(args.adapter)
    amp = phi = None
    if args.base:
        _, base, _ = base_for(args.adapter, args.base)
        params = _on_base(params, base, args.adapter, args.base)
        amp = analysis.amplification(params, config)
    if args.against:
        other, _ = read_adapter(args.against)
        try:
            phi = analysis.subspace_similarity(params, other)
        except ValueError as err:
            raise ValueError(f"{args.adapter} against {args.against}: {err}") from err
    rows = inspection.rows(params, config, amp, phi)
    pngs = inspection.write_figures(inspection.figures(rows, phi), path(args.out or args.adapter))
    if args.json:
        clean = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731 (NaN)
        rows = [{k: clean(v) for k, v in r.items()} for r in rows]
        print(json.dumps({"adapter": args.adapter, "base": args.base, "against": args.against,
                          "rows": rows, "pngs": [str(p) for p in pngs]}, indent=1))  # fmt: skip
        return
    print(inspection.table(rows))
    print("figures: " + ", ".join(str(p) for p in pngs))


# Where each command is documented (docs/ in the repository).
DOCS = "https://github.com/lora-jax/lora_jax/blob/main/docs/"
COMMAND_DOCS = {
    "train": "training.md",
    "eval": "training.md",
    "generate": "composition.md",
    "merge": "adapters.md",
    "inspect": "analysis.md",
    "compile": "tpu-pods.md",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="Python file with get_config() (default: the quickstart)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. train.steps=100 (repeatable); every key, its "
        f"default and its cost: {DOCS}training.md",
    )


def _command(commands: Any, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends by naming the page that documents it."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"Documented in {DOCS}{COMMAND_DOCS[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the link whole, unwrapped
    )


def parser() -> argparse.ArgumentParser:
    """The `lora-jax` argument parser: one subcommand per command, each naming its page."""
    root = argparse.ArgumentParser(prog="lora-jax", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    train_p = _command(commands, "train", "LoRA-fine-tune a model from a config")
    _config_args(train_p)
    train_p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest readable checkpoint of output_dir",
    )
    train_p.set_defaults(run=train_command)
    eval_p = _command(commands, "eval", "loss and accuracy of a run's adapter")
    _config_args(eval_p)
    eval_p.add_argument("--adapter", help="peft-format adapter (default: output_dir/adapter)")
    eval_p.set_defaults(run=eval_command)
    gen_p = _command(commands, "generate", "continue prompts with a model (and adapter)")
    gen_p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    gen_p.add_argument("--adapter", help="peft-format adapter directory (factored, unmerged)")
    gen_p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen_p.add_argument("--max-new-tokens", type=int, default=64)
    gen_p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen_p.add_argument("--top-k", type=int, default=0)
    gen_p.add_argument("--top-p", type=float, default=1.0)
    gen_p.add_argument("--seed", type=int, default=0)
    gen_p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen_p.set_defaults(run=generate_command)
    merge_p = _command(commands, "merge", "fold an adapter into its base model")
    merge_p.add_argument("--base", required=True, help="Hugging Face checkpoint directory")
    merge_p.add_argument("--adapter", required=True, help="peft-format adapter directory")
    merge_p.add_argument("--out", required=True, help="output model directory")
    merge_p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="dtype of the written weights; the sum is formed in float32",
    )
    merge_p.set_defaults(run=merge_command)
    inspect_p = _command(
        commands, "inspect", "what an adapter learned: spectrum, amplification, subspace similarity"
    )
    inspect_p.add_argument("adapter", help="peft-format adapter directory")
    inspect_p.add_argument(
        "--base",
        help="its base model directory: adds the amplification "
        "of W's directions (the LoRA paper's Table 7)",
    )
    inspect_p.add_argument(
        "--against",
        help="another adapter directory: the similarity φ of "
        "their subspaces per shared module (the paper's Figures 3-4)",
    )
    inspect_p.add_argument("--out", help="directory for the PNGs (default: the adapter's)")
    inspect_p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect_p.set_defaults(run=inspect_command)
    compile_p = _command(
        commands, "compile", "compile a config's train step for a TPU slice, here, with libtpu"
    )
    _config_args(compile_p)
    compile_p.add_argument(
        "--topology", required=True, help="a TPU slice: v5e:4x4 (chip:shape) or v5e-16, v4-32"
    )
    compile_p.add_argument(
        "--search",
        action="store_true",
        help="find the largest micro-batch a chip holds, and under which remat policy",
    )
    compile_p.add_argument("--json", action="store_true", help="print JSON instead of a line")
    compile_p.set_defaults(run=compile_command)
    return root


class WholeLines:
    """While active, sys.stderr keeps each thread's output whole, a line at a time: text is
    held per thread until its newline (or a progress bar's carriage return), then written in
    one piece. Background writer threads (orbax's, tensorstore's) print tracebacks while a
    command reports its failure; without this, pieces of their lines and of the command's
    one-line error interleave, and the error is no longer a line of its own.

    One traceback is dropped whole: tensorstore's callbacks into the event loop orbax has
    already closed after a failed checkpoint write (only asyncio's frames, ending in
    "RuntimeError: Event loop is closed"). The write's failure itself is the command's
    error line; these say nothing more, a dozen times over."""

    def __init__(self) -> None:
        self.lock, self.partial, self.held = threading.Lock(), {}, {}

    def __enter__(self) -> WholeLines:
        self.stream, sys.stderr = sys.stderr, self
        return self

    def write(self, text: str) -> int:
        with self.lock:
            thread = threading.get_ident()
            pending = self.partial.pop(thread, "") + text
            cut = max(pending.rfind("\n"), pending.rfind("\r")) + 1
            if cut:
                self.stream.write(self._unheld(thread, pending[:cut]))
                self.stream.flush()
            if pending[cut:]:
                self.partial[thread] = pending[cut:]
        return len(text)

    def _unheld(self, thread: int, lines: str) -> str:
        """`lines` less any traceback of a closed event loop (held until its last line)."""
        out = []
        for line in lines.splitlines(keepends=True):
            block = self.held.get(thread)
            if block is None and line.startswith("Traceback (most recent call last):"):
                self.held[thread] = [line]
            elif block is None:
                out.append(line)
            elif line[:1].isspace():
                block.append(line)
            else:  # the exception's line ends the traceback
                del self.held[thread]
                files = [b for b in block if b.lstrip().startswith("File ")]
                noise = line.strip() == "RuntimeError: Event loop is closed" and all(
                    f"{os.sep}asyncio{os.sep}" in f for f in files
                )
                out += [] if noise else [*block, line]
        return "".join(out)

    def flush(self) -> None:
        self.stream.flush()  # a line still open stays held: it is not whole yet

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno: the stream's
        return getattr(self.stream, name)

    def __exit__(self, *exc: Any) -> None:
        sys.stderr = self.stream
        with self.lock:
            for text in [*("".join(b) for b in self.held.values()), *self.partial.values()]:
                self.stream.write(text)
            self.partial.clear()
            self.held.clear()
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Runs one command; bad input ends with its message on stderr and exit status 2, Ctrl-C
    (a second one, for `train`, which checkpoints on the first) with "interrupted" and 130
    (SIGTERM: 143), a training run stopped by a signal after its checkpoint with 128 + the
    signal; 0 only when the work finished: a signal that reached the command is never lost,
    even where its KeyboardInterrupt was swallowed (in a finalizer, say)."""
    args = parser().parse_args(argv)
    with Interrupts() as interrupts, WholeLines():
        try:
            status = args.run(args) or 0
        except Stopped as stopped:  # checkpointed; not finished, so not 0
            print(f"lora-jax {args.command}: {stopped}", file=sys.stderr)
            return 128 + stopped.signum
        except NoAnswer as err:
            # Ended now: at exit, jax.distributed would wait for the process that did not
            # answer (shutdown_timeout_seconds, 5 minutes). Every file is written whole.
            print(f"lora-jax {args.command}: {err}", file=sys.stderr, flush=True)
            os._exit(2)
        except (ValueError, FileNotFoundError, OSError, ImportError, FloatingPointError) as err:
            print(f"lora-jax {args.command}: {str(err) or failure(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # every file is written atomically: nothing half-written
            status = None
    if status is None or interrupts.received:
        print(f"lora-jax {args.command}: interrupted", file=sys.stderr)
        return 128 + (interrupts.received or [signal.SIGINT])[0]
    return status


def exit_with(status: int) -> NoReturn:
    """Ends the process with `status`; a failed command at once, once its line is out and the
    run's other processes have left jax.distributed with it (process 0 serves them): a
    bucket that stopped answering leaves orbax's and tensorstore's writer threads waiting on
    it, and the interpreter would wait for them at exit. Every file is whole by then. What
    multiprocessing holds (data workers' queues and their semaphores) is released first, as
    a normal exit would: else its resource tracker warns of leaked semaphores."""
    if status == 0:
        sys.exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    for signum in (signal.SIGINT, signal.SIGTERM):  # another one now: ended at once
        signal.signal(signum, lambda *_: os._exit(status))
    # The command's line is out: a background thread that fails as the process ends (a
    # client's, whose bucket is gone) or a finalizer says nothing more.
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda unraisable: None
    jax.distributed.shutdown()  # nothing to do in a run of one process
    gc.collect()  # the failed run's objects (held in cycles by its traceback) finalized
    multiprocessing.util._exit_function()  # the exit handler it registers; ours skips atexit
    os._exit(status)


if __name__ == "__main__":
    exit_with(main())
