"""The native exact update: C++ (``native_src``), built in the background, checked, used.

Why: torch's CPU step runs each of its 5-9 elementwise ops as a separate pass with its own
dispatch cost; blocks of torch ops from Python (:mod:`optserve.optim.exact`) keep the data
in cache but still pay every op's fixed cost per block, which held them at ~1.9x torch.
The C++ runs the whole RMSprop or Adagrad update per element while an 8192-element
chunk is in cache, rounding op for op as the ATen kernels do and calling the very sqrt
ATen calls (MKL's ``vmsSqrt``/``vmdSqrt``, taken from torch's own library, or for float32
the same algorithm inline once proved equal here: :mod:`optserve.optim.native_sqrt`), over
``torch.get_num_threads()`` threads of torch's own OpenMP runtime.

How it stays exact and never in the way:

- The library is compiled by ``$CXX`` (default ``c++``) on a thread of its own, started by
  the first update that could use it; until it is ready, or where it cannot be built
  (no compiler, no MKL in torch, another CPU architecture), updates take the block path,
  which gives the same bits. Nothing ever waits for the compiler.
- The build is cached under the torch extensions directory (``$TORCH_EXTENSIONS_DIR``, else
  ``~/.cache/torch_extensions``), named by a hash of the source, compiler and flags, so a
  restart loads it in milliseconds.
- Before first use it is checked against torch's own ops (the block path's, which the
  conformance tests hold bitwise equal to ``torch.optim``): every structural option, both
  lerp branches, float32 and float64, sizes with vector tails; any difference in any bit
  and it is never used (logged as a warning).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import native_check, native_sqrt
from .base import flat_ok
from .native_src import SOURCE

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: 0, torch.float64: 1}
_PER_THREAD = 1 << 16
"""Elements per thread at least: below this a thread's start (~20 us) is not worth it."""

_MAXIMIZE, _WEIGHT_DECAY, _CENTERED, _MOMENTUM = 1, 2, 4, 8

_lock = threading.Lock()
_thread: threading.Thread | None = None
_ready = threading.Event()
_stopping = threading.Event()
_lib: ctypes.CDLL | None = None
enabled = True
"""False keeps every update on the block path (tests and benchmarks compare the two)."""
status = "not started"
"""``not started``, ``building``, ``ready`` or ``unavailable: <why>`` (diagnostics, tests)."""


def _flags(openmp: bool = True) -> list[str]:
    """Compiler flags; ``-ffp-contract=off`` so only the written ``fma`` calls fuse."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off",
             "-fno-math-errno"]
    if openmp:
        flags.insert(5, "-fopenmp")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build_dir() -> Path:
    """The torch extensions directory, as ``torch.utils.cpp_extension`` chooses it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "optserve_native"
    return Path.home() / ".cache" / "torch_extensions" / "optserve_native"


def _target(cxx: str, flags: list[str]) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.encode(), cxx.encode(), " ".join(flags).encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    return _build_dir() / f"optserve_native_{key}.so"


def build() -> Path:
    """The compiled library's path: from the cache, else compiled now (seconds). With
    OpenMP where the compiler has it; else without (a compiler with no OpenMP runtime, such
    as clang without libomp): the pragmas are then ignored and the kernel runs on the
    calling thread, the same bits, slower."""
    cxx = os.environ.get("CXX") or "c++"
    with_omp, without = _target(cxx, _flags(True)), _target(cxx, _flags(False))
    for out in (with_omp, without):
        if out.exists():
            return out
    compiler = shutil.which(cxx)
    if compiler is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} not found (set CXX)")
    try:
        return _compile(compiler, cxx, _flags(True), with_omp)
    except RuntimeError as exc:
        log.info("native kernel: no OpenMP build (%s); building without", exc)
        return _compile(compiler, cxx, _flags(False), without)


