"""A data-parallel worker process for the sync-mode test: R rounds of seeded gradients."""

from __future__ import annotations

import sys

import httpx
import torch

from optserve_client import wire


def grad(k: int, r: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * k + r)
    return torch.randn(n, generator=g) * (k + 1)


def main(url: str, sid: str, k: int, rounds: int, n: int) -> None:
    with httpx.Client(base_url=url, timeout=120) as c:
        for r in range(rounds):
            resp = c.post(f"/v1/sessions/{sid}/step",
                          content=wire.encode_safetensors({"w": grad(k, r, n)}),
                          headers={"content-type": wire.SAFETENSORS_TYPE,
                                   "x-optserve-base-version": str(r),
                                   "x-optserve-weight": str(k + 1),
                                   "idempotency-key": f"worker{k}-round{r}"})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-optserve-version"] == str(r + 1), resp.headers


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
