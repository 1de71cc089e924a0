"""`lora-jax inspect`: `lora_jax.analysis` over an adapter as rows (one per module type and
layer), a text table, JSON, and PNGs with one panel per module type."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from lora_jax import analysis
from lora_jax.adalora import adalora_ranks
from lora_jax.config import LoraConfig
from lora_jax.files import is_remote
from lora_jax.report import save_figure
from lora_jax.tree import Params, sites

TOP = (1, 4)  # energy columns: the fraction of ‖ΔW‖² in the top 1 and top 4 directions
COVERED = 0.9  # k90: how many directions hold this fraction of ‖ΔW‖²


def rows(
    params: Params,
    config: LoraConfig,
    amp: Mapping[str, analysis.Amplification] | None = None,
    phi: Mapping[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One dict per adapted module and layer (layer None for an unstacked module; a
    mixture's experts one each, with their `expert` index): rank (an
    AdaLoRA layer's: the ranks it keeps), ‖ΔW‖_F, its singular values and energy; the
    `analysis.amplification` columns, and φ(1, 1) and φ(r1, r2) from
    `analysis.subspace_similarity`, where given."""
    spectra, kept = analysis.spectrum(params, config), adalora_ranks(params)
    amp, phi = amp or {}, phi or {}
    out = []
    for site in sites(params):
        sigma = spectra[site.path]
        ranks = np.ravel(kept.get(site.path, [site.rank] * len(sigma)))
        lead = np.shape(site.lora_b)[: site.lead]  # (layers,), a mixture's (layers, experts)
        for layer, s in enumerate(sigma):
            index = np.unravel_index(layer, lead) if site.lead else (None,)
            row: dict[str, Any] = {
                "module": site.path,
                "layer": None if index[0] is None else int(index[0]),
                **({"expert": int(index[1])} if site.lead > 1 else {}),
                "rank": int(ranks[layer]),
                "delta_norm": float(np.linalg.norm(s)),
                **{f"energy_top{k}": float(analysis.energy(s, k)) for k in TOP},
                "k90": _covering(s),
                "sigma": s.tolist(),
            }
            if site.path in amp:
                a = amp[site.path]
                row.update({name: float(getattr(a, name)[layer]) for name in
                            ("w_norm", "on_delta", "on_w", "on_random", "factor")})  # fmt: skip
            if site.path in phi:
                grid = phi[site.path][layer]
                row.update(phi_1=float(grid[0, 0]), phi_r=float(grid[-1, -1]))
            out.append(row)
    return out


def _covering(sigma: np.ndarray) -> int | None:
    """The fewest directions holding COVERED of ‖ΔW‖² (None for a zero ΔW)."""
    squares = np.square(sigma)
    if squares.sum() == 0:
        return None
    return int(np.searchsorted(np.cumsum(squares) / squares.sum(), COVERED - 1e-12) + 1)


COLUMNS = (  # (row key, heading, format)
    ("module", "module", "{}"),
    ("layer", "layer", "{}"),
    ("expert", "expert", "{}"),
    ("rank", "r", "{}"),
    ("delta_norm", "|dW|", "{:.4g}"),
    ("energy_top1", "top1", "{:.3f}"),
    ("energy_top4", "top4", "{:.3f}"),
    ("k90", "k90", "{}"),
    ("w_norm", "|W|", "{:.4g}"),
    ("on_delta", "|UtWV| dW", "{:.4g}"),
    ("on_w", "W", "{:.4g}"),
    ("on_random", "random", "{:.4g}"),
    ("factor", "amplif.", "{:.3g}"),
    ("phi_1", "phi(1,1)", "{:.3f}"),
    ("phi_r", "phi(r,r)", "{:.3f}"),
)


def table(rows: list[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table, with only the columns they hold."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cell = lambda v, fmt: "-" if v is None or v != v else fmt.format(v)  # noqa: E731 (NaN: -)
    lines = [[h for _, h, _ in columns]]
    lines += [[cell(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)  # fmt: skip


def _panels(paths: list[str], title: str, draw: Callable[[Any, str], None]) -> Any:
    """A Figure with one panel per module type (path), drawn by draw(axes, path)."""
    from matplotlib.figure import Figure

    cols = min(3, len(paths))
    grid = math.ceil(len(paths) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * grid), dpi=100, layout="constrained")
    fig.suptitle(title)
    for i, path in enumerate(paths):
        ax = fig.add_subplot(grid, cols, i + 1)
        ax.set_title(path, fontsize=8)
        draw(ax, path)
    return fig


def figures(rows: list[Mapping[str, Any]], phi: Mapping[str, np.ndarray] | None = None) -> dict:
    """{file name: Figure}: the spectrum and per-layer norms always, the amplification factor
    when the rows have it, the φ heat map (mean over layers) when `phi` is given."""
    by_path: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_path.setdefault(row["module"], []).append(row)
    paths = list(by_path)
    layer_of = lambda r: r["layer"] or 0  # noqa: E731

    def spectrum(ax: Any, path: str) -> None:
        for r in by_path[path]:
            squares = np.square(r["sigma"])
            share = np.cumsum(squares) / squares.sum() if squares.sum() else squares
            name = f"layer {r['layer']}" + (f" expert {r['expert']}" if "expert" in r else "")
            ax.plot(np.arange(1, len(share) + 1), share, marker=".", label=name)
        ax.set(xlabel="top k directions", ylabel="share of |dW|^2", ylim=(0, 1.02))
        if path == paths[0] and by_path[path][0]["layer"] is not None:
            ax.legend(fontsize=6, loc="lower right")

    def per_layer(key: str, label: str) -> Callable[[Any, str], None]:
        def draw(ax: Any, path: str) -> None:
            style = "o" if "expert" in by_path[path][0] else "o-"  # experts: a point each
            ax.plot([layer_of(r) for r in by_path[path]], [r[key] for r in by_path[path]],
                    style)  # fmt: skip
            ax.set(xlabel="layer", ylabel=label)

        return draw

    figs = {
        "spectrum.png": _panels(paths, "energy of dW in its top k directions", spectrum),
        "norms.png": _panels(paths, "|dW|_F per layer", per_layer("delta_norm", "|dW|_F")),
    }
    if "factor" in rows[0]:
        figs["amplification.png"] = _panels(
            paths, "amplification |dW|_F / |U^T W V|_F per layer", per_layer("factor", "factor")
        )
    if phi:

        def heat(ax: Any, path: str) -> None:
            grid = phi[path].mean(axis=0)
            image = ax.imshow(
                grid,
                vmin=0,
                vmax=1,
                origin="lower",
                cmap="viridis",
                extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5),
            )
            ax.set(xlabel="j (other adapter)", ylabel="i (this adapter)")
            ax.figure.colorbar(image, ax=ax, shrink=0.8)

        shared = [p for p in paths if p in phi]
        figs["subspace.png"] = _panels(shared, "phi(i, j), mean over layers", heat)
    return figs


def write_figures(figs: Mapping[str, Any], out: epath.Path) -> list[epath.Path]:
    """Each Figure as a PNG in `out` (created if needed; a bucket's folder too), written
    atomically."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: the PNGs go into a directory, and this is a file.")
    if not is_remote(out):  # a bucket has no folders to make
        out.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, out / name) for name, fig in figs.items()]
