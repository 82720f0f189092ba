"""A checkpoint file changed while it is mapped: one line naming it, not a bus error.

The weights are memory-mapped (`checkpoint.SafetensorsFile`). If a mapped file is truncated while
refimpl runs, the next read of a page past its new end raises SIGBUS in whichever thread touches it,
inside NumPy's or a Numba kernel's machine code. A Python signal handler cannot help: Python runs
it between bytecodes, never inside that code, so the faulting instruction repeats for ever (a hang).

So the handler is machine code: a Numba `cfunc` that needs neither the GIL nor Python. It finds the
faulting address (siginfo's si_addr) in a table of mapped regions, writes that region's prepared
line to stderr with write(2) and ends the process with _exit(1); both are async-signal-safe. A fault
outside every mapping puts the handler that was there before back and returns, so the fault
repeats under it (the default: the process dies of SIGBUS, exit 135).

`register(array, path)` records a mapping (checkpoint.py does, for every file it maps), and forgets
it when the array is freed; `install()` puts the handler in place (the CLI does, for the commands
that run the model) and returns a function that puts the old one back.

What is covered: SIGBUS from reading a registered mapping, in any thread, Linux on x86-64 or
aarch64 (the layout of `struct sigaction` and of siginfo_t is fixed there). Not covered: other
platforms (install() does nothing); a file changed in place without changing its size (the mapping
then reads the new bytes: no fault to catch); the other outputs of a dying process (generate's
tokens already printed stay printed; an output file is only renamed into place once complete).
"""
from __future__ import annotations

import ctypes
import platform
import signal
import sys
import weakref
from pathlib import Path
from typing import Callable

import numpy as np

CAPACITY = 1024                 # mappings recorded at once (Flash has 46 shards)
LINE_BYTES = 1024               # the prepared line of each (a longer path is cut)
SUPPORTED = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64")

# Live tables the handler reads through their addresses: [start, end, line length] per slot (end 0:
# free) and the lines; _OLD below, the handler that was in place before install().
_REGIONS = np.zeros((CAPACITY, 3), np.int64)
_LINES = np.zeros((CAPACITY, LINE_BYTES), np.uint8)


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86-64 and aarch64: handler, 1024-bit mask, flags, restorer."""
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16), ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p)]


SA_SIGINFO = 4
_OLD = _Sigaction()
_handler = None                 # the compiled cfunc: made once per process (it holds these tables' addresses)


def register(array: np.ndarray, path: Path) -> None:
    """Record the memory of array (a map of path): a fault there ends the process with one line naming path."""
    free = np.flatnonzero(_REGIONS[:, 1] == 0)
    if not free.size or not array.nbytes:
        return                                   # table full: such a fault stays a plain SIGBUS
    slot = int(free[0])
    line = (f"error: {path}: changed while in use (truncated while refimpl read it through a memory map)\n"
            .encode("utf-8", "replace"))
    if len(line) > LINE_BYTES:
        line = line[:LINE_BYTES - 5] + b" ...\n"
    _LINES[slot, :len(line)] = np.frombuffer(line, np.uint8)
    start = array.ctypes.data
    _REGIONS[slot, 0], _REGIONS[slot, 2] = start, len(line)
    _REGIONS[slot, 1] = start + array.nbytes      # last: the slot is live from here on
    weakref.finalize(array, _forget, slot, start)


def _forget(slot: int, start: int) -> None:
    if _REGIONS[slot, 0] == start:
        _REGIONS[slot, 1] = 0


def install() -> Callable[[], None]:
    """Put the SIGBUS handler in place; -> a function putting the previous one back (a no-op where unsupported)."""
    if not SUPPORTED:
        return lambda: None
    global _handler
    if _handler is None:
        try:
            _handler = _compile()
        except Exception:                        # Numba cannot build it here: a fault stays a plain SIGBUS
            return lambda: None
    libc = ctypes.CDLL(None, use_errno=True)
    now = _Sigaction()
    if libc.sigaction(signal.SIGBUS, None, ctypes.byref(now)) != 0 or now.handler == _handler.address:
        return lambda: None                      # already in place: the outer install() puts the old one back
    ctypes.memmove(ctypes.byref(_OLD), ctypes.byref(now), ctypes.sizeof(now))
    act = _Sigaction(handler=_handler.address, flags=SA_SIGINFO)
    if libc.sigaction(signal.SIGBUS, ctypes.byref(act), None) != 0:
        return lambda: None
    return lambda: libc.sigaction(signal.SIGBUS, ctypes.byref(now), None)


def _compile():
    """The handler: void(int sig, siginfo_t *info, void *context), as machine code over the live tables."""
    import numba
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def pointer(typingctx, address):             # an address (int64) as a pointer the handler can read
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
        return types.CPointer(types.int64)(types.int64), codegen

    libc = ctypes.CDLL(None, use_errno=True)
    write, exit_, sigaction = libc.write, libc._exit, libc.sigaction
    write.argtypes, write.restype = (ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t), ctypes.c_ssize_t
    exit_.argtypes, exit_.restype = (ctypes.c_int,), None
    sigaction.argtypes, sigaction.restype = (ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t), ctypes.c_int
    regions, lines, old = _REGIONS.ctypes.data, _LINES.ctypes.data, ctypes.addressof(_OLD)
    n, sigbus = CAPACITY, int(signal.SIGBUS)

    @numba.cfunc(types.void(types.int32, types.CPointer(types.int64), types.voidptr))
    def handler(sig, info, context):
        address = numba.carray(info, (3,))[2]    # si_addr: after si_signo, si_errno, si_code (+ padding)
        table = numba.carray(pointer(regions), (n, 3))
        for k in range(n):
            if table[k, 0] <= address < table[k, 1]:
                write(2, lines + k * LINE_BYTES, table[k, 2])
                exit_(1)
        sigaction(sigbus, old, 0)                # not ours: the fault repeats under the old handler

    return handler
