"""formats/sigbus.py: the table of mapped regions the SIGBUS handler reads (issue 25; the handler itself is
tested in tests/cli/test_bad_input.py, in a process it may end)."""
import gc

import numpy as np
import pytest

from refimpl.formats import sigbus
from refimpl.formats.checkpoint import TensorSource, write_safetensors


def _live(path) -> list[int]:
    """Slots whose prepared line names path."""
    needle = str(path).encode()
    return [k for k in range(sigbus.CAPACITY) if sigbus._REGIONS[k, 1] and needle in sigbus._LINES[k].tobytes()]


def test_a_mapped_file_is_registered_while_its_map_lives(tmp_path):
    f = tmp_path / "a.safetensors"
    write_safetensors(f, {"x": ("F32", (1000,))}, lambda n: np.ones(1000, np.float32))
    src = TensorSource(f)
    view = src.get("x")
    [slot] = _live(f)
    start, end, n = sigbus._REGIONS[slot]
    assert start <= view.ctypes.data and view.ctypes.data + view.nbytes <= end
    assert sigbus._LINES[slot, :n].tobytes().decode() == (
        f"error: {f}: changed while in use (truncated while refimpl read it through a memory map)\n")
    del src, view
    gc.collect()
    assert _live(f) == []                                      # freed: the slot may be reused


@pytest.mark.skipif(not sigbus.SUPPORTED, reason="Linux on x86-64 or aarch64")
def test_install_and_restore_leave_the_old_handler():
    import ctypes
    import signal
    libc = ctypes.CDLL(None)

    def current():
        act = sigbus._Sigaction()
        assert libc.sigaction(signal.SIGBUS, None, ctypes.byref(act)) == 0
        return act.handler
    before = current()
    restore = sigbus.install()
    assert current() == sigbus._handler.address
    assert sigbus.install()() is None and current() == sigbus._handler.address   # nested: a no-op
    restore()
    assert current() == before
