"""Peers that come and go between target-weight rounds, through the SDK's workers, against
two server processes sharing one Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from optserve_client import Client
from optserve_client.distributed import (
    DataParallelOptimizer,
    StepReport,
    SyncWorker,
    create_sync_session,
)


def run_all(jobs: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()


def test_round_one_by_a_b_round_two_by_c_d_e(make_server) -> None:
    a, b = make_server(), make_server()
    n = 64
    gen = torch.Generator().manual_seed(3)
    g = [torch.randn(n, generator=gen) for _ in range(5)]
    w1 = [2.0, 2.0]          # A and B: the target 4 exactly
    w2 = [1.0, 1.0, 2.0]     # C, D and E: any two stay below 4, the third reaches it
    with Client(a.url) as ca, Client(b.url) as cb:
        sid = create_sync_session(ca, {"w": np.zeros(n, np.float32)}, target_weight=4,
                                  timeout_s=60, lr=0.01, momentum=0.9).id
        assert ca.get_session(sid).sync["target_weight"] == 4.0

        # Round 1: workers A (server a) and B (server b), numpy, weights from step(weight=).
        workers = [SyncWorker(client, sid, rank=r) for r, client in enumerate((ca, cb))]
        got: dict[int, np.ndarray] = {}
        run_all([lambda k=k: got.update({k: workers[k].step(
            {"w": g[k].numpy()}, weight=w1[k])["w"]}) for k in range(2)])
        assert [w.last for w in workers] == [StepReport(0, 1, "applied", 1)] * 2
        np.testing.assert_array_equal(got[0], got[1])

        # Round 2: A and B have left; C, D, E join (torch models, DataParallelOptimizer;
        # world_size is no check on a target-weight session) and start from version 1.
        models = [{"w": torch.nn.Parameter(torch.zeros(n))} for _ in range(3)]
        opts = [DataParallelOptimizer(models[k], (ca, cb, ca)[k], sid, rank=k, world_size=3)
                for k in range(3)]
        assert [o.version for o in opts] == [1, 1, 1]
        torch.testing.assert_close(models[0]["w"].detach(), torch.from_numpy(got[0]))

        def contribute(k: int) -> None:
            models[k]["w"].grad = g[2 + k].clone()
            opts[k].step(weight=w2[k])

        run_all([lambda k=k: contribute(k) for k in range(3)])
        assert [o.last for o in opts] == [StepReport(1, 2, "applied", 1)] * 3
        assert ca.get_session(sid).version == 2
        # The SDK passes sync changes through (PATCH, merged by the server).
        doc = cb.update_session(sid, sync={"min_weight": 1})
        assert doc.sync == {"contributions": None, "min_contributions": None,
                            "timeout_s": 60.0, "target_weight": 4.0, "min_weight": 1.0}
        with pytest.raises(ValueError, match="target_weight"):
            create_sync_session(ca, {"w": np.zeros(1, np.float32)})

    ref = torch.zeros(n, requires_grad=True)
    opt = torch.optim.RMSprop([ref], lr=0.01, momentum=0.9)
    for grads, weights in ((g[:2], w1), (g[2:], w2)):
        ref.grad = (sum(x.double() * w for x, w in zip(grads, weights, strict=True))
                    / sum(weights)).float()
        opt.step()
    for m in models:
        torch.testing.assert_close(m["w"].detach(), ref.detach(), rtol=1e-6, atol=1e-8)
