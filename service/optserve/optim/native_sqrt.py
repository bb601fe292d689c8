"""The native kernel's own float32 sqrt: proved equal to MKL's on this machine, then used.

Why: ATen's CPU ``sqrt`` is MKL's ``vsSqrt``, which is not IEEE sqrt (about one result in
six is one ulp away), so the exact kernel has to call it, and at 1e7 elements those calls
were a quarter of the update's time. On CPUs other than Intel's, MKL runs a plain SSE
kernel: ``rsqrtps`` and one correction step in separate multiplies and adds. The native
library carries the same sequence in AVX2 (``fast_sqrt`` in ``native_src``).

Why it is exact: float32 has 2^32 inputs, so equality can be checked for every one. The
first process on a machine runs every normal float, every subnormal, zeros, infinities and
all NaN and negative patterns near them through both (a few seconds on one thread, after
the kernel is already in use with MKL's sqrt) and records the outcome in a file named by
the library, torch and a fingerprint of the CPU and of MKL's dispatch settings; later
processes find that file and re-check a few hundred thousand inputs in milliseconds. Any
difference, anywhere, and the kernel keeps calling MKL. The switch changes no bit, so it
may happen while steps run. Intel CPUs run another MKL kernel; there the check is expected
to fail and MKL is kept. Float64 always calls MKL.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

status = "not checked"
"""``not checked``, ``checking``, ``on``, or ``off: <why>`` (diagnostics, tests, benchmarks)."""
_done = threading.Event()

_FULL = (
    (0x0000_0000, 0x0080_0000),  # +0 and every subnormal
    (0x0080_0000, 0x7F80_0000),  # every positive normal (the fast path's whole domain)
    (0x7F80_0000, 0x8080_0000),  # +inf, +NaNs, -0, negative subnormals
    (0xFF7F_0000, 0x1_0000_0000),  # the largest negatives, -inf, -NaNs
)
"""Every input the fast path computes, and every kind it hands to MKL (~2.2e9 floats)."""

_QUICK = tuple((lo, lo + (1 << 16)) for lo in (
    0x0000_0000, 0x007F_8000, 0x0080_0000, 0x2E00_0000, 0x3F00_0000, 0x3F80_0000, 0x4B00_0000,
    0x7F7F_8000, 0x7F80_0000, 0x8000_0000, 0xBF80_0000, 0xFFBF_8000))
"""Runs around the edges and the usual magnitudes: the start-up re-check on a known machine."""

BUSY = "another process is checking it on this machine"

_MKL_ENV = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "MKL_VML_MODE")


def fingerprint() -> str:
    """What decides which MKL kernel runs and what ``rsqrtps`` returns: the CPU's identity
    and features, torch's build (its MKL), and MKL's dispatch variables."""
    cpu = ""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
        keep = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags")
        cpu = "\n".join(line for line in first.splitlines()
                        if line.split(":", 1)[0].strip() in keep)
    except OSError:
        import platform
        cpu = platform.processor() or platform.machine()
    env = "\n".join(f"{k}={os.environ.get(k, '')}" for k in _MKL_ENV)
    raw = "\0".join([cpu, env, torch.__version__, torch.__config__.show()])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


_PIECE = 1 << 24
"""Inputs per call (~25 ms on one thread): the check stops within one when the process exits."""


def _differences(lib: ctypes.CDLL, ranges: tuple[tuple[int, int], ...], threads: int,
                 stop: threading.Event) -> int:
    total = 0
    for lo, hi in ranges:
        for start in range(lo, hi, _PIECE):
            if stop.is_set():
                raise RuntimeError("stopped: the process is exiting")
            bad = lib.optserve_sqrt_check(start, min(hi, start + _PIECE), threads)
            if bad < 0:
                raise RuntimeError("the library has no MKL sqrt")
            total += bad
    return total


def _prove(lib: ctypes.CDLL, proof: Path, threads: int, stop: threading.Event) -> int:
    """The full check, recorded in ``proof`` (best effort: proved all the same), by one
    process of the machine at a time (a server's workers, a test suite's servers all start
    at once); the others keep MKL's sqrt this time. Where no lock file can be made (a
    read-only cache), this process checks for itself."""
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(open(proof.with_name(f"{proof.name}.lock"), "a+b"))
        except OSError:
            lock = None
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RuntimeError(BUSY) from None
            if proof.exists():  # it finished while this process was starting
                return 0
        bad = _differences(lib, _FULL, threads, stop)
        if not bad:
            tmp = proof.with_name(f"{proof.name}.{os.getpid()}")
            try:
                tmp.write_text("every float32 input equal to MKL vsSqrt\n")
                os.replace(tmp, proof)
            except OSError as exc:
                log.info("native fast sqrt: could not record its proof (%s)", exc)
        return bad


def enable(lib: ctypes.CDLL, library: Path, stop: threading.Event, threads: int = 1) -> bool:
    """Check (fully the first time on this machine, briefly after) and switch on; whether
    the fast sqrt is on. Never raises: on any doubt MKL's sqrt stays."""
    global status
    try:
        if not lib.optserve_fast_sqrt(-1):
            status = "off: this build has no AVX2 fast path"
            return False
        status = "checking"
        proof = library.with_name(f"{library.stem}.sqrt-{fingerprint()}.ok")
        if not proof.exists():
            bad = _prove(lib, proof, threads, stop)
            if bad:
                status = f"off: differs from MKL's sqrt for {bad} inputs on this CPU"
                log.info("native fast sqrt not used: %s", status)
                return False
        bad = _differences(lib, _QUICK, threads, stop)
        if bad:
            status = f"off: differs from MKL's sqrt for {bad} of the re-checked inputs"
            return False
        lib.optserve_fast_sqrt(1)
        status = "on"
        return True
    except Exception as exc:  # a check that cannot run proves nothing: keep MKL
        status = f"off: {exc}"
        return False
    finally:
        _done.set()


def disable(lib: ctypes.CDLL) -> None:
    """Back to MKL's sqrt (tests compare the two)."""
    lib.optserve_fast_sqrt(0)


def wait(timeout: float | None = None) -> bool:
    """Wait for the check's outcome (benchmarks, tests): whether the fast sqrt is on."""
    _done.wait(timeout)
    return status == "on"
