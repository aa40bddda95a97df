"""Host memory reuse: keep the tensors a training step frees in glibc's heap for the next step.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB by its dynamic rule) with a
fresh ``mmap`` and returns it to the kernel at ``free``. A CPU training step allocates many such blocks
each time (a (256, 49,152) float32 logits chunk is 48 MiB; ZeRO's flat gradient buffers and the tied
embedding's dense gradient are 100-250 MiB for SmolLM2-135M), so every step pays the page faults of
touching them again: about 25 ms per 48 MiB and 90 ms per 200 MiB on the 2-core machine of
benchmarks/RESULTS.md. Raising the mmap threshold and the trim threshold (``mallopt(3)``,
``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD``) keeps those blocks in the heap, where the next step finds
them already mapped. PyTorch's CPU performance tuning guide recommends jemalloc or tcmalloc
(``LD_PRELOAD``) against the same cost; this is glibc's own setting, made from inside the process, so it
needs no library on the machine. Values are unchanged.

The cost: the process keeps its peak heap instead of returning it between steps (freed memory up to
2 GiB at the top of the heap is kept; blocks of 1 GiB or more are still mapped one by one), and the
fragments small allocations leave in it: the KD step of benchmarks/vs_trl.py peaked at 3.63 GiB RSS
against 3.13 without, and ran in 7.23 s against 8.12 s (benchmarks/RESULTS.md, 2026-11-27).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from ..errors import UsageError

__all__ = ["HOST_MEMORY_REUSE", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "allocator_in_environment", "check_host_memory_reuse", "glibc",
           "resolve_host_memory_reuse", "reuse_freed_host_memory", "apply_host_memory_reuse"]

HOST_MEMORY_REUSE = {"auto": None, "true": True, "false": False}  # --host_memory_reuse -> forced on / off, None: decided
MMAP_THRESHOLD = 2**30  # bytes: blocks below it come from the heap (glibc's default rule caps it at 32 MiB)
TRIM_THRESHOLD = 2**31 - 1  # bytes: free memory at the heap's top kept up to this (mallopt takes an int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (Linux), else None (musl, macOS, Windows: no ``mallopt``)."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def allocator_in_environment(env: dict[str, str] | None = None) -> str | None:
    """The allocator setting the user already made in ``env`` (default ``os.environ``), which fcd_ds then
    leaves alone, or None: an ``LD_PRELOAD`` of jemalloc / tcmalloc / mimalloc, a ``glibc.malloc`` tunable
    in ``GLIBC_TUNABLES``, or one of glibc's ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` /
    ``MALLOC_TOP_PAD_`` / ``MALLOC_MMAP_MAX_`` variables. Returns ``"NAME=value"`` of the first found."""
    env = os.environ if env is None else env
    preload = env.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']}"
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        if name in env:
            return f"{name}={env[name]}"
    return None


def check_host_memory_reuse(setting: str) -> None:
    """Refuse a ``--host_memory_reuse`` value that is not a key of :data:`HOST_MEMORY_REUSE`, and ``true``
    where the C library is not glibc.

    Raises:
        UsageError: naming the flag and the values it takes.
    """
    if setting not in HOST_MEMORY_REUSE:
        raise UsageError(f"--host_memory_reuse: must be one of {tuple(HOST_MEMORY_REUSE)}, got {setting!r}")
    if HOST_MEMORY_REUSE[setting] and glibc() is None:
        raise UsageError("--host_memory_reuse true: needs glibc's mallopt (Linux with glibc), which this process lacks; pass auto or false")


def resolve_host_memory_reuse(setting: str, device_type: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether to reuse freed host memory, and why, for ``--host_memory_reuse`` = ``setting``.

    ``auto`` turns it on when the model trains on the CPU (``device_type`` ``"cpu"``: the step's
    tensors are host memory), the C library is glibc and the environment names no allocator setting of
    its own (:func:`allocator_in_environment`); ``true`` / ``false`` decide alone.

    Raises:
        UsageError: ``setting`` is not a key of :data:`HOST_MEMORY_REUSE`, or is ``true`` without glibc
            (``TrainArguments`` runs this check at parse time).
    """
    check_host_memory_reuse(setting)
    forced = HOST_MEMORY_REUSE[setting]
    if forced is False:
        return False, "off (--host_memory_reuse false)"
    if glibc() is None:
        return False, "off (auto: no glibc in this process)"
    if forced is None:
        if device_type != "cpu":
            return False, f"off (auto: the model trains on {device_type}, not on host memory)"
        user = allocator_in_environment(env)
        if user is not None:
            return False, f"off (auto: the environment sets the allocator, {user})"
    return True, f"on (glibc keeps freed blocks below {MMAP_THRESHOLD >> 30} GiB in its heap, no trim below {TRIM_THRESHOLD >> 20} MiB)"


def reuse_freed_host_memory() -> None:
    """Set glibc's mmap threshold to :data:`MMAP_THRESHOLD` and its trim threshold to :data:`TRIM_THRESHOLD`
    for this process (``mallopt``; per process, so each rank calls it). Allocations made before keep their
    kind; later frees of heap blocks stay in the heap for reuse.

    Raises:
        OSError: no glibc in this process, or glibc refused a value.
    """
    libc = glibc()
    if libc is None:
        raise OSError("reuse_freed_host_memory needs glibc's mallopt (Linux with glibc)")
    for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc's mallopt refused option {option} = {value}")


def apply_host_memory_reuse(setting: str, device_type: str, env: dict[str, str] | None = None) -> str:
    """Decide (:func:`resolve_host_memory_reuse`) and, when on, call :func:`reuse_freed_host_memory`; returns
    the start-up log's words, ``"on (...)"`` or ``"off (...)"``. A glibc that refuses the values (older
    releases capped the mmap threshold at 32 MiB) leaves ``auto`` off and says so.

    Raises:
        UsageError: a bad ``setting``, or ``true`` where glibc is missing or refuses the values.
    """
    on, why = resolve_host_memory_reuse(setting, device_type, env)
    if not on:
        return why
    try:
        reuse_freed_host_memory()
    except OSError as exc:
        if HOST_MEMORY_REUSE[setting]:
            raise UsageError(f"--host_memory_reuse true: {exc}; pass auto or false") from None
        return f"off (auto: {exc})"
    return why
