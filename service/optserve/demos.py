"""The RMSprop document's demonstrations, every optimizer step an HTTP call to optserve.

Each demo is a function ``demo(url) -> DemoResult`` holding one record per iteration, so
tests assert on data; `print_result` prints the document's tables from those records and
`plot_result` draws them. Statements printed after a table are computed from the records
(measured), never canned: where the document's claim does not hold as stated, the numbers
say so.

Iteration ``i`` counts as in the document: the record for ``i`` holds the values after the
(i+1)-th update, so "iteration 100" of a 100-iteration run is ``i = 99``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from optserve_client import SGD, AdaGrad, Client, RMSprop

__all__ = [
    "DEMOS",
    "DemoResult",
    "centered",
    "ill_conditioned",
    "main",
    "plot_result",
    "print_result",
    "quadratic",
    "vs_adagrad",
]

Record = dict[str, float]

# Figure sizes in pixels (inches x DPI); the tests check the PNGs have exactly these.
DPI = 100
SINGLE_SIZE = (7.0, 4.2)
DOUBLE_SIZE = (12.0, 4.6)


@dataclass
class Column:
    """One table column: record key, header, format spec and width."""

    key: str
    header: str
    fmt: str = ".6f"
    width: int = 12


@dataclass
class DemoResult:
    """A demo's data: what it ran (``config``), where it started, one record per iteration,
    how to tabulate it, and measured conclusions."""

    name: str
    title: str
    objective: str
    config: dict[str, Any]
    start: Record
    records: list[Record]
    columns: list[Column]
    every: int
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    table_iterations: int | None = None  # rows past this are "beyond the document's run"

    def column(self, key: str) -> np.ndarray:
        """One record field over all iterations, as an array."""
        return np.array([r[key] for r in self.records], dtype=np.float64)


# --------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Callable[[], None]]:
    """A tqdm bar on stderr (only when enabled: remote URLs, where steps take a while)."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, unit="step") as bar:
        yield lambda: bar.update(1)


def _eff_lr(client: Client, session_id: str | None, name: str) -> float:
    """The session's own effective learning rate for one tensor (median over elements),
    from ``/stats``: what the server applied, not a client-side recomputation."""
    assert session_id is not None
    entry = client.stats(session_id)["tensors"][name]["effective_lr"]
    return float("nan") if entry is None else float(entry["median"])


def _scalar(a: np.ndarray) -> float:
    return float(np.asarray(a).reshape(-1)[0])


# --------------------------------------------------------------------------------- demo 1


def quadratic(url: str, *, iterations: int = 50, learning_rate: float = 0.1, rho: float = 0.9,
              progress: bool = False, api_key: str | None = None) -> DemoResult:
    """Demo 1: f(x, y) = x² + y² from (10, 10) with RMSprop(0.1, 0.9), 50 iterations."""
    start = {"x": 10.0, "y": 10.0, "f": 200.0}
    params = {"x": np.array([10.0]), "y": np.array([10.0])}
    records: list[Record] = []
    with Client(url, api_key) as client, \
            RMSprop(learning_rate, rho, client=client, name="demo-quadratic") as opt, \
            _progress(iterations, "quadratic", progress) as tick:
        for i in range(iterations):
            params = opt.update(params, {k: 2 * v for k, v in params.items()})
            x, y = _scalar(params["x"]), _scalar(params["y"])
            records.append({"i": i, "x": x, "y": y, "f": x * x + y * y})
            tick()
    result = DemoResult(
        name="quadratic", title="RMSprop Optimizer Demo", objective="f(x, y) = x² + y²",
        config={"optimizer": "rmsprop", "learning_rate": learning_rate, "rho": rho,
                "epsilon": 1e-8, "iterations": iterations, "start": (10.0, 10.0)},
        start=start, records=records, every=10,
        columns=[Column("x", "x"), Column("y", "y"), Column("f", "f(x,y)")])
    f = result.column("f")
    steps = np.abs(np.diff(np.concatenate([[10.0], result.column("x")])))
    result.summary = {"f_start": 200.0, "f_final": float(f[-1]),
                      "monotone": bool(np.all(np.diff(np.concatenate([[200.0], f])) < 0)),
                      "last_step": float(steps[-1])}
    result.notes = [
        f"Final: x = {records[-1]['x']:.8f}, y = {records[-1]['y']:.8f}",
        f"Measured: f fell from 200 to {f[-1]:.4f} in {iterations} iterations"
        + (", lower after every update." if result.summary["monotone"] else "."),
        f"A step is lr*g/sqrt(v): about lr whatever the gradient's scale (the last one moved x "
        f"by {steps[-1]:.4f}), so from 10 the optimum is ~{10 / steps[-1]:.0f} iterations "
        "away at this pace: after 50 this run is on its way, not there.",
    ]
    return result


