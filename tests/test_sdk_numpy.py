"""optserve_client.RMSprop/AdaGrad/SGD: the RMSprop document's NumPy interface, remote.

The reference classes below are the document's NumPy implementation (and the AdaGrad its
demos use); the remote ones must reproduce them step for step.
"""

from __future__ import annotations

import numpy as np
import pytest

from optserve_client import SGD, AdaGrad, Client, RMSprop


class RefRMSprop:
    """The RMSprop document's NumPy implementation."""

    def __init__(self, learning_rate: float = 0.001, rho: float = 0.9, epsilon: float = 1e-8
                 ) -> None:
        self.learning_rate, self.rho, self.epsilon = learning_rate, rho, epsilon
        self.cache: dict[str, np.ndarray] = {}

    def update(self, params: dict, grads: dict) -> dict:
        updated = {}
        for key in params:
            if key not in self.cache:
                self.cache[key] = np.zeros_like(params[key])
            self.cache[key] = self.rho * self.cache[key] + (1 - self.rho) * (grads[key] ** 2)
            updated[key] = params[key] - self.learning_rate * grads[key] / (
                np.sqrt(self.cache[key]) + self.epsilon)
        return updated


class RefAdaGrad:
    def __init__(self, learning_rate: float = 0.01, epsilon: float = 1e-8) -> None:
        self.learning_rate, self.epsilon = learning_rate, epsilon
        self.cache: dict[str, np.ndarray] = {}

    def update(self, params: dict, grads: dict) -> dict:
        updated = {}
        for key in params:
            self.cache[key] = self.cache.get(key, np.zeros_like(params[key])) + grads[key] ** 2
            updated[key] = params[key] - self.learning_rate * grads[key] / (
                np.sqrt(self.cache[key]) + self.epsilon)
        return updated


def test_demo1_step_for_step(live_server: str) -> None:
    """Demo 1: f(x, y) = x² + y² from (10, 10), learning_rate 0.1, rho 0.9, 50 iterations."""
    ref_params = {"x": np.array([10.0]), "y": np.array([10.0])}
    params = {"x": np.array([10.0]), "y": np.array([10.0])}
    ref = RefRMSprop(learning_rate=0.1, rho=0.9)
    with RMSprop(learning_rate=0.1, rho=0.9, url=live_server) as opt:
        for _ in range(50):
            ref_params = ref.update(ref_params, {k: 2 * v for k, v in ref_params.items()})
            params = opt.update(params, {k: 2 * v for k, v in params.items()})
            for k in ("x", "y"):
                assert params[k].dtype == np.float64 and params[k].shape == (1,)
                np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-13, atol=0)
            cache = opt.cache
            np.testing.assert_allclose(cache["x"], ref.cache["x"], rtol=1e-13)
        assert opt.version == 50
        with Client(live_server) as c:
            doc = c.get_session(opt.session_id)
        assert doc.hyperparams["lr"] == 0.1 and doc.hyperparams["alpha"] == 0.9
        assert doc.hyperparams["eps"] == 1e-8
        assert doc.tensors["x"]["dtype"] == "float64"
        sid = opt.session_id
    with Client(live_server) as c:  # closing the optimizer deleted its session
        assert sid not in {s.id for s in c.list_sessions()}
    assert params["x"][0] ** 2 + params["y"][0] ** 2 < 0.25 * 200  # it descends


def test_demo3_adagrad_and_cache(live_server: str) -> None:
    ref_r, ref_a = RefRMSprop(0.5, 0.9), RefAdaGrad(1.0)
    pr = pa = {"x": np.array([10.0])}
    qr = qa = {"x": np.array([10.0])}
    with RMSprop(learning_rate=0.5, rho=0.9, url=live_server) as rms, \
            AdaGrad(learning_rate=1.0, url=live_server) as ada:
        assert rms.cache == {} and ada.cache == {}
        for _ in range(30):
            pr = rms.update(pr, {"x": 2 * pr["x"]})
            pa = ada.update(pa, {"x": 2 * pa["x"]})
            qr = ref_r.update(qr, {"x": 2 * qr["x"]})
            qa = ref_a.update(qa, {"x": 2 * qa["x"]})
            np.testing.assert_allclose(pr["x"], qr["x"], rtol=1e-13)
            np.testing.assert_allclose(pa["x"], qa["x"], rtol=1e-13)
        np.testing.assert_allclose(ada.cache["x"], ref_a.cache["x"], rtol=1e-13)
        np.testing.assert_allclose(rms.cache["x"], ref_r.cache["x"], rtol=1e-13)


def test_sgd_and_float32_kept(live_server: str) -> None:
    params = {"w": np.array([[1.0, -2.0]], dtype=np.float32)}
    with SGD(learning_rate=0.1, url=live_server) as opt:
        out = opt.update(params, {"w": np.array([[1.0, 1.0]], dtype=np.float32)})
        assert out["w"].dtype == np.float32
        np.testing.assert_array_equal(out["w"], np.array([[0.9, -2.1]], dtype=np.float32))
        out["w"] += 1  # returned arrays are ordinary writable arrays
        assert params["w"][0, 0] == 1.0  # and the inputs are never changed


def test_edited_params_and_hyperparams_apply(live_server: str) -> None:
    """The interface lets callers pass any params and change learning_rate between calls."""
    ref = RefRMSprop(learning_rate=0.1)
    with RMSprop(learning_rate=0.1, url=live_server) as opt:
        p = q = {"x": np.array([1.0, 2.0])}
        p = opt.update(p, {"x": np.array([0.5, 0.5])})
        q = ref.update(q, {"x": np.array([0.5, 0.5])})
        p = {"x": p["x"] * 3}  # edited by the caller: uploaded before the next step
        q = {"x": q["x"] * 3}
        opt.learning_rate = ref.learning_rate = 0.01
        p = opt.update(p, {"x": np.array([1.0, -1.0])})
        q = ref.update(q, {"x": np.array([1.0, -1.0])})
        np.testing.assert_allclose(p["x"], q["x"], rtol=1e-13)
        assert opt.version == 3  # step, PUT, step


@pytest.mark.parametrize(("preset", "lr", "alpha", "momentum"), [
    ("standard", 1e-3, 0.99, 0.0), ("rnn", 1e-4, 0.9, 0.0), ("momentum", 1e-3, 0.99, 0.9)])
def test_presets(live_server: str, preset: str, lr: float, alpha: float, momentum: float
                 ) -> None:
    with RMSprop(preset=preset, url=live_server) as opt:
        assert (opt.learning_rate, opt.rho, opt.momentum) == (lr, alpha, momentum)
        opt.update({"x": np.ones(2)}, {"x": np.ones(2)})
        with Client(live_server) as c:
            hp = c.get_session(opt.session_id).hyperparams
            assert (hp["lr"], hp["alpha"], hp["momentum"]) == (lr, alpha, momentum)
            s = c.create_session(preset=preset, params={"x": np.ones(1)})
            assert c.get_session(s.id).hyperparams == hp
            c.delete_session(s.id)
    assert RMSprop(0.5, preset="rnn", url=live_server).learning_rate == 0.5
    with pytest.raises(ValueError):
        RMSprop(preset="adam")
