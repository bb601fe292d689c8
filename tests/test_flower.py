"""optserve as a Flower strategy's server optimizer, in Flower's own simulation runtime:
RMSprop on the server beats FedAvg on non-IID digits, and a restarted ServerApp continues
the same session bit for bit."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")  # flwr's simulation runtime runs the ClientApps on Ray
pytest.importorskip("sklearn")

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from optserve_client import Client
from optserve_client.flower import OptservRMSprop, pseudo_gradient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import flower_digits as app  # noqa: E402

ROUNDS = 4


def test_pseudo_gradient_is_fedopts_convention() -> None:
    """x - weighted mean of the clients' arrays; an array one client lacks is averaged over
    the others; the result keeps each array's dtype."""
    x = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([0.5], np.float64)}
    ups = [(1.0, {"a": np.array([0.0, 0.0], np.float32), "b": np.array([0.0])}),
           (3.0, {"a": np.array([2.0, 4.0], np.float32)})]
    g = pseudo_gradient(x, ups)
    np.testing.assert_array_equal(g["a"], np.array([1 - 1.5, 2 - 3.0], np.float32))
    np.testing.assert_array_equal(g["b"], np.array([0.5]))
    assert g["a"].dtype == np.float32 and g["b"].dtype == np.float64


@pytest.mark.slow
def test_flower_simulation_rmsprop_vs_fedavg_and_restart(live_server: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # Ray's workers import the ClientApp's module by name.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(EXAMPLES), path) if p))
    run = uuid.uuid4().hex[:8]
    hist: dict[str, list[float]] = {"fedavg": [], "rmsprop": [], "first": [], "second": []}
    out: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            out["fedavg"] = app.fit(FedAvg(**app.nodes()), grid, ROUNDS, hist["fedavg"])
            out["rmsprop"] = app.fit(OptservRMSprop(url=live_server, session=f"fl-a-{run}",
                                                    **app.nodes()),
                                     grid, ROUNDS, hist["rmsprop"])
            # The same run, with the ServerApp "restarted" after round 2: a fresh strategy
            # object with the same session name, started again from the initial model.
            first = OptservRMSprop(url=live_server, session=f"fl-b-{run}", **app.nodes())
            out["first"] = app.fit(first, grid, 2, hist["first"])
            out["sid"] = first.session_id
            with Client(live_server) as c:
                out["after2"] = c.get_params(first.session_id)
            second = OptservRMSprop(url=live_server, session=f"fl-b-{run}", **app.nodes())
            out["second"] = app.fit(second, grid, ROUNDS - 2, hist["second"])
            out["second_sid"] = second.session_id
        except BaseException as exc:  # surfaced below: the runtime only logs it
            out["error"] = exc

    run_simulation(server_app=server_app, client_app=app.client_app,
                   num_supernodes=app.N_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1}})
    if "error" in out:
        raise out["error"]

    # 1. Server RMSprop reaches at least FedAvg's accuracy (and a floor) in as many rounds.
    fedavg, rms = hist["fedavg"][-1], hist["rmsprop"][-1]
    print(f"test accuracy after {ROUNDS} rounds: FedAvg {fedavg:.3f}, optserve RMSprop "
          f"{rms:.3f}; per round {hist}")
    assert len(hist["fedavg"]) == len(hist["rmsprop"]) == ROUNDS + 1
    assert rms >= fedavg - 0.02
    assert rms >= 0.8

    # 2. The restarted strategy attached to the same session and continued from round 2's
    # parameters (bitwise, as GET params returns them) and optimizer state.
    params2, version2 = out["after2"]
    assert version2 == 2 and out["second_sid"] == out["sid"]
    for k, v in params2.items():
        np.testing.assert_array_equal(out["first"][k].numpy(), v)
    assert hist["second"][0] == hist["first"][-1]  # its round-0 evaluation: round 2's model
    with Client(live_server) as c:
        final, version = c.get_params(out["sid"])
        state, meta = c.get_state(out["sid"])
    assert version == ROUNDS and meta["version"] == ROUNDS
    assert float(state["state.w.step"]) == ROUNDS  # one optimizer, ROUNDS steps
    # ... and ends exactly where the uninterrupted run ended.
    a: ArrayRecord = out["rmsprop"]
    for k, v in final.items():
        np.testing.assert_array_equal(out["second"][k].numpy(), v)
        np.testing.assert_array_equal(a[k].numpy(), v)
    assert hist["second"][-1] == hist["rmsprop"][-1]


@pytest.mark.parametrize("cls", ["OptservAdagrad", "OptservSGD"])
def test_other_server_optimizers_match_torch(live_server: str, cls: str) -> None:
    """AdaGrad (FedAdagrad's defaults) and SGD with momentum (FedAvgM) step the session
    like torch.optim on the pseudo-gradients; a second strategy with the same name attaches."""
    import torch

    from optserve_client import flower

    kw = {"momentum": 0.5} if cls == "OptservSGD" else {}
    name = f"fl-{cls}-{uuid.uuid4().hex[:8]}"
    strategy = getattr(flower, cls)(url=live_server, session=name, **kw)
    x0 = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    start = strategy.current_arrays(ArrayRecord({"w": app.Array(x0["w"])}))
    np.testing.assert_array_equal(start["w"].numpy(), x0["w"])
    w = torch.tensor(x0["w"], requires_grad=True)
    ref = (torch.optim.Adagrad([w], lr=0.1, eps=1e-3) if cls == "OptservAdagrad"
           else torch.optim.SGD([w], lr=1.0, momentum=0.5))
    rng = np.random.default_rng(0)
    for _ in range(3):
        cur = strategy.server.params
        ups = [(float(n), {"w": cur["w"] + rng.standard_normal(3).astype(np.float32)})
               for n in (10, 30)]
        new = strategy.server.step(ups)
        w.grad = torch.from_numpy(pseudo_gradient(cur, ups)["w"])
        ref.step()
        np.testing.assert_allclose(new["w"], w.detach().numpy(), rtol=1e-6, atol=1e-7)
    again = getattr(flower, cls)(url=live_server, session=name, **kw)
    np.testing.assert_array_equal(again.current_arrays()["w"].numpy(), new["w"])
    assert again.session_id == strategy.session_id and again.server.version == 3
