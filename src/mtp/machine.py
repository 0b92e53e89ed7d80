"""The machine a result or a cache entry belongs to: the CPU's model name and instruction-set flags, read once.

Measured costs (verify curves, llama.cpp's costs, the faster dtype) and native builds are kept per CPU, because
the same home directory meets an AMX Xeon one day and an AMD EPYC without AVX-512 the next. No torch here.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, frozenset[str]]:
    """The first processor's model name and flags in /proc/cpuinfo (None and no flags where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    name, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
        if name is not None and flags is not None:
            break
    return name, flags or frozenset()


def cpu_name() -> str:
    """The CPU's model name (``AMD EPYC``, ``Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz``)."""
    return _cpuinfo()[0] or platform.processor() or platform.machine() or "unknown"


def cpu_has(*flags: str) -> bool:
    """Whether the CPU reports any of these instruction-set flags (``amx_bf16``, ``avx512_bf16``, ...)."""
    return any(f in _cpuinfo()[1] for f in flags)


def cpu_signature() -> str:
    """The CPU's model name and a hash of its flags: two machines with the same signature run the same code at
    the same speed per core (a native build made on an AMX Xeon dies of SIGILL on an AMD EPYC)."""
    flags = " ".join(sorted(_cpuinfo()[1]))
    return f"{cpu_name()} [{hashlib.sha256(flags.encode()).hexdigest()[:12]}]"


def in_own_thread(fn, name: str = "mtp-load"):
    """``fn()`` run to its end on a new thread that then exits; its result returned, its exception raised here.

    For a process whose compute will run on another long-lived thread (a server's decoding thread): torch and
    llama.cpp's CPU backend share one OpenMP runtime (libgomp), which keeps a thread pool for every thread that
    ever ran a parallel region, until that thread exits. Once two pools live, the process holds more OpenMP
    threads than CPUs and libgomp throttles its spin-waits, so each barrier (llama.cpp has one after every graph
    node) sleeps and wakes in the kernel. Loading and measuring on a thread that exits leaves the decoding
    thread's pool the only one: on a 2-core AMD EPYC a llama.cpp decode from a server's thread went from 58-73 to
    105-130 tokens/s (smollm2-135m Q4_1, plain greedy)."""
    import threading

    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("result")
