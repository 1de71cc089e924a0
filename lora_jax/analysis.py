"""What an adapter learned: the LoRA paper's analyses (Hu et al. 2021, Section 7) as functions.

Each adapted module's update is ΔW = s·A·B per layer (s = α/r, or α/√r with rsLoRA). lora_jax
writes x·W, so A is (in, r), B (r, out) and ΔW (in, out): the transpose of the paper's W·x,
which swaps its "left" and "right" singular vectors (the docstrings below use the paper's
words). Everything runs on the host in float64 from the thin QR factors of A and B, so ΔW
itself is never formed, and a base kernel W is read one layer at a time. Stacked (scanned)
layers give one result per layer. For DoRA adapters ΔW is the low-rank s·A·B, before the
magnitude rescales each output unit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import numpy as np
from flax.core import meta
from tqdm.auto import tqdm

from lora_jax.config import LoraConfig
from lora_jax.tree import Params, Site, sites

SUBSPACES = ("a", "delta")


def _layers(x: object, lead: int, n_in: int) -> np.ndarray:
    """An array as (layers, rows, cols) float64: lead axes flattened, then in (or r), out."""
    x = np.asarray(jax.device_get(meta.unbox(x)), np.float64)
    rows = math.prod(x.shape[lead : lead + n_in])
    return x.reshape(math.prod(x.shape[:lead]), rows, -1)


def _factors(site: Site) -> tuple[np.ndarray, np.ndarray]:
    """A as (layers, in, r) and B as (layers, r, out), float64."""
    return _layers(site.update_a, site.lead, site.n_in), _layers(site.lora_b, site.lead, 1)


def _svd(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ΔW/s = A·B as P·diag(σ)·Qᵀ for one layer, from A = Qa·Ra and Bᵀ = Qb·Rb: the small
    core Ra·Rbᵀ is decomposed instead of the (in, out) product. P is (in, k), Q (out, k)."""
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    u, sigma, vt = np.linalg.svd(ra @ rb.T)
    return qa @ u, sigma, qb @ vt.T


def _each(params: Params, config: LoraConfig) -> Iterator[tuple[Site, float]]:
    """Each adapted module with the scale s that multiplies its A·B."""
    for site in sites(params):
        yield site, config.scale_for(site.path, site.rank)


def spectrum(params: Params, config: LoraConfig) -> dict[str, np.ndarray]:
    """Singular values of each module's ΔW, largest first: {path: (layers, k)}, k = min(r, in,
    out). How much of its rank an update uses (see `energy`)."""
    out = {}
    for site, scale in _each(params, config):
        a, b = _factors(site)
        out[site.path] = np.stack(
            [scale * _svd(a_l, b_l)[1] for a_l, b_l in zip(a, b, strict=True)]
        )
    return out


def energy(sigma: np.ndarray, k: int) -> np.ndarray:
    """Fraction of ‖ΔW‖²_F in the top k singular directions, along the last axis of `sigma`
    (NaN where ΔW is zero, e.g. an untrained adapter)."""
    if k < 1:
        raise ValueError(f"energy: k is {k}; must be >= 1.")
    squares = np.square(np.asarray(sigma, np.float64))
    total = squares.sum(axis=-1)
    top = squares[..., :k].sum(axis=-1)
    return np.divide(top, total, out=np.full_like(total, np.nan), where=total > 0)


def _bases(site: Site, of: str) -> np.ndarray:
    """Per layer, orthonormal columns ordered by importance: the paper's right-singular vectors
    of A (input space, of="a") or left-singular vectors of ΔW = BA (output space, of="delta")."""
    a, b = _factors(site)
    if of == "a":
        return np.stack([np.linalg.svd(a_l, full_matrices=False)[0] for a_l in a])
    return np.stack([_svd(a_l, b_l)[2] for a_l, b_l in zip(a, b, strict=True)])


