"""LoraConfig: which kernels get an adapter, of what rank and scale, and how it starts."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax import variants

# gaussian/kaiming: random A, B = 0. pissa/olora: A, B from W0's SVD/QR, W0 replaced by the
# residual so the output is unchanged (they rewrite the base; see lj.init and lj.save_adapter).
# loftq: A, B and the quantized base fitted together, by lj.loftq (it needs the quantizer).
LOFTQ = "loftq"
INITS = (*variants.INITS, LOFTQ)

# Presets usable in `targets`. "all-linear" is resolved in code (every kernel but the output
# head); "attention" is a regex over module paths.
ALL_LINEAR = "all-linear"
ATTENTION = "attention"
PRESETS = (ALL_LINEAR, ATTENTION)
ATTENTION_PATTERN = (
    r"(^|/)[^/]*(attn|attention)[^/]*(/|$)"
    r"|(^|/)(q_proj|k_proj|v_proj|o_proj|query|key|value)$"
)
# Module names treated as the output head, which "all-linear" leaves alone (as peft does):
# adapting the head is rarely wanted and its vocabulary-sized kernel dominates the cost.
HEAD_NAMES = ("lm_head", "classifier", "score", "head")
# A mixture of experts' router (transformers: mlp.gate), which "all-linear" leaves alone too:
# training the routing is a choice to make by name (targets "mlp/gate$").
ROUTER_NAMES = ("gate", "router")


@dataclasses.dataclass(frozen=True)
class AdaLora:
    """AdaLoRA's rank allocation (peft's AdaLoraConfig fields): `LoraConfig.rank` is the
    initial rank of each update s·A·diag(E)·B; from step `tinit` to `total_steps - tfinal`
    the budget falls on a cubic schedule to `target_rank` per module on average, every
    `delta_t` steps the least important singular values (E entries) are zeroed, and from
    `total_steps - tfinal` on the final pattern is kept. Importance is |w·∇w| smoothed by
    EMAs with `beta1` (sensitivity) and `beta2` (uncertainty); `orth_reg_weight` weighs the
    penalty that keeps A and B orthogonal. `total_steps` None: set by `lora-jax train`."""

    target_rank: int = 8
    total_steps: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    def __post_init__(self) -> None:
        for name in ("target_rank", "tinit", "tfinal", "delta_t", "total_steps"):
            value, least = getattr(self, name), 1 if name in ("target_rank", "delta_t") else 0
            if value is None and name == "total_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"AdaLora.{name} is {value!r}; must be an int >= {least}.")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLora.{name} is {getattr(self, name)}; must be in (0, 1).")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"AdaLora.orth_reg_weight is {self.orth_reg_weight}; must be >= 0.")
        if self.total_steps is not None and self.tinit >= self.total_steps - self.tfinal:
            raise ValueError(
                f"AdaLora: tinit {self.tinit} >= total_steps {self.total_steps} - "
                f"tfinal {self.tfinal} leaves no steps to reduce the budget."
            )

    @property
    def final_step(self) -> int:
        """The step at which the budget reaches target_rank and the pattern is fixed."""
        if self.total_steps is None:
            raise ValueError("AdaLora.total_steps is not set: give the run's number of steps.")
        return self.total_steps - self.tfinal


def _patterns(value: str | Iterable[str], name: str) -> tuple[str, ...]:
    """A field's regexes (or presets) as a tuple, each checked to compile."""
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"LoraConfig.{name} holds {item!r}; expected regex strings.")
        if item in PRESETS:
            continue
        try:
            re.compile(item)
        except re.error as err:
            raise ValueError(f"LoraConfig.{name}: {item!r} is not a valid regex ({err}).") from err
    return items


