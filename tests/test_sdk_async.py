"""Every endpoint through AsyncClient (and the matching sync calls) against a real server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import optserve_client as oc


def test_async_client_every_endpoint(live_server: str) -> None:
    async def main() -> None:
        async with oc.AsyncClient(live_server, format="json") as c:
            assert await c.ready() and await c.live()
            s = await c.create_session("rmsprop", {"lr": 0.1}, name="async-run")
            assert s.version is None and s.tensors == {}
            with pytest.raises(oc.NoParamsError):
                await c.step(s.id, {"w": np.ones(2)})
            doc = await c.put_params(s.id, {"w": np.array([1.0, 2.0], np.float32)})
            assert doc.version == 0 and doc.tensors["w"]["shape"] == [2]
            res = await c.step(s.id, {"w": torch.tensor([0.5, -0.5])})
            assert isinstance(res.params["w"], torch.Tensor) and res.version == 1
            params, version = await c.get_params(s.id)
            np.testing.assert_array_equal(params["w"], res.params["w"].numpy())
            with pytest.raises(oc.PreconditionFailedError) as exc:
                await c.put_params(s.id, params, if_match=0)
            assert exc.value.current_version == 1
            doc = await c.put_params(s.id, {"w": params["w"] * 2}, if_match=version)
            assert doc.version == 2
            assert (await c.update_session(s.id, hyperparams={"lr": 0.01})).hyperparams[
                "lr"] == 0.01
            state, meta = await c.get_state(s.id)
            assert meta["version"] == 2 and float(state["state.w.step"]) == 1.0
            state["state.w.step"] = np.array(7.0, np.float32)
            doc = await c.put_state(s.id, state, meta, if_match=2)
            assert doc is not None and doc.version == 3
            stats = await c.stats(s.id)
            assert stats["version"] == 3
            assert s.id in {x.id for x in await c.list_sessions()}
            assert "optserve_steps_applied_total" in await c.metrics()
            await c.delete_session(s.id)
            with pytest.raises(oc.SessionNotFoundError):
                await c.get_session(s.id)

    asyncio.run(main())


def test_sync_client_errors_carry_their_fields(live_server: str) -> None:
    with oc.Client(live_server) as c:
        s = c.create_session("rmsprop", params={"fc.weight": np.ones((2, 3), np.float32)},
                             max_staleness=1)
        with pytest.raises(oc.ShapeMismatchError) as shape:
            c.step(s.id, {"fc.weight": np.ones((3, 2), np.float32)})
        assert shape.value.tensor == "fc.weight" and shape.value.expected == [2, 3]
        with pytest.raises(oc.UnknownTensorError) as unknown:
            c.step(s.id, {"nope": np.ones(1, np.float32)})
        assert unknown.value.tensors == ["nope"]
        with pytest.raises(oc.NonFiniteGradientError) as nonfinite:
            c.step(s.id, {"fc.weight": np.full((2, 3), np.nan, np.float32)})
        assert nonfinite.value.tensor == "fc.weight"
        with pytest.raises(oc.InvalidHyperparametersError) as hp:
            c.update_session(s.id, hyperparams={"alpha": 1.5})
        assert hp.value.field == "alpha"
        for _ in range(3):
            c.step(s.id, {"fc.weight": np.ones((2, 3), np.float32)}, return_params=False)
        with pytest.raises(oc.StaleGradientError) as stale:
            c.step(s.id, {"fc.weight": np.ones((2, 3), np.float32)}, base_version=1)
        assert stale.value.current_version == 3
        with pytest.raises(oc.FutureVersionError):
            c.step(s.id, {"fc.weight": np.ones((2, 3), np.float32)}, base_version=9)
        with pytest.raises(oc.PreconditionRequiredError):
            c.put_params(s.id, {"fc.weight": np.ones((2, 3), np.float32)})
        with pytest.raises(oc.ImmutableHyperparameterError) as imm:
            c.update_session(s.id, hyperparams={"centered": True})
        assert imm.value.field == "centered"
        assert c.get_session(s.id).version == 3  # nothing rejected changed anything
        c.delete_session(s.id)
    with oc.Client(live_server, api_key="whatever") as c:  # an open server ignores keys
        assert c.ready()


def test_api_keys(keyed_server: str) -> None:
    with oc.Client(keyed_server) as anon, pytest.raises(oc.AuthenticationError):
        anon.list_sessions()
    with oc.Client(keyed_server, api_key="ka") as alice, \
            oc.Client(keyed_server, api_key="kb") as bob:
        s = alice.create_session(params={"x": np.zeros(1)})
        with pytest.raises(oc.SessionNotFoundError):
            bob.get_session(s.id)
        alice.delete_session(s.id)
