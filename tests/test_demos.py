"""`optserve demo`: the RMSprop document's demonstrations through the service.

The numbers that come back over HTTP are checked against a NumPy implementation of the
document's algorithms written here (not imported from the demo code), and the document's
claims are checked by measurement.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optserve import cli, demos
from optserve.store.embedded import free_port
from optserve_client import PRESETS, Client, RMSprop

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-10  # float64 end to end; only the order of operations differs from torch's
ATOL = 1e-13

# ------------------------------------------------------------------- the document's math


class RefRMSprop:
    """The document's NumPy RMSprop; ``centered`` per its "Centered RMSprop" formulas."""

    def __init__(self, learning_rate: float = 0.001, rho: float = 0.9, epsilon: float = 1e-8,
                 centered: bool = False) -> None:
        self.learning_rate, self.rho, self.epsilon = learning_rate, rho, epsilon
        self.centered = centered
        self.cache: dict[str, np.ndarray] = {}
        self.mean: dict[str, np.ndarray] = {}

    def _denominator(self, key: str) -> np.ndarray:
        v = self.cache[key]
        if self.centered:
            v = v - self.mean[key] ** 2
        return np.sqrt(v) + self.epsilon

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        updated = {}
        for key in params:
            if key not in self.cache:
                self.cache[key] = np.zeros_like(params[key])
                self.mean[key] = np.zeros_like(params[key])
            self.cache[key] = self.rho * self.cache[key] + (1 - self.rho) * grads[key] ** 2
            if self.centered:
                self.mean[key] = self.rho * self.mean[key] + (1 - self.rho) * grads[key]
            updated[key] = params[key] - self.learning_rate * grads[key] / self._denominator(key)
        return updated

    def eff_lr(self, key: str) -> np.ndarray:
        return self.learning_rate / self._denominator(key)


class RefAdaGrad:
    """Classic AdaGrad: cache += g², x -= lr·g/(sqrt(cache) + eps)."""

    def __init__(self, learning_rate: float = 0.01, epsilon: float = 1e-8) -> None:
        self.learning_rate, self.epsilon = learning_rate, epsilon
        self.cache: dict[str, np.ndarray] = {}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        updated = {}
        for key in params:
            self.cache[key] = self.cache.get(key, np.zeros_like(params[key])) + grads[key] ** 2
            updated[key] = params[key] - self.learning_rate * grads[key] / (
                np.sqrt(self.cache[key]) + self.epsilon)
        return updated

    def eff_lr(self, key: str) -> np.ndarray:
        return self.learning_rate / (np.sqrt(self.cache[key]) + self.epsilon)


def ref_sgd(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float
            ) -> dict[str, np.ndarray]:
    return {k: params[k] - lr * grads[k] for k in params}