def _as_pairs(value: Mapping[str, Any], name: str) -> tuple[tuple[str, Any], ...]:
    pairs = tuple(dict(value).items())
    _patterns([k for k, _ in pairs], name)
    return pairs


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how: rank r, scale alpha/r, targets as regexes over module paths.

    `targets` and `exclude` are regular expressions searched in the '/'-joined module path of
    each kernel (e.g. "layers/attn/q_proj"), or the presets "all-linear" (every kernel but
    the output head and a mixture's router) and "attention"; "experts" names a mixture's
    expert kernels (each expert its own factors). `rank_pattern` and `alpha_pattern`
    override rank and alpha per path (first matching regex wins, as in peft).
    `modules_to_save` are regexes over full leaf paths (e.g. "classifier") of params trained
    in full and saved with the adapter. `dropout` applies to the adapter's
    input only when a "dropout" rng is given. `dtype` is the adapter params' dtype (float32
    when None, whatever the base's dtype).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    exclude: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    dropout: float = 0.0
    init: str = "gaussian"
    dtype: Any = None
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    use_dora: bool = False
    adalora: AdaLora | None = None

    def __post_init__(self) -> None:
        # Normalise to tuples so the config is hashable and usable as a jit static argument.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("targets", _patterns(self.targets, "targets"))
        set_("exclude", _patterns(self.exclude, "exclude"))
        set_("modules_to_save", _patterns(self.modules_to_save, "modules_to_save"))
        set_("rank_pattern", _as_pairs(self.rank_pattern, "rank_pattern"))
        set_("alpha_pattern", _as_pairs(self.alpha_pattern, "alpha_pattern"))
        if not self.targets:
            raise ValueError("LoraConfig.targets is empty: name at least one module regex.")
        for where, rank in (("rank", self.rank), *self.rank_pattern):
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"LoraConfig rank for {where!r} is {rank!r}; must be an int >= 1.")
        for where, alpha in (("alpha", self.alpha), *self.alpha_pattern):
            if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
                raise ValueError(f"LoraConfig alpha for {where!r} is {alpha!r}; must be a "
                                 "finite number > 0.")  # fmt: skip
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout is {self.dropout}; must be in [0, 1).")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init is {self.init!r}; choose one of {INITS}.")
        if self.adalora is not None:
            others = {"use_dora": self.use_dora, "use_rslora": self.use_rslora,
                      "init": self.init != "gaussian", "rank_pattern": self.rank_pattern,
                      "alpha_pattern": self.alpha_pattern}  # fmt: skip
            if clash := [k for k, v in others.items() if v]:
                raise ValueError(f"LoraConfig.adalora with {clash[0]}: AdaLoRA has its own "
                                 "update (s·A·diag(E)·B, s = alpha/rank), start (E = 0, A and B "
                                 "~ N(0, 0.02)), one initial rank and alpha, and no DoRA, as in "
                                 "peft.")  # fmt: skip
            if self.adalora.target_rank > self.rank:
                raise ValueError(f"LoraConfig.adalora.target_rank {self.adalora.target_rank} "
                                 f"exceeds the initial rank {self.rank}.")  # fmt: skip
        set_("dtype", jnp.dtype(self.dtype if self.dtype is not None else jnp.float32))

    def rank_for(self, path: str) -> int:
        """The rank for a module path: the first matching rank_pattern, else `rank`."""
        return next((r for pat, r in self.rank_pattern if re.search(pat, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha for a module path: the first matching alpha_pattern, else `alpha`."""
        return next((a for pat, a in self.alpha_pattern if re.search(pat, path)), self.alpha)

    def scale_for(self, path: str, rank: int) -> float:
        """The factor that multiplies A·B at this path: α/r, or α/√r with rsLoRA."""
        return variants.scale(self.alpha_for(path), rank, self.use_rslora, self.adalora is not None)

    def is_target(self, path: str, presets: bool = True) -> bool:
        """Whether the kernel at this module path gets an adapter (presets=False: regexes only)."""
        if any(re.search(pat, path) for pat in self.exclude):
            return False
        chosen = self.targets if presets else [t for t in self.targets if t not in PRESETS]
        return any(_matches(t, path) for t in chosen)

    def is_saved(self, leaf_path: str) -> bool:
        """Whether a leaf (by full path, e.g. "classifier/kernel") is trained in full."""
        return any(re.search(pat, leaf_path) for pat in self.modules_to_save)


def _matches(target: str, path: str) -> bool:
    if target == ALL_LINEAR:
        parts = path.split("/")
        return not any(p in HEAD_NAMES for p in parts) and parts[-1] not in ROUTER_NAMES
    if target == ATTENTION:
        return re.search(ATTENTION_PATTERN, path) is not None
    return re.search(target, path) is not None