def _compile(compiler: str, cxx: str, flags: list[str], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cpp, so = Path(tmp) / "optserve_native.cpp", Path(tmp) / "optserve_native.so"
        cpp.write_bytes(SOURCE.encode())
        done = subprocess.run([compiler, *flags, str(cpp), "-o", str(so)], capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
        os.replace(so, out)  # atomic: a concurrent process loads a whole file or none
    return out


def _load(path: Path) -> ctypes.CDLL:
    """Load the library and hand it torch's MKL sqrt (the one ATen's CPU ``sqrt`` calls)."""
    torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    try:
        vms, vmd = torch_cpu.vmsSqrt, torch_cpu.vmdSqrt
    except AttributeError:
        raise RuntimeError("torch's library exports no MKL vmsSqrt/vmdSqrt") from None
    # MKL's own threads off in ours (see native_src); absent from a sequential MKL
    local = getattr(torch_cpu, "MKL_Set_Num_Threads_Local", None)
    lib = ctypes.CDLL(str(path))
    lib.optserve_set_sqrt(*(None if f is None else ctypes.cast(f, ctypes.c_void_p)
                            for f in (vms, vmd, local)))
    ptr, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    lib.optserve_rmsprop.argtypes = [cint, ptr, ptr, ptr, ptr, ptr, i64, dbl, dbl, dbl, dbl,
                                     dbl, dbl, cint, cint, i64, ptr]
    lib.optserve_adagrad.argtypes = [cint, ptr, ptr, ptr, i64, dbl, dbl, dbl, cint, cint, i64,
                                     ptr]
    lib.optserve_fast_sqrt.restype, lib.optserve_fast_sqrt.argtypes = cint, [cint]
    lib.optserve_sqrt_check.restype = i64
    lib.optserve_sqrt_check.argtypes = [ctypes.c_uint64, ctypes.c_uint64, cint]
    return lib


def _prepare() -> None:
    """Build, load and check; sets the module state. Runs on its own thread."""
    global _lib, status
    try:
        t0 = time.perf_counter()
        lib = _load(build())
        if _stopping.is_set():
            raise RuntimeError("the process is exiting")
        native_check.self_check(lib)
    except Exception as exc:  # any failure means: keep the block path
        status = f"unavailable: {exc}"
        log.warning("native exact kernel not used (%s); the block path gives the same bits",
                    exc)
    else:
        _lib = lib
        status = "ready"
        log.info("native exact kernel ready in %.1f s", time.perf_counter() - t0)
    finally:
        _ready.set()
    if _lib is not None and not _stopping.is_set():
        _prepare_sqrt(_lib)


def _prepare_sqrt(lib: ctypes.CDLL) -> None:
    """Its own sqrt once proved equal to MKL's here (``native_sqrt``), and the whole kernel
    checked again with it; runs after the kernel is in use, which changes no bit."""
    if native_sqrt.enable(lib, build(), _stopping):
        try:
            native_check.self_check(lib)
        except Exception as exc:
            native_sqrt.disable(lib)
            native_sqrt.status = f"off: {exc}"
            log.warning("native fast sqrt not used: %s", exc)


def _at_exit() -> None:
    """Let the build thread finish its current step before the interpreter goes: torch ops
    on a daemon thread that outlives it abort the process (the thread is unwound through
    torch's noexcept frames). Every step after the compiler's checks ``_stopping`` first."""
    _stopping.set()
    thread = _thread
    if thread is not None and thread.is_alive():
        thread.join(30)


atexit.register(_at_exit)


def start() -> None:
    """Start building in the background (once per process); returns at once."""
    global _thread, status
    with _lock:
        if _thread is None:
            status = "building"
            _thread = threading.Thread(target=_prepare, name="optserve-native", daemon=True)
            _thread.start()


def _after_fork_in_child() -> None:
    """A build thread does not survive fork: a child whose parent was still building
    starts afresh (and finds the parent's build in the cache if it got that far)."""
    global _lock, _thread, _ready, status
    _lock = threading.Lock()
    if _lib is None and _thread is not None and not _ready.is_set():
        _thread, _ready, status = None, threading.Event(), "not started"


os.register_at_fork(after_in_child=_after_fork_in_child)


def wait(timeout: float | None = None) -> bool:
    """Start if needed and wait for the outcome (tests, benchmarks): whether it is used."""
    start()
    _ready.wait(timeout)
    return _lib is not None


class Totals(ctypes.Structure):
    """What a step's callers need besides the update, summed by the kernel while each chunk
    is in cache (three passes over memory fewer): the gradient's and the update's
    (new - old) sums of squares, and the accumulator's sum (``square_avg`` or ``sum``; it
    is >= 0, so it is finite iff every element is). ``filled`` once the kernel ran."""

    _fields_ = [("grad_sq", ctypes.c_double), ("update_sq", ctypes.c_double),
                ("acc_sum", ctypes.c_double)]
    filled = False


_sink = threading.local()


@contextmanager
def collect(param: Tensor, grad: Tensor, state: dict[str, Tensor]) -> Iterator[Totals | None]:
    """``with native.collect(param, grad, state) as totals:`` around one ``update``: where the
    kernel will certainly take this tensor (ready, and ``param``, ``grad`` and the state
    already there are its kind), ``totals`` is a :class:`Totals` it fills; else None, and
    the caller measures for itself (before the update, as it must)."""
    tensors = [t for t in state.values() if t.dim() > 0]
    certain = bool(state) and _usable(param, grad, *tensors) is not None
    _sink.totals = Totals() if certain else None
    try:
        yield _sink.totals
    finally:
        _sink.totals = None


def _totals_ptr() -> Any:
    totals = getattr(_sink, "totals", None)
    return None if totals is None else ctypes.byref(totals)


def _done(rc: int) -> bool:
    totals = getattr(_sink, "totals", None)
    if rc == 0 and totals is not None:
        totals.filled = True
    return rc == 0


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _usable(param: Tensor, grad: Tensor, *state: Tensor | None) -> ctypes.CDLL | None:
    """The library, where it may run this tensor; starts the build on first call."""
    if not enabled:
        return None
    if _lib is None:
        if _thread is None:
            start()
        return None
    if (param.device.type != "cpu" or param.dtype not in _DTYPES or param.numel() == 0
            or grad.dtype != param.dtype or grad.device.type != "cpu"
            or not flat_ok(param, *state)):
        return None
    size = param.element_size()  # C++ may assume aligned elements (torch.frombuffer need not)
    if any(t is not None and t.data_ptr() % size for t in (param, grad, *state)):
        return None
    return _lib


def rmsprop(param: Tensor, grad: Tensor, square_avg: Tensor, grad_avg: Tensor | None,
            buf: Tensor | None, lr: float, alpha: float, eps: float, weight_decay: float,
            momentum: float, maximize: bool) -> bool:
    """``_single_tensor_rmsprop``'s loop body after ``step += 1``, in place; False (nothing
    changed) where the native kernel is not ready or does not apply."""
    lib = _usable(param, grad, square_avg, grad_avg, buf)
    return lib is not None and _rmsprop(lib, param, grad, square_avg, grad_avg, buf, lr,
                                        alpha, eps, weight_decay, momentum, maximize)


def _rmsprop(lib: ctypes.CDLL, param: Tensor, grad: Tensor, square_avg: Tensor,
             grad_avg: Tensor | None, buf: Tensor | None, lr: float, alpha: float, eps: float,
             weight_decay: float, momentum: float, maximize: bool) -> bool:
    g = grad.contiguous()
    flags = ((_MAXIMIZE if maximize else 0) | (_WEIGHT_DECAY if weight_decay != 0 else 0)
             | (_CENTERED if grad_avg is not None else 0) | (_MOMENTUM if buf is not None else 0))
    rc = lib.optserve_rmsprop(_DTYPES[param.dtype], _ptr(param), _ptr(g), _ptr(square_avg),
                              _ptr(grad_avg), _ptr(buf), param.numel(), -lr, alpha, 1 - alpha,
                              eps, weight_decay, momentum, flags, torch.get_num_threads(),
                              _PER_THREAD, _totals_ptr())
    return _done(rc)


def adagrad(param: Tensor, grad: Tensor, state_sum: Tensor, clr: float, eps: float,
            weight_decay: float, maximize: bool) -> bool:
    """``_single_tensor_adagrad``'s dense body after ``clr``, in place; False as above."""
    lib = _usable(param, grad, state_sum)
    return lib is not None and _adagrad(lib, param, grad, state_sum, clr, eps, weight_decay,
                                        maximize)


def _adagrad(lib: ctypes.CDLL, param: Tensor, grad: Tensor, state_sum: Tensor, clr: float,
             eps: float, weight_decay: float, maximize: bool) -> bool:
    g = grad.contiguous()
    flags = (_MAXIMIZE if maximize else 0) | (_WEIGHT_DECAY if weight_decay != 0 else 0)
    rc = lib.optserve_adagrad(_DTYPES[param.dtype], _ptr(param), _ptr(g), _ptr(state_sum),
                              param.numel(), -clr, eps, weight_decay, flags,
                              torch.get_num_threads(), _PER_THREAD, _totals_ptr())
    return _done(rc)


def prebuild() -> int:
    """Build and check now, print the outcome; 0 if usable. For an image's build step:
    ``python -c "from optserve.optim import native; raise SystemExit(native.prebuild())"``."""
    ok = wait(600)
    if ok:  # its sqrt proved here too: a process on the same CPU then skips the full check
        native_sqrt.wait(600)
    print(f"optserve native exact kernel: {status}" + (f" ({build()})" if ok else "")
          + f"; own float32 sqrt: {native_sqrt.status}")
    return 0 if ok else 1
