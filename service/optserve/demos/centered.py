"""Plain against centered RMSprop on a noisy objective, and what the run measured."""

from __future__ import annotations

from typing import Any

import numpy as np

from optserve_client import Client, RMSprop

from .experiments import effective_lr, progress_bar
from .result import Column, DemoResult, Record

__all__ = ["TRANSIT", "centered"]


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
            progress_bar(iterations, "centered", progress) as tick:
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
                "plain_eff_lr": effective_lr(client, plain.session_id, "x"),
                "centered_eff_lr": effective_lr(client, cent.session_id, "x")})
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
