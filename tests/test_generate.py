"""KV-cache generation against transformers' generate (greedy, token for token), with and
without adapters, and per-example adapters in one batch."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hf_peer import PEERS, write_word_tokenizer
from small_models import randomize_adapters

import lora_jax as lj
from lora_jax import cli, compose, models

PROMPTS = np.random.RandomState(1).randint(3, 96, (3, 6))
NEW = 10
# Mistral, Qwen3, Gemma 2 and 3 (4) and Phi-3 (5) have windows the prompts (6 tokens) cross.
GREEDY = ["llama", "gpt2", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "mixtral"]


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """Tiny checkpoints with larger random weights (std 0.3), so greedy decoding does not just
    repeat a token and a wrong cache would show. Gemma's norms start at zero (a gain of 1)
    and its embedding, scaled up, dominates a tied head: there the norms get noise too and
    the head is untied."""
    root = tmp_path_factory.mktemp("lively")
    for name in GREEDY:
        config, cls = PEERS[name]
        config = copy.deepcopy(config)
        config.initializer_range = 0.3
        gemma = name.startswith("gemma")
        config.tie_word_embeddings = config.tie_word_embeddings and not gemma
        torch.manual_seed(0)
        model = cls(config).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if gemma and "norm" in param_name:
                    param.normal_(0.0, 0.3)
        model.save_pretrained(root / name)
    return root


def hf_generate(model, ids, mask=None):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), max_new_tokens=NEW, do_sample=False,
                             attention_mask=torch.tensor(np.ones_like(ids) if mask is None
                                                         else mask))  # fmt: skip
    return out.numpy()


def special(hf_model):
    cfg = hf_model.generation_config
    return {"eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}


@pytest.mark.parametrize("name", GREEDY)
def test_greedy_matches_transformers(lively, name):
    peer = PEERS[name][1].from_pretrained(lively / name).eval()
    model, params, _ = models.from_pretrained(lively / name)
    want = hf_generate(peer, PROMPTS)
    got = lj.generate(model, params, PROMPTS, max_new_tokens=NEW, **special(peer))
    np.testing.assert_array_equal(got, want)
    assert all(len(set(row)) > 3 for row in got[:, 6:])  # really decoding, not repeating
    # Left-padded prompts of different lengths, batched.
    mask = np.ones_like(PROMPTS)
    mask[0, :2], mask[2, :4] = 0, 0
    ids = np.where(mask == 1, PROMPTS, special(peer)["eos_token_id"])
    want = hf_generate(peer, ids, mask)
    got = lj.generate(model, params, ids, mask, max_new_tokens=NEW, **special(peer))
    np.testing.assert_array_equal(got, want)


ADAPTED = {  # peft's targets: modules, and a mixture's expert parameters
    "llama": dict(target_modules=["q_proj", "v_proj", "up_proj"]),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "mixtral": dict(
        target_modules=["v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
}


@pytest.mark.parametrize("name", sorted(ADAPTED))
def test_greedy_with_an_adapter_matches_peft(lively, name, tmp_path):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          **ADAPTED[name])  # fmt: skip
    peer = peft.get_peft_model(PEERS[name][1].from_pretrained(lively / name), cfg).eval()
    peer.save_pretrained(tmp_path)
    want = hf_generate(peer, PROMPTS)
    model, params, _ = models.from_pretrained(lively / name)
    adapter, config = lj.load_adapter(tmp_path, params)
    params = lj.combine(adapter, params)
    apply = lj.lora_apply(model.apply, config)
    factored = lj.generate(model, params, PROMPTS, max_new_tokens=NEW, apply_fn=apply,
                           **special(peer))  # fmt: skip
    np.testing.assert_array_equal(factored, want)
    merged = lj.generate(model, lj.merge(params, config), PROMPTS, max_new_tokens=NEW,
                         **special(peer))  # fmt: skip
    np.testing.assert_array_equal(merged, want)
    base = lj.generate(model, lj.unmerge(lj.merge(params, config), adapter, config), PROMPTS,
                       max_new_tokens=NEW, **special(peer))  # fmt: skip
    assert (base != want).any()  # the adapter changes what is written


def test_routed_generation_gives_each_row_its_own_adapter(lively):
    model, params, _ = models.from_pretrained(lively / "llama")
    layouts = lj.kernel_layouts(model, PROMPTS)
    configs = [lj.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")),
               lj.LoraConfig(rank=4, alpha=8.0, targets=("all-linear",))]  # fmt: skip
    adapters = [
        lj.split(randomize_adapters(lj.init(jax.random.key(i), params, c, layouts),
                                      jax.random.key(9 + i), 0.5), c)[0]
        for i, c in enumerate(configs)
    ]  # fmt: skip
    stacked, config = compose.stack(adapters, configs, base=params)
    ids = np.array([1, -1, 0])
    routed = functools.partial(lj.routed_apply(model.apply, config), adapter_ids=ids)
    got = lj.generate(model, lj.combine(stacked, params), PROMPTS, max_new_tokens=NEW,
                      apply_fn=routed)  # fmt: skip
    for row, k in enumerate(ids):
        alone = params if k < 0 else lj.merge(lj.combine(adapters[k], params), configs[k])
        want = lj.generate(model, alone, PROMPTS[row : row + 1], max_new_tokens=NEW)
        np.testing.assert_array_equal(got[row : row + 1], want)
    assert (got[0] != got[2]).any()


def test_sampling_is_seeded_and_respects_top_k(lively):
    model, params, _ = models.from_pretrained(lively / "gpt2")
    sample = functools.partial(lj.generate, model, params, PROMPTS, max_new_tokens=NEW,
                               temperature=1.0)  # fmt: skip
    a, b = sample(key=jax.random.key(0)), sample(key=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    # Settings as numpy or JAX scalars are the same settings (they key the compiled step).
    same = sample(key=jax.random.key(0), temperature=jnp.float32(1.0), top_k=np.int64(0))
    np.testing.assert_array_equal(same, a)
    assert (a != sample(key=jax.random.key(1))).any()
    greedy = lj.generate(model, params, PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(sample(key=jax.random.key(2), top_k=1), greedy)
    np.testing.assert_array_equal(sample(key=jax.random.key(3), top_p=1e-6), greedy)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample()
    for bad in (dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.5)):
        with pytest.raises(ValueError, match=r"want temperature >= 0 .* 0 < top_p <= 1"):
            sample(key=jax.random.key(0), **bad)
    with pytest.raises(ValueError, match="top_k 100000 exceeds the model's 96 tokens"):
        sample(key=jax.random.key(0), top_k=100_000)
    with pytest.raises(ValueError, match="6 prompt \\+ 60 new tokens exceed the model's 64"):
        lj.generate(model, params, PROMPTS, max_new_tokens=60)


def test_generate_again_reuses_its_compiled_steps(lively, compilations):
    """The prefill and decode steps compile on the first call only: new prompts of the same
    shape, or another sampling key, run the programs already compiled."""
    model, params, _ = models.from_pretrained(lively / "llama")
    backend_compiles = lambda: sum("backend_compile" in e for e in compilations)  # noqa: E731
    first = lj.generate(model, params, PROMPTS, max_new_tokens=NEW)
    compiled = backend_compiles()
    assert compiled >= 2  # the prefill and decode steps at least
    again = lj.generate(model, params, PROMPTS[::-1], max_new_tokens=NEW)
    assert backend_compiles() == compiled
    np.testing.assert_array_equal(again, first[::-1])  # each row decodes on its own
    sample = functools.partial(lj.generate, model, params, PROMPTS, max_new_tokens=NEW,
                               temperature=1.0)  # fmt: skip
    a = sample(key=jax.random.key(0))
    compiled = backend_compiles()
    assert (sample(key=jax.random.key(1)) != a).any() and backend_compiles() == compiled


def test_cli_generate_prints_what_generate_writes(lively, capsys):
    write_word_tokenizer(lively / "llama")
    prompts = ["w3 w17 w40 w8", "w61 w5"]
    assert cli.main(["generate", "--model", str(lively / "llama"), "--max-new-tokens", "6",
                     *[a for p in prompts for a in ("--prompt", p)]]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    model, params, _ = models.from_pretrained(lively / "llama")
    ids = np.array([[3, 17, 40, 8], [2, 2, 61, 5]])
    mask = np.array([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = lj.generate(model, params, ids, mask, max_new_tokens=6, eos_token_id=2)
    for prompt, line, row in zip(prompts, lines, out[:, 4:], strict=True):
        assert line == " ".join([prompt, *(f"w{t}" for t in row if t != 2)])