def lower_median(v: np.ndarray) -> float:
    """/stats' "median" is torch.median's: the lower middle value for an even count."""
    return float(np.sort(v.reshape(-1))[(v.size - 1) // 2])


def close(got: Any, want: Any) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64),
                               np.asarray(want, dtype=np.float64), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- running the demos


@pytest.fixture(scope="module")
def results(live_server: str) -> dict[str, demos.DemoResult]:
    """Every demo once, with its default (the issue's) settings, against the test server."""
    return {name: fn(live_server) for name, fn in demos.DEMOS.items()}


def test_quadratic_matches_the_documents_rmsprop(results: dict[str, demos.DemoResult]) -> None:
    res = results["quadratic"]
    assert len(res.records) == 50
    opt = RefRMSprop(learning_rate=0.1, rho=0.9)
    p = {"x": np.array([10.0]), "y": np.array([10.0])}
    for rec in res.records:
        p = opt.update(p, {"x": 2 * p["x"], "y": 2 * p["y"]})
        close([rec["x"], rec["y"], rec["f"]], [p["x"][0], p["y"][0], (p["x"]**2 + p["y"]**2)[0]])


def test_quadratic_converges_toward_zero(results: dict[str, demos.DemoResult]) -> None:
    res = results["quadratic"]
    f = np.concatenate([[200.0], res.column("f")])
    assert np.all(np.diff(f) < 0), "f must fall at every iteration"
    assert f[-1] < 200.0 / 4
    assert 0 < res.records[-1]["x"] < 5 and res.records[-1]["x"] == res.records[-1]["y"]
    assert res.summary["monotone"]


def test_ill_conditioned_matches_rmsprop_and_sgd(results: dict[str, demos.DemoResult]) -> None:
    res = results["ill-conditioned"]
    assert len(res.records) == 100 + 20 and res.table_iterations == 100
    opt = RefRMSprop(learning_rate=0.1)  # the document's default rho, 0.9
    pr = {"x": np.array([10.0]), "y": np.array([10.0])}
    ps = {"x": np.array([10.0]), "y": np.array([10.0])}
    for rec in res.records:
        pr = opt.update(pr, {"x": 200 * pr["x"], "y": 2 * pr["y"]})
        ps = ref_sgd(ps, {"x": 200 * ps["x"], "y": 2 * ps["y"]}, 0.001)
        close([rec["rms_x"], rec["rms_y"], rec["rms_f"]],
              [pr["x"][0], pr["y"][0], (100 * pr["x"]**2 + pr["y"]**2)[0]])
        close([rec["sgd_x"], rec["sgd_y"], rec["sgd_f"]],
              [ps["x"][0], ps["y"][0], (100 * ps["x"]**2 + ps["y"]**2)[0]])


def test_ill_conditioned_rmsprop_overtakes_sgd_just_after_iteration_100(
        results: dict[str, demos.DemoResult]) -> None:
    """Measured, the issue's "RMSprop's f at iteration 100 is below SGD's" misses by two
    iterations: at 100, 77.48 against 67.01 (SGD has already removed the steep x term);
    RMSprop is below from 102 on, and ~50x lower by 120. What does hold at 100 is the
    document's point, scale-free progress: RMSprop is 9x further along the shallow axis."""
    res = results["ill-conditioned"]
    rf, sf = res.column("rms_f"), res.column("sgd_f")
    at100 = res.records[99]
    assert rf[99] == pytest.approx(77.481, abs=1e-3) and sf[99] == pytest.approx(67.005, abs=1e-3)
    assert res.summary["crossover"] == 102
    assert np.all(rf[101:] < sf[101:]) and np.all(rf[:101] >= sf[:101])
    assert rf[-1] * 40 < sf[-1]
    assert at100["rms_y"] * 9 < at100["sgd_y"]
    # RMSprop's steps are the same in both coordinates (x = y along the path, up to eps)
    np.testing.assert_allclose(res.column("rms_x"), res.column("rms_y"), rtol=1e-7)


def test_vs_adagrad_matches_and_reads_effective_lr_from_stats(
        results: dict[str, demos.DemoResult]) -> None:
    res = results["vs-adagrad"]
    assert len(res.records) == 200
    rms, ada = RefRMSprop(learning_rate=0.5, rho=0.9), RefAdaGrad(learning_rate=1.0)
    pr, pa = {"x": np.array([10.0])}, {"x": np.array([10.0])}
    for rec in res.records:
        pr = rms.update(pr, {"x": 2 * pr["x"]})
        pa = ada.update(pa, {"x": 2 * pa["x"]})
        close([rec["rms_x"], rec["ada_x"]], [pr["x"][0], pa["x"][0]])
        close([rec["rms_eff_lr"], rec["ada_eff_lr"]], [rms.eff_lr("x")[0], ada.eff_lr("x")[0]])


def test_adagrad_rate_never_rises_rmsprop_rate_stays_away_from_zero(
        results: dict[str, demos.DemoResult]) -> None:
    res = results["vs-adagrad"]
    ada, rms = res.column("ada_eff_lr"), res.column("rms_eff_lr")
    assert np.all(np.diff(ada) <= 0)
    assert ada[-1] < ada[0] / 3
    assert rms.min() > 0.05
    assert rms[-50:].min() > 20 * ada[-1]
    # and where it settles: the stability limit of gradient descent on x² (lr_eff = 1)
    assert rms[-20:] == pytest.approx(np.ones(20), abs=0.02)
    assert res.summary["ada_eff_lr_never_rises"]


def test_centered_matches_the_documents_formulas(results: dict[str, demos.DemoResult]) -> None:
    res = results["centered"]
    cfg = res.config
    n, reps, target, noise = cfg["iterations"], cfg["replicas"], cfg["target"], cfg["noise"]
    xi = np.random.default_rng(cfg["seed"]).standard_normal((n, reps))
    plain = RefRMSprop(cfg["learning_rate"], cfg["rho"])
    cent = RefRMSprop(cfg["learning_rate"], cfg["rho"], centered=True)
    xp, xc = {"x": np.zeros(reps)}, {"x": np.zeros(reps)}

    def grad(x: np.ndarray, i: int) -> np.ndarray:
        d = x - target
        return d / np.sqrt(1 + d * d) + noise * xi[i]

    def f(x: np.ndarray) -> float:
        return float(np.mean(np.sqrt(1 + (x - target) ** 2) - 1))

    for i, rec in enumerate(res.records):
        xp = plain.update(xp, {"x": grad(xp["x"], i)})
        xc = cent.update(xc, {"x": grad(xc["x"], i)})
        close([rec["plain_f"], rec["centered_f"]], [f(xp["x"]), f(xc["x"])])
        close([rec["plain_dist"], rec["centered_dist"]],
              [np.median(np.abs(xp["x"] - target)), np.median(np.abs(xc["x"] - target))])
        close([rec["plain_eff_lr"], rec["centered_eff_lr"]],
              [lower_median(plain.eff_lr("x")), lower_median(cent.eff_lr("x"))])


def test_centering_helps_while_the_mean_gradient_dominates(
        results: dict[str, demos.DemoResult]) -> None:
    """Measured: ~3.7x larger steps in transit (mean²+var against var), 2.5x sooner
    near the optimum, and nothing gained (or lost beyond noise) once it is there."""
    s = results["centered"].summary
    for kind in ("plain", "centered"):
        mean, std = s[f"transit_grad_mean_{kind}"], s[f"transit_grad_std_{kind}"]
        assert abs(mean) > 3 * std  # the regime the document names: mean far from zero
    assert s["transit_eff_lr_centered"] > 3 * s["transit_eff_lr_plain"]
    assert s["transit_step_centered"] > 3 * s["transit_step_plain"]
    assert s["arrived_plain"] == s["arrived_centered"] == results["centered"].config["replicas"]
    assert s["arrival_centered"] * 2 < s["arrival_plain"]
    assert s["settled_eff_lr_centered"] == pytest.approx(s["settled_eff_lr_plain"], rel=0.1)
    assert s["settled_f_mean_centered"] == pytest.approx(s["settled_f_mean_plain"], rel=0.25)


def test_printed_tables_follow_the_document(results: dict[str, demos.DemoResult]) -> None:
    buf = io.StringIO()
    demos.print_result(results["quadratic"], buf)
    text = buf.getvalue()
    rows = [line.split() for line in text.splitlines() if re.match(r"^\d", line)]
    assert [r[0] for r in rows] == ["0", "10", "20", "30", "40", "49"]
    r0 = results["quadratic"].records[0]
    assert rows[0][1:] == [f"{r0['x']:.6f}", f"{r0['y']:.6f}", f"{r0['f']:.6f}"]
    assert "Final: x = 4.59238901, y = 4.59238901" in text

    buf = io.StringIO()
    demos.print_result(results["vs-adagrad"], buf)
    rows = [line.split() for line in buf.getvalue().splitlines() if re.match(r"^\d", line)]
    assert [r[0] for r in rows] == ["0", "40", "80", "120", "160", "199"]
    last = results["vs-adagrad"].records[-1]
    assert rows[-1][-2:] == [f"{last['rms_eff_lr']:.10f}", f"{last['ada_eff_lr']:.10f}"]

    buf = io.StringIO()
    demos.print_result(results["ill-conditioned"], buf)
    text = buf.getvalue()
    assert "SGD's f is still LOWER" in text and "at iteration 102" in text


def test_demos_leave_no_sessions_behind(live_server: str,
                                        results: dict[str, demos.DemoResult]) -> None:
    with Client(live_server) as client:
        names = {s.name for s in client.list_sessions()}
    assert not {n for n in names if n and n.startswith("demo-")}


def test_progress_bar_on_stderr_against_a_url(live_server: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    demos.run("quadratic", url=live_server)
    captured = capsys.readouterr()
    assert "quadratic:" in captured.err and "step" in captured.err
    assert "RMSprop Optimizer Demo" in captured.out and "quadratic:" not in captured.out


def test_presets_by_name_in_the_sdk_and_the_api(live_server: str) -> None:
    """The document's common configurations, by name: SDK and create-session API agree."""
    expected = {"standard": {"lr": 1e-3, "alpha": 0.99, "momentum": 0.0},
                "rnn": {"lr": 1e-4, "alpha": 0.9, "momentum": 0.0},
                "momentum": {"lr": 1e-3, "alpha": 0.99, "momentum": 0.9}}
    assert set(PRESETS) == set(expected)
    with Client(live_server) as client:
        for name, hp in expected.items():
            doc = client.create_session("rmsprop", preset=name,
                                        params={"w": np.zeros(2)})
            try:
                assert {k: doc.hyperparams[k] for k in hp} == hp
            finally:
                client.delete_session(doc.id)
        with RMSprop(preset="rnn", client=client) as opt:
            opt.update({"w": np.ones(2)}, {"w": np.ones(2)})
            got = client.get_session(opt.session_id).hyperparams
            assert (got["lr"], got["alpha"]) == (1e-4, 0.9)


# ------------------------------------------------------------------- the CLI and figures

EXPECTED_PNGS = {
    "quadratic.png": demos.SINGLE_SIZE,
    "ill_conditioned.png": demos.DOUBLE_SIZE,
    "vs_adagrad.png": demos.DOUBLE_SIZE,
    "centered.png": demos.DOUBLE_SIZE,
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def pixels(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * demos.DPI), round(inches[1] * demos.DPI)


@pytest.mark.slow
def test_cli_demo_all_with_plots_on_a_service_started_here(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "all", "--plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(started here: embedded redis-server + the app)" in out
    for title in ("RMSprop Optimizer Demo", "RMSprop vs SGD on Ill-Conditioned Problem",
                  "RMSprop vs AdaGrad: Long Training Comparison",
                  "Plain vs centered RMSprop on a noisy objective"):
        assert title in out
    assert "Final: x = 4.59238901, y = 4.59238901" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXPECTED_PNGS)
    for name, inches in EXPECTED_PNGS.items():
        path = tmp_path / name
        assert path.stat().st_size > 10_000, name
        assert png_size(path) == pixels(inches), name
        assert f"wrote {path}" in out


def test_readme_shows_the_figures() -> None:
    """The committed figures exist at the sizes the code draws, and the README embeds each."""
    readme = (ROOT / "README.md").read_text()
    for name, inches in EXPECTED_PNGS.items():
        path = ROOT / "docs" / "img" / name
        assert path.is_file() and path.stat().st_size > 10_000, path
        assert png_size(path) == pixels(inches), path
        assert f"](docs/img/{name})" in readme, f"README.md does not embed docs/img/{name}"


# ------------------------------------------------------------------- optional dependencies


def hide_modules(directory: Path, *names: str) -> dict[str, str]:
    """An environment whose PYTHONPATH starts with modules that raise ImportError."""
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    path = os.pathsep.join([str(directory), *sys.path])
    return {**os.environ, "PYTHONPATH": path}


def test_demo_names_missing_extras_before_running(tmp_path: Path) -> None:
    env = hide_modules(tmp_path / "hide", "tqdm", "matplotlib")
    proc = subprocess.run([sys.executable, "-m", "optserve.cli", "demo", "quadratic", "--url",
                           "http://127.0.0.1:1", "--plot", str(tmp_path / "png")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "--url (its progress bar) needs tqdm" in proc.stderr
    assert "--plot needs matplotlib" in proc.stderr
    assert 'pip install "optserve[demo]"' in proc.stderr
    assert not (tmp_path / "png").exists()


def test_demo_against_nothing_says_so_in_one_line() -> None:
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "optserve.cli", "demo", "quadratic", "--url",
                           f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"optserve demo: nothing answers at http://127.0.0.1:{port}: is "
                           "`optserve serve` running there?\n")
