"""The SDK's federated helper: a round is one server RMSprop step on the example-weighted
mean pseudo-gradient; failing and late clients do not stop a round that has
min_contributions; the digits example reaches a centralized run's accuracy."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from optserve_client import Client
from optserve_client.federated import (
    SERVER_HYPERPARAMS,
    FederatedClient,
    FederatedServer,
    run_rounds,
)

ROOT = Path(__file__).resolve().parent.parent

# FedAvg-family methods on non-IID clients trail a centralized run of the same compute
# budget by a few points (Reddi et al. 2021 report 0-3 points for FedAdam/FedYogi; plain
# FedAvg often more): the example must stay within 5 accuracy points of the centralized
# model trained with the same local SGD for rounds * epochs epochs. (Measured: ~1 point
# behind; plain FedAvg, server SGD with lr 1, lands ~8 points behind and would fail.)
MARGIN = 0.05


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def shift_update(shift: np.ndarray):
    """A local "training" that moves the round's params by a fixed amount."""

    def update(params: dict[str, np.ndarray], round_: int) -> dict[str, np.ndarray]:
        return {"w": params["w"] + shift}

    return update


def test_round_is_server_rmsprop_on_weighted_pseudo_gradients(live_server: str) -> None:
    shifts = [np.array([0.1, -0.2], np.float32), np.array([0.3, 0.0], np.float32),
              np.array([-0.1, 0.5], np.float32)]
    sizes = [10, 30, 60]
    w0 = np.array([1.0, 2.0], np.float32)
    with Client(live_server) as client:
        server = FederatedServer.create(client, {"w": w0}, n_clients=3, timeout_s=30)
        assert server.session.sync == {"contributions": 3, "min_contributions": 3,
                                       "timeout_s": 30.0}
        assert {k: server.session.hyperparams[k] for k in SERVER_HYPERPARAMS} == \
            SERVER_HYPERPARAMS
        clients = [FederatedClient(client, server.session_id, shift_update(s), n, as_="numpy",
                                   client_id=f"c{k}")
                   for k, (s, n) in enumerate(zip(shifts, sizes, strict=True))]
        summaries = run_rounds(server, clients, 3)
        params, version = server.params()
        server.delete()
    assert version == 3
    assert [(s.base_version, s.version, s.applied) for s in summaries] == \
        [(0, 1, 3), (1, 2, 3), (2, 3, 3)]
    w = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.RMSprop([w], **SERVER_HYPERPARAMS)
    pseudo = -sum(np.float64(n) * s for s, n in zip(shifts, sizes, strict=True)) / sum(sizes)
    for _ in range(3):
        w.grad = torch.from_numpy(pseudo.astype(np.float32))  # round - local, weighted mean
        opt.step()
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-5)


def crash_once_in_round_0() -> tuple:
    crashed = threading.Event()

    def update(params: dict, round_: int) -> dict:
        if round_ == 0 and not crashed.is_set():
            crashed.set()
            raise RuntimeError("simulated crash")
        return {"w": params["w"] + 1}

    return update, crashed


def test_too_few_contributions_fail_the_round_then_the_next_closes(live_server: str) -> None:
    """min_contributions=3 of 3 and one client crashes: the round fails for everyone (the
    session stays at 0); the next round, at the same version, closes."""
    update, _ = crash_once_in_round_0()
    ones = np.ones(2, np.float32)
    with Client(live_server) as client:
        server = FederatedServer.create(client, {"w": np.zeros(2, np.float32)}, n_clients=3,
                                        min_contributions=3, timeout_s=0.5)
        clients = [FederatedClient(client, server.session_id, u, 5, as_="numpy",
                                   client_id=f"c{k}")
                   for k, u in enumerate([update, shift_update(ones), shift_update(ones)])]
        summaries = run_rounds(server, clients, 2)
        server.delete()
    first, second = summaries
    assert [(r.status, r.base_version, r.version) for r in first.results] == \
        [("error", 0, 0), ("failed", 0, 0), ("failed", 0, 0)]
    assert isinstance(first.results[0].error, RuntimeError)
    assert not first.closed and first.seconds >= 0.45
    assert [(r.status, r.base_version, r.version) for r in second.results] == \
        [("applied", 0, 1)] * 3
    assert second.closed and second.applied == 3


def test_client_loops_rejoin_the_open_round_after_a_crash(live_server: str) -> None:
    """Clients on their own loops (`FederatedClient.run`): the one that crashes tries again
    while the round is still open, joins it, and is counted once."""
    update, crashed = crash_once_in_round_0()
    ones = np.ones(2, np.float32)
    with Client(live_server) as client:
        server = FederatedServer.create(client, {"w": np.zeros(2, np.float32)}, n_clients=3,
                                        min_contributions=3, timeout_s=10, optimizer="sgd",
                                        lr=1.0)
        clients = [FederatedClient(client, server.session_id, u, 5, as_="numpy",
                                   client_id=f"c{k}")
                   for k, u in enumerate([update, shift_update(ones), shift_update(ones)])]
        results: dict[int, list] = {}
        threads = [threading.Thread(
            target=lambda k=k: results.update({k: clients[k].run(until_version=3)}))
            for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        params, version = server.params()
        server.delete()
    assert crashed.is_set() and version == 3
    assert [(r.status, r.base_version) for r in results[0]] == \
        [("error", 0), ("applied", 0), ("applied", 1), ("applied", 2)]
    for k in (1, 2):
        assert [(r.status, r.base_version, r.version) for r in results[k]] == \
            [("applied", 0, 1), ("applied", 1, 2), ("applied", 2, 3)]
    # FedAvg (server SGD, lr 1): every round moves the params by the mean local shift, +1
    np.testing.assert_array_equal(params["w"], np.full(2, 3.0, np.float32))


@pytest.mark.slow
def test_federated_example_reaches_centralized_accuracy(live_server: str) -> None:
    ex = load_example("federated")
    rounds, epochs, timeout_s = 20, 2, 1.5
    res = ex.run(live_server, rounds=rounds, epochs=epochs, n_clients=8, timeout_s=timeout_s,
                 min_contributions=6, fail={1: 2}, straggle={3: 5}, log=None)
    central = ex.centralized(ex.load_data(0), rounds * epochs)
    s = res.summaries
    assert len(s) == rounds and all(x.closed for x in s)
    assert [x.version for x in s] == list(range(1, rounds + 1))
    # Round 1: client 2 crashed; the round closed at its deadline with the other 7.
    by_id = {r.client_id: r for r in s[1].results}
    assert by_id["client2"].status == "error" and s[1].applied == 7
    assert s[1].seconds >= timeout_s * 0.9
    # Round 3: client 5 finished after the deadline; its push was refused as late.
    by_id = {r.client_id: r for r in s[3].results}
    assert (by_id["client5"].status, by_id["client5"].base_version,
            by_id["client5"].version) == ("late", 3, 4)
    assert s[3].applied == 7
    assert all(x.applied == 8 for i, x in enumerate(s) if i not in (1, 3))
    assert res.accuracies[-1] >= central - MARGIN, (res.accuracies, central)
