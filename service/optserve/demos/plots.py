"""A demo's figure as PNG (matplotlib's Agg via `Figure`: no pyplot global state)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .result import DemoResult

__all__ = ["DOUBLE_SIZE", "DPI", "SINGLE_SIZE", "plot_result"]

# Figure sizes in pixels (inches x DPI); the tests check the PNGs have exactly these.
DPI = 100
SINGLE_SIZE = (7.0, 4.2)
DOUBLE_SIZE = (12.0, 4.6)


def _iters(res: DemoResult) -> np.ndarray:
    """x axis: updates applied, 0 = the starting point."""
    return np.arange(len(res.records) + 1)


def _series(res: DemoResult, key: str) -> np.ndarray:
    return np.concatenate([[res.start[key]], res.column(key)])


def plot_result(res: DemoResult, out_dir: str | Path) -> list[Path]:
    """Write this demo's figure(s) as PNG (Agg, via `Figure`: no pyplot global state)."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{res.name.replace('-', '_')}.png"
    double = res.name != "quadratic"
    fig = Figure(figsize=DOUBLE_SIZE if double else SINGLE_SIZE, dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(1, 2) if double else [fig.subplots()]
    _PLOTTERS[res.name](res, axes)
    fig.suptitle(f"{res.title}: {res.objective}", fontsize=11)
    fig.savefig(path, dpi=DPI)
    return [path]


def _plot_quadratic(res: DemoResult, axes: Any) -> None:
    ax = axes[0]
    ax.semilogy(_iters(res), _series(res, "f"), color="C0", label="RMSprop (lr 0.1, rho 0.9)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("f(x, y)  (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _plot_ill(res: DemoResult, axes: Any) -> None:
    ax, ax2 = axes
    n = res.table_iterations or len(res.records)
    xs = np.linspace(-11, 11, 400)
    ys = np.linspace(-2, 11, 300)
    gx, gy = np.meshgrid(xs, ys)
    ax.contour(gx, gy, 100 * gx**2 + gy**2, levels=np.geomspace(0.5, 12100, 14),
               colors="0.75", linewidths=0.7)
    for key, color, label in (("rms", "C0", "RMSprop (lr 0.1)"), ("sgd", "C3", "SGD (lr 0.001)")):
        px, py = _series(res, f"{key}_x")[: n + 1], _series(res, f"{key}_y")[: n + 1]
        ax.plot(px, py, ".-", color=color, ms=3, lw=1, label=f"{label}, {n} iterations")
    ax.plot([10], [10], "ko", ms=5)
    ax.plot([0], [0], "k*", ms=9)
    ax.set_xlim(-11, 11)
    ax.set_ylim(-2, 11)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title("trajectories over the contours of f", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    it = _iters(res)
    ax2.semilogy(it, _series(res, "rms_f"), color="C0", label="RMSprop")
    ax2.semilogy(it, _series(res, "sgd_f"), color="C3", label="SGD")
    ax2.axvline(n, color="0.5", ls="--", lw=0.8)
    ax2.text(n, ax2.get_ylim()[1], f" {n}", va="top", fontsize=8, color="0.4")
    cross = res.summary.get("crossover")
    if cross is not None:
        ax2.plot([cross], [res.column("rms_f")[cross - 1]], "ko", ms=4)
        ax2.annotate(f"RMSprop below SGD from {cross}", (cross, res.column("rms_f")[cross - 1]),
                     xytext=(-150, -30), textcoords="offset points", fontsize=8,
                     arrowprops={"arrowstyle": "->", "color": "0.4"})
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("f(x, y)  (log scale)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()


def _plot_vs_adagrad(res: DemoResult, axes: Any) -> None:
    ax, ax2 = axes
    it = _iters(res)
    for key, color, label in (("rms", "C0", "RMSprop (lr 0.5, rho 0.9)"),
                              ("ada", "C2", "AdaGrad (lr 1.0)")):
        x = _series(res, f"{key}_x")
        ax.semilogy(it, np.where(x == 0, np.nan, x * x), color=color, label=label)
        ax2.semilogy(it[1:], res.column(f"{key}_eff_lr"), color=color, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("f(x) = x²  (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax2.axhline(1.0, color="0.5", ls=":", lw=0.8)
    ax2.text(0, 1.0, " 1.0 = stability limit on x²", va="bottom", fontsize=8, color="0.4")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("effective LR lr/(sqrt(v)+eps), from /stats")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()


def _plot_centered(res: DemoResult, axes: Any) -> None:
    ax, ax2 = axes
    it = _iters(res)
    for key, color, label in (("plain", "C0", "plain"), ("centered", "C1", "centered")):
        ax.semilogy(it, _series(res, f"{key}_f"), color=color, label=f"{label} RMSprop")
        ax2.semilogy(it[1:], res.column(f"{key}_eff_lr"), color=color,
                     label=f"{label} RMSprop")
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"f, mean over {res.config['replicas']} replicas (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("effective LR (median over replicas), from /stats")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend()


_PLOTTERS: dict[str, Callable[[DemoResult, Any], None]] = {
    "quadratic": _plot_quadratic,
    "ill-conditioned": _plot_ill,
    "vs-adagrad": _plot_vs_adagrad,
    "centered": _plot_centered,
}