def grassmann(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for every i, j: a (k1, k2) matrix,
    entry [i-1, j-1], from orthonormal columns u1 (d, k1) and u2 (d, k2). 1 where one span
    holds the other; for independent random subspaces of R^d its mean is max(i, j)/d."""
    cumulative = np.cumsum(np.cumsum(np.square(u1.T @ u2), axis=0), axis=1)
    i, j = np.arange(1, u1.shape[1] + 1), np.arange(1, u2.shape[1] + 1)
    return np.minimum(cumulative / np.minimum.outer(i, j), 1.0)  # rounding can pass 1


def subspace_similarity(params1: Params, params2: Params, of: str = "a") -> dict[str, np.ndarray]:
    """φ between two adapters' subspaces for every module they share: {path: (layers, r1, r2)},
    entry [l, i-1, j-1] = φ(i, j) at layer l (the paper's Figures 3-4; see `grassmann`).

    of="a" compares the right-singular vectors of A (input space), as the paper does for
    rank 8 against rank 64 and for two seeds; of="delta" the left-singular vectors of ΔW.
    """
    if of not in SUBSPACES:
        raise ValueError(f"subspace_similarity: of={of!r}; choose one of {SUBSPACES}.")
    first, second = ({s.path: s for s in sites(p)} for p in (params1, params2))
    common = sorted(set(first) & set(second))
    if not common:
        raise ValueError(f"the two adapters share no adapted module: the first adapts "
                         f"{sorted(first)}, the second {sorted(second)}.")  # fmt: skip
    out = {}
    for path in common:
        u1, u2 = _bases(first[path], of), _bases(second[path], of)
        if u1.shape[:2] != u2.shape[:2]:
            raise ValueError(f"{path}: the adapters differ in layers or dimension "
                             f"({u1.shape[:2]} against {u2.shape[:2]}).")  # fmt: skip
        out[path] = np.stack([grassmann(a, b) for a, b in zip(u1, u2, strict=True)])
    return out


@dataclasses.dataclass(frozen=True)
class Amplification:
    """The paper's Table 7 for one module, each field one value per layer: the base W projected
    onto k directions, ‖Uᵀ W Vᵀ‖_F, with U, V the top-k singular directions of ΔW (on_delta), of
    W itself (on_w) or random (on_random). factor = ‖ΔW‖_F / on_delta: how strongly ΔW
    amplifies directions that W already has (the paper: about 21.5 for GPT-3's Wq at r = 4)."""

    delta_norm: np.ndarray
    w_norm: np.ndarray
    on_delta: np.ndarray
    on_w: np.ndarray
    on_random: np.ndarray

    @property
    def factor(self) -> np.ndarray:
        return self.delta_norm / self.on_delta


def amplification(
    params: Params, config: LoraConfig, k: int | None = None, seed: int = 0
) -> dict[str, Amplification]:
    """How ΔW relates to W, per adapted module and layer: {path: Amplification}. `params` is the
    adapted tree with its real base kernels; k directions (default: the module's rank)."""
    rng = np.random.default_rng(seed)
    out, found = {}, list(_each(params, config))
    for site, _ in found:
        if isinstance(site.kernel, jax.ShapeDtypeStruct):
            raise ValueError(
                f"{site.path}: amplification needs the base kernel's values, and "
                "this tree holds only its shape; combine the adapter with the base."
            )
    # A full SVD of every layer's base kernel: minutes for a 1B model on a CPU host.
    layers = sum(math.prod(np.shape(meta.unbox(site.kernel))[: site.lead]) for site, _ in found)
    bar = tqdm(total=layers, desc="amplification", unit="layer", disable=None, leave=False)
    for site, scale in found:
        a, b = _factors(site)
        w = _layers(site.kernel, site.lead, site.n_in)
        rows = {f.name: [] for f in dataclasses.fields(Amplification)}
        for a_l, b_l, w_l in zip(a, b, w, strict=True):
            p, sigma, q = _svd(a_l, b_l)
            n = min(k or site.rank, len(sigma))
            w_sigma = np.linalg.svd(w_l, compute_uv=False)
            r_in = np.linalg.qr(rng.standard_normal((w_l.shape[0], n)))[0]
            r_out = np.linalg.qr(rng.standard_normal((w_l.shape[1], n)))[0]
            rows["delta_norm"].append(scale * np.linalg.norm(sigma))
            rows["w_norm"].append(np.linalg.norm(w_sigma))
            rows["on_delta"].append(np.linalg.norm(p[:, :n].T @ w_l @ q[:, :n]))
            rows["on_w"].append(np.linalg.norm(w_sigma[:n]))
            rows["on_random"].append(np.linalg.norm(r_in.T @ w_l @ r_out))
            bar.update()
        out[site.path] = Amplification(**{name: np.array(v) for name, v in rows.items()})
    bar.close()
    return out