# --------------------------------------------------------------------------------- demo 2


def ill_conditioned(url: str, *, iterations: int = 100, beyond: int = 20,
                    learning_rate: float = 0.1, rho: float = 0.9, sgd_lr: float = 0.001,
                    progress: bool = False, api_key: str | None = None) -> DemoResult:
    """Demo 2: f(x, y) = 100x² + y² from (10, 10), RMSprop(0.1) against SGD(0.001).

    The document runs 100 iterations; ``beyond`` more are recorded (and tabulated apart)
    because the comparison of f turns just after iteration 100.
    """
    total = iterations + beyond
    p_rms = {"x": np.array([10.0]), "y": np.array([10.0])}
    p_sgd = {"x": np.array([10.0]), "y": np.array([10.0])}

    def grads(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": 200 * p["x"], "y": 2 * p["y"]}

    def fval(p: dict[str, np.ndarray]) -> float:
        return _scalar(100 * p["x"] ** 2 + p["y"] ** 2)

    records: list[Record] = []
    with Client(url, api_key) as client, \
            RMSprop(learning_rate, rho, client=client, name="demo-ill-rmsprop") as rms, \
            SGD(sgd_lr, client=client, name="demo-ill-sgd") as sgd, \
            _progress(total, "ill-conditioned", progress) as tick:
        for i in range(total):
            p_rms = rms.update(p_rms, grads(p_rms))
            p_sgd = sgd.update(p_sgd, grads(p_sgd))
            records.append({"i": i, "rms_x": _scalar(p_rms["x"]), "rms_y": _scalar(p_rms["y"]),
                            "rms_f": fval(p_rms), "sgd_x": _scalar(p_sgd["x"]),
                            "sgd_y": _scalar(p_sgd["y"]), "sgd_f": fval(p_sgd)})
            tick()
    result = DemoResult(
        name="ill-conditioned", title="RMSprop vs SGD on Ill-Conditioned Problem",
        objective="f(x, y) = 100x² + y² (condition number 100)",
        config={"rmsprop": {"learning_rate": learning_rate, "rho": rho, "epsilon": 1e-8},
                "sgd": {"learning_rate": sgd_lr}, "iterations": iterations,
                "beyond": beyond, "start": (10.0, 10.0)},
        start={"rms_x": 10.0, "rms_y": 10.0, "rms_f": 10100.0, "sgd_x": 10.0, "sgd_y": 10.0,
               "sgd_f": 10100.0},
        records=records, every=20, table_iterations=iterations,
        columns=[Column("rms_f", "RMSprop f(x,y)", width=20),
                 Column("sgd_f", "SGD f(x,y)", width=20),
                 Column("rms_y", "RMSprop y", width=14), Column("sgd_y", "SGD y", width=14)])
    rf, sf = result.column("rms_f"), result.column("sgd_f")
    at = iterations - 1
    below = np.nonzero(rf < sf)[0]
    cross = int(below[0]) + 1 if below.size and np.all(rf[below[0]:] < sf[below[0]:]) else None
    result.summary = {"rms_f_at": float(rf[at]), "sgd_f_at": float(sf[at]),
                      "rms_below_sgd_at": bool(rf[at] < sf[at]), "crossover": cross,
                      "rms_y_at": records[at]["rms_y"], "sgd_y_at": records[at]["sgd_y"],
                      "rms_f_last": float(rf[-1]), "sgd_f_last": float(sf[-1])}
    r = records[at]
    notes = [f"At iteration {iterations}: RMSprop f = {rf[at]:.4f} at "
             f"({r['rms_x']:.4f}, {r['rms_y']:.4f}); SGD f = {sf[at]:.4f} at "
             f"({r['sgd_x']:.2e}, {r['sgd_y']:.4f})."]
    if rf[at] < sf[at]:
        notes.append(f"RMSprop's f is below SGD's at iteration {iterations}.")
    else:
        notes.append(
            f"Measured: at iteration {iterations} SGD's f is still LOWER. SGD removes the steep "
            "x term within ~30 iterations and then crawls along y (y shrinks by 0.2% a step); "
            "RMSprop normalises each coordinate, so x and y fall together by about the same "
            f"amount per step: along the shallow direction it is at y = {r['rms_y']:.3f} "
            f"against SGD's {r['sgd_y']:.3f}.")
    if cross is not None:
        notes.append(f"RMSprop's f drops below SGD's at iteration {cross} and stays below; "
                     f"at iteration {total}: {rf[-1]:.4g} against {sf[-1]:.4g}.")
    notes.append("RMSprop handles different gradient scales automatically: the path runs "
                 "straight down the diagonal instead of along the steep axis first.")
    result.notes = notes
    return result


# --------------------------------------------------------------------------------- demo 3


def vs_adagrad(url: str, *, iterations: int = 200, rms_lr: float = 0.5, rho: float = 0.9,
               ada_lr: float = 1.0, epsilon: float = 1e-8, progress: bool = False,
               api_key: str | None = None) -> DemoResult:
    """Demo 3: f(x) = x² from 10, RMSprop(0.5, 0.9) against AdaGrad(1.0), 200 iterations.

    The effective learning rate of each is read from the session's ``/stats`` after every
    step: the step size that update used. (The document prints the one before the update,
    so its column lags one row and shows ``lr`` at iteration 0.)
    """
    p_rms = {"x": np.array([10.0])}
    p_ada = {"x": np.array([10.0])}
    records: list[Record] = []
    with Client(url, api_key) as client, \
            RMSprop(rms_lr, rho, epsilon, client=client, name="demo-vs-rmsprop") as rms, \
            AdaGrad(ada_lr, epsilon, client=client, name="demo-vs-adagrad") as ada, \
            _progress(iterations, "vs-adagrad", progress) as tick:
        for i in range(iterations):
            p_rms = rms.update(p_rms, {"x": 2 * p_rms["x"]})
            p_ada = ada.update(p_ada, {"x": 2 * p_ada["x"]})
            records.append({"i": i, "rms_x": _scalar(p_rms["x"]), "ada_x": _scalar(p_ada["x"]),
                            "rms_eff_lr": _eff_lr(client, rms.session_id, "x"),
                            "ada_eff_lr": _eff_lr(client, ada.session_id, "x")})
            tick()
    result = DemoResult(
        name="vs-adagrad", title="RMSprop vs AdaGrad: Long Training Comparison",
        objective="f(x) = x²",
        config={"rmsprop": {"learning_rate": rms_lr, "rho": rho, "epsilon": epsilon},
                "adagrad": {"learning_rate": ada_lr, "epsilon": epsilon},
                "iterations": iterations, "start": 10.0},
        start={"rms_x": 10.0, "ada_x": 10.0}, records=records, every=40,
        columns=[Column("rms_x", "RMSprop x", ".8f", 15), Column("ada_x", "AdaGrad x", ".8f", 15),
                 Column("rms_eff_lr", "RMS eff_lr", ".10f", 15),
                 Column("ada_eff_lr", "Ada eff_lr", ".10f", 15)])
    re_, ae = result.column("rms_eff_lr"), result.column("ada_eff_lr")
    rx, ax = result.column("rms_x"), result.column("ada_x")
    tail = slice(-50, None)
    result.summary = {
        "ada_eff_lr_never_rises": bool(np.all(np.diff(ae) <= 0)),
        "ada_eff_lr_final": float(ae[-1]), "ada_eff_lr_first": float(ae[0]),
        "rms_eff_lr_min": float(re_.min()), "rms_eff_lr_tail_mean": float(re_[tail].mean()),
        "rms_abs_x_tail_max": float(np.abs(rx[tail]).max()), "ada_abs_x_final": abs(ax[-1]),
        "rms_abs_x_min": float(np.abs(rx).min()), "rms_argmin": int(np.abs(rx).argmin()) + 1,
        "rms_eff_lr_max": float(re_.max()), "rms_eff_lr_argmax": int(re_.argmax()) + 1,
    }
    s = result.summary
    result.notes = [
        f"AdaGrad's effective LR never rose: {s['ada_eff_lr_first']:.4f} at the first step, "
        f"{s['ada_eff_lr_final']:.6f} at the last; its sum of g² only grows. (On this "
        "problem the gradients shrink geometrically, so the sum converges and the rate "
        "levels off instead of reaching zero.)",
        f"RMSprop's effective LR stayed bounded away from zero (minimum {s['rms_eff_lr_min']:.4f}"
        f"; mean over the last 50 steps {s['rms_eff_lr_tail_mean']:.4f}, "
        f"{s['rms_eff_lr_tail_mean'] / s['ada_eff_lr_final']:.0f}x AdaGrad's).",
        f"That cuts both ways: RMSprop reached |x| = {s['rms_abs_x_min']:.1e} at iteration "
        f"{s['rms_argmin']}, then, with the gradient gone, v decayed and the rate climbed to "
        f"{s['rms_eff_lr_max']:.2f} (iteration {s['rms_eff_lr_argmax']}), past 1.0, the "
        "stability limit of gradient descent on x² (2/curvature); x grew back and the rate "
        f"now hovers at 1.0 with x oscillating (|x| up to {s['rms_abs_x_tail_max']:.3f} over "
        "the last 50 steps), while AdaGrad's x, at its frozen small rate, keeps shrinking "
        f"(|x| = {s['ada_abs_x_final']:.4f}).",
    ]
    return result


# --------------------------------------------------------------------------------- centered


def _pseudo_huber_grad(d: np.ndarray) -> np.ndarray:
    """Gradient of sqrt(1 + d²) - 1: about ±1 far from the optimum, d near it."""
    return d / np.sqrt(1.0 + d * d)


def centered(url: str, *, iterations: int = 600, replicas: int = 32, target: float = 3.0,
             noise: float = 0.25, learning_rate: float = 0.01, rho: float = 0.9,
             seed: int = 0, progress: bool = False, api_key: str | None = None) -> DemoResult:
    """Plain against centered RMSprop where the gradient's mean dwarfs its noise.

    Objective, per element: f(x) = sqrt(1 + (x - 3)²) - 1 from x = 0, gradient
    ``(x-3)/sqrt(1+(x-3)²) + 0.25·ξ`` with ξ seeded standard normal. Far from 3 the gradient
    has mean ≈ -1 and std 0.25, so the second moment (≈ 1.06) is ~17x the variance (0.0625):
    centered RMSprop, dividing by the root of the variance, takes ~4x larger steps there.
    Near the optimum the mean is ≈ 0 and the two coincide. ``replicas`` independent runs are
    the elements of one parameter vector (the update is element-wise); both optimizers get
    the same noise draws.
    """
    xi = np.random.default_rng(seed).standard_normal((iterations, replicas))
    start = np.zeros(replicas)
    p_plain = {"x": start.copy()}
    p_cent = {"x": start.copy()}

    def fvals(x: np.ndarray) -> np.ndarray:
        d = x - target
        return np.sqrt(1.0 + d * d) - 1.0

    records: list[Record] = []
    grads_plain: list[np.ndarray] = []
    grads_cent: list[np.ndarray] = []
    x_plain, x_cent = [start.copy()], [start.copy()]
    with Client(url, api_key) as client, \
            RMSprop(learning_rate, rho, client=client, name="demo-plain") as plain, \
            RMSprop(learning_rate, rho, centered=True, client=client,
                    name="demo-centered") as cent, \
            _progress(iterations, "centered", progress) as tick:
        for i in range(iterations):
            g_plain = _pseudo_huber_grad(p_plain["x"] - target) + noise * xi[i]
            g_cent = _pseudo_huber_grad(p_cent["x"] - target) + noise * xi[i]
            grads_plain.append(g_plain)
            grads_cent.append(g_cent)
            p_plain = plain.update(p_plain, {"x": g_plain})
            p_cent = cent.update(p_cent, {"x": g_cent})
            x_plain.append(p_plain["x"])
            x_cent.append(p_cent["x"])
            fp, fc = fvals(p_plain["x"]), fvals(p_cent["x"])
            records.append({
                "i": i, "plain_f": float(fp.mean()), "centered_f": float(fc.mean()),
                "plain_dist": float(np.median(np.abs(p_plain["x"] - target))),
                "centered_dist": float(np.median(np.abs(p_cent["x"] - target))),
                "plain_eff_lr": _eff_lr(client, plain.session_id, "x"),
                "centered_eff_lr": _eff_lr(client, cent.session_id, "x")})
            tick()
    f0 = float(fvals(start).mean())
    result = DemoResult(
        name="centered", title="Plain vs centered RMSprop on a noisy objective",
        objective=f"f(x) = sqrt(1 + (x - {target:g})²) - 1, gradient + {noise:g}·N(0, 1) "
                  f"noise; {replicas} seeded replicas",
        config={"learning_rate": learning_rate, "rho": rho, "epsilon": 1e-8,
                "iterations": iterations, "replicas": replicas, "target": target,
                "noise": noise, "seed": seed, "start": 0.0},
        start={"plain_f": f0, "centered_f": f0, "plain_dist": target, "centered_dist": target},
        records=records, every=100,
        columns=[Column("plain_f", "plain f", ".6f", 14),
                 Column("centered_f", "centered f", ".6f", 14),
                 Column("plain_dist", "plain |x-3|", ".4f", 14),
                 Column("centered_dist", "centered |x-3|", ".4f", 16),
                 Column("plain_eff_lr", "plain eff_lr", ".5f", 14),
                 Column("centered_eff_lr", "centered eff_lr", ".5f", 16)])
    result.summary = _centered_summary(result, np.array(x_plain), np.array(x_cent),
                                       np.array(grads_plain), np.array(grads_cent))
    result.notes = _centered_notes(result)
    return result


def _arrival(xs: np.ndarray, target: float, within: float) -> np.ndarray:
    """Per replica: the first iteration (counted from 1) with |x - target| < ``within``;
    NaN where it never gets there."""
    inside = np.abs(xs[1:] - target) < within
    first = np.argmax(inside, axis=0).astype(np.float64) + 1
    return np.where(inside.any(axis=0), first, np.nan)


# Iterations 21-60: after the EMAs' warm-up (~1/(1-rho) steps), before either arrives.
TRANSIT = slice(20, 60)


def _centered_summary(res: DemoResult, xp: np.ndarray, xc: np.ndarray,
                      gp: np.ndarray, gc: np.ndarray) -> dict[str, Any]:
    """The measurements: when each gets near, step sizes and gradient moments by phase,
    and the loss level and spread once both have settled."""
    cfg = res.config
    transit = TRANSIT
    n = len(res.records)
    settled = slice(n - min(200, n // 3), n)
    step_p, step_c = np.abs(np.diff(xp, axis=0)), np.abs(np.diff(xc, axis=0))
    fp, fc = res.column("plain_f"), res.column("centered_f")
    arr_p = _arrival(xp, cfg["target"], 0.1)
    arr_c = _arrival(xc, cfg["target"], 0.1)
    return {
        "arrival_plain": float(np.nanmedian(arr_p)) if np.isfinite(arr_p).any() else None,
        "arrival_centered": float(np.nanmedian(arr_c)) if np.isfinite(arr_c).any() else None,
        "arrived_plain": int(np.isfinite(arr_p).sum()),
        "arrived_centered": int(np.isfinite(arr_c).sum()),
        "transit_grad_mean_plain": float(gp[transit].mean()),
        "transit_grad_std_plain": float(gp[transit].std()),
        "transit_grad_mean_centered": float(gc[transit].mean()),
        "transit_grad_std_centered": float(gc[transit].std()),
        "transit_step_plain": float(np.median(step_p[transit])),
        "transit_step_centered": float(np.median(step_c[transit])),
        "transit_eff_lr_plain": float(np.median(res.column("plain_eff_lr")[transit])),
        "transit_eff_lr_centered": float(np.median(res.column("centered_eff_lr")[transit])),
        "settled_from": settled.start + 1,
        "settled_eff_lr_plain": float(np.median(res.column("plain_eff_lr")[settled])),
        "settled_eff_lr_centered": float(np.median(res.column("centered_eff_lr")[settled])),
        "settled_f_mean_plain": float(fp[settled].mean()),
        "settled_f_mean_centered": float(fc[settled].mean()),
        "settled_f_std_plain": float(fp[settled].std()),
        "settled_f_std_centered": float(fc[settled].std()),
        "final_dist_plain": res.records[-1]["plain_dist"],
        "final_dist_centered": res.records[-1]["centered_dist"],
    }


def _centered_notes(res: DemoResult) -> list[str]:
    s, cfg = res.summary, res.config
    first, last = TRANSIT.start + 1, TRANSIT.stop
    notes = [f"Iterations {first}-{last} (the mean gradient dominates the noise):"]
    for kind in ("plain", "centered"):
        mean, std = s[f"transit_grad_mean_{kind}"], s[f"transit_grad_std_{kind}"]
        second = mean * mean + std * std
        notes.append(
            f"  {kind + ' run:':<14}gradient mean {mean:+.3f}, std {std:.3f}: second moment "
            f"{second:.4f}, variance {std * std:.4f}, sqrt(ratio) {np.sqrt(second) / std:.2f}")
    step_ratio = s["transit_step_centered"] / s["transit_step_plain"]
    lr_ratio = s["transit_eff_lr_centered"] / s["transit_eff_lr_plain"]
    notes.append(
        f"  Centered divides by sqrt(variance), plain by sqrt(second moment): effective LR "
        f"(from /stats) {s['transit_eff_lr_centered']:.4f} vs {s['transit_eff_lr_plain']:.4f} "
        f"({lr_ratio:.2f}x); median step |dx| {s['transit_step_centered']:.4f} vs "
        f"{s['transit_step_plain']:.4f} ({step_ratio:.2f}x).")
    change = 100 * (s["settled_f_mean_centered"] / s["settled_f_mean_plain"] - 1)
    reps = cfg["replicas"]
    ap, ac = s["arrival_plain"], s["arrival_centered"]
    if ap is not None and ac is not None:
        notes.append(
            f"  Larger steps, same direction: centered gets within 0.1 of the optimum after "
            f"{ac:.0f} iterations (median over {reps} replicas), plain after {ap:.0f} "
            f"({ap / ac:.1f}x longer).")
    notes.append(f"  Replicas that got within 0.1: plain {s['arrived_plain']}/{reps}, "
                 f"centered {s['arrived_centered']}/{reps}.")
    notes.append(
        f"Iterations {s['settled_from']}-{cfg['iterations']} (both settled, mean gradient "
        f"~0, so variance ~ second moment): effective LR plain "
        f"{s['settled_eff_lr_plain']:.4f}, centered {s['settled_eff_lr_centered']:.4f}; "
        f"f mean {s['settled_f_mean_plain']:.2e} vs {s['settled_f_mean_centered']:.2e}, std "
        f"{s['settled_f_std_plain']:.2e} vs {s['settled_f_std_centered']:.2e}: centering "
        f"gains nothing once the mean is gone (centered's mean f is {change:+.0f}% here).")
    return notes


DEMOS: dict[str, Callable[..., DemoResult]] = {
    "quadratic": quadratic,
    "ill-conditioned": ill_conditioned,
    "vs-adagrad": vs_adagrad,
    "centered": centered,
}


# --------------------------------------------------------------------------------- printing


def print_result(res: DemoResult, file: TextIO | None = None) -> None:
    """The document's table: every ``every`` iterations, the final one, then the notes."""
    out = file or sys.stdout
    rule = "=" * 72
    print(rule, file=out)
    print(res.title, file=out)
    print(rule, file=out)
    print(f"Minimizing {res.objective}", file=out)
    print(file=out)
    head = f"{'Iteration':<12}" + "".join(f"{c.header:<{c.width}} " for c in res.columns)
    print(head.rstrip(), file=out)
    print("-" * max(60, len(head.rstrip())), file=out)

    def row(r: Record, label: str | None = None) -> str:
        first = label or str(int(r["i"]))
        return (f"{first:<12}" + "".join(f"{format(r[c.key], c.fmt):<{c.width}} "
                                         for c in res.columns)).rstrip()

    n_table = res.table_iterations or len(res.records)
    for r in res.records[:n_table]:
        if int(r["i"]) % res.every == 0:
            print(row(r), file=out)
    last = res.records[n_table - 1]
    if int(last["i"]) % res.every:
        print(row(last, f"{n_table - 1} (#{n_table})"), file=out)
    if n_table < len(res.records):
        print(f"-- beyond the document's {n_table} iterations --", file=out)
        extra = res.records[n_table:]
        for r in extra:
            if int(r["i"]) % res.every == res.every - 1 or r is extra[-1]:
                print(row(r, f"{int(r['i'])} (#{int(r['i']) + 1})"), file=out)
    print(file=out)
    for note in res.notes:
        print(note, file=out)
    print(file=out)


# --------------------------------------------------------------------------------- plots


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


# --------------------------------------------------------------------------------- CLI


def run(which: str, url: str | None = None, plot: str | Path | None = None,
        file: TextIO | None = None) -> dict[str, DemoResult]:
    """Run one demo or ``all`` against ``url`` (or a service started here), print, plot."""
    from .local import local_service

    out = file or sys.stdout
    names = list(DEMOS) if which == "all" else [which]
    results: dict[str, DemoResult] = {}
    with contextlib.ExitStack() as stack:
        base = url or stack.enter_context(local_service())
        where = url or f"{base} (started here: embedded redis-server + the app)"
        print(f"optserve demos: every optimizer step is a POST to {where}\n", file=out)
        for name in names:
            res = DEMOS[name](base, progress=url is not None)
            results[name] = res
            print_result(res, out)
            if plot is not None:
                for path in plot_result(res, plot):
                    print(f"wrote {path}", file=out)
                print(file=out)
    return results


def main(args: argparse.Namespace) -> int:
    """`optserve demo which [--url URL] [--plot DIR]`."""
    from optserve_client import OptserveError

    from .store.embedded import EmbeddedRedisError, RedisServerNotFound

    try:
        run(args.which, args.url, args.plot)
    except (RedisServerNotFound, EmbeddedRedisError) as exc:
        print(f"optserve demo: cannot start a local service: {exc}", file=sys.stderr)
        return 2
    except OptserveError as exc:
        print(f"optserve demo: {exc}", file=sys.stderr)
        return 1
    return 0
