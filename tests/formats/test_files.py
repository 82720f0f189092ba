"""formats/files.py: the one writer (atomic, refuses what is not a regular file, leaves nothing behind)
and the bounded readers, and every writer of the package going through it."""
import errno
import json
import os
import re
import signal
import stat
import time
import tracemalloc

import numpy as np
import pytest

from refimpl.formats import files
from refimpl.formats.checkpoint import CheckpointError, write_json, write_safetensors
from refimpl.formats.files import (MAX_JSON_DEPTH, FileError, atomic_file, interrupts_deferred, read_bytes,
                                   read_json, read_text, replace_folder, write_bytes)


def leftovers(folder):
    """Temporaries and old copies anywhere under folder."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- what may be written

def test_writes_atomically_with_the_umask(tmp_path):
    out = tmp_path / "a.bin"
    write_bytes(out, b"one")
    write_bytes(out, b"two")                                    # an existing regular file is replaced
    assert out.read_bytes() == b"two" and leftovers(tmp_path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.fixture
def targets(tmp_path, char_device):
    """Outputs that are not a regular file or a missing path, with a check that each is untouched."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "real").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "afile").write_bytes(b"x")
    return {
        "": "the output path is empty",
        str(tmp_path / "folder"): r"exists and is not a regular file \(a folder\)",
        str(tmp_path / "fifo"): r"exists and is not a regular file \(a FIFO\)",
        char_device: r"exists and is not a regular file \(a character device\)",
        str(tmp_path / "link"): "is a symbolic link",
        str(tmp_path / "nope" / "x.bin"): "its parent folder .* does not exist",
        str(tmp_path / "afile" / "x.bin"): "its parent folder .* is not a folder",
        str(tmp_path / ".."): r"give the file's own name \(not '.' or '..'\)",
    }


def untouched(tmp_path, device):
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    assert os.path.islink(tmp_path / "link") and (tmp_path / "real").read_bytes() == b"keep"
    assert list((tmp_path / "folder").iterdir()) == [] and not (tmp_path / "nope").exists()
    assert leftovers(tmp_path) == []


def test_refuses_every_output_that_is_not_a_regular_file(tmp_path, targets, char_device):
    for path, words in targets.items():
        with pytest.raises(FileError, match=words) as e:
            write_bytes(path, b"data")
        assert "\n" not in str(e.value) and (path == "" or str(e.value).startswith(path))
    untouched(tmp_path, char_device)


# every writer of the package: trace files, safetensors shards, JSON, tokenizer files
def _trace(path):
    from refimpl.oracle.trace import Trace
    t = Trace()
    t.tensors = {"logits": np.zeros((2, 3), np.float32)}
    t.save(path, metadata={"refimpl": "test"})


WRITERS = {
    "write_safetensors": lambda p: write_safetensors(p, {"a": ("F32", (2,))}, lambda n: np.ones(2, np.float32)),
    "write_json": lambda p: write_json(p, {"a": 1}),
    "Trace.save": _trace,
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_refuses_a_fifo_a_device_and_a_folder(tmp_path, targets, char_device, writer):
    for path in (tmp_path / "fifo", char_device, tmp_path / "folder"):
        with pytest.raises(ValueError, match="exists and is not a regular file"):
            WRITERS[writer](path)
    untouched(tmp_path, char_device)


def test_tokenizer_files_are_not_written_through_a_link(tmp_path):
    from refimpl.synthetic.tokenizer import build_tiny_tokenizer, write_tokenizer_files
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").symlink_to(tmp_path / "target")
    with pytest.raises(FileError, match="tokenizer.json: is a symbolic link"):
        write_tokenizer_files(tmp_path / "tok", build_tiny_tokenizer(1280))
    assert not (tmp_path / "target").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- failures leave nothing behind

class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes, as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, writer):
    real = files._open_temporary
    monkeypatch.setattr(files, "_open_temporary", lambda tmp: _FullDisk(real(tmp), room=10))
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))}: cannot write \(No space left on device\)$"):
        WRITERS[writer](out)
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.ENAMETOOLONG])
def test_a_place_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, err):
    def refuse(tmp):
        raise OSError(err, os.strerror(err), str(tmp))
    monkeypatch.setattr(files, "_open_temporary", refuse)
    with pytest.raises(FileError, match=rf"^{re.escape(str(tmp_path / 'x'))}: cannot write \({os.strerror(err)}\)$"):
        write_bytes(tmp_path / "x", b"data")


def test_a_failed_flush_to_disk_removes_the_temporary(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(FileError, match="cannot write .Input/output error."):
        write_bytes(tmp_path / "x", b"data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, CheckpointError])
def test_an_exception_while_writing_removes_the_temporary(tmp_path, exc):
    out = tmp_path / "out"
    out.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_file(out) as f:
            f.write(b"half")
            assert len(leftovers(tmp_path)) == 1                 # NAME.tmp-XXXXXXXX beside it
            raise exc("stop")
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_the_target_is_checked_again_before_the_rename(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileError, match="a FIFO"):
        with atomic_file(out) as f:
            f.write(b"data")
            os.mkfifo(out)                                       # made while we were writing
    assert stat.S_ISFIFO(os.lstat(out).st_mode) and leftovers(tmp_path) == []


def test_interrupts_wait_for_the_end_of_a_deferred_block():
    # Python's own Ctrl-C handler, as in a terminal (a suite started in the background by a shell without job
    # control runs with SIGINT ignored, and then an interrupt rightly does nothing: the test below)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                done.append("rest of the block")
        assert done == ["rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)


def test_an_ignored_interrupt_stays_ignored_after_a_deferred_block():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        done = []
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the block")
        assert done == ["rest of the block"]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_replace_folder_swaps_and_puts_the_old_back_on_failure(tmp_path, monkeypatch):
    out, new = tmp_path / "out", tmp_path / "out.tmp-1"
    out.mkdir()
    (out / "old").write_text("o")
    new.mkdir()
    (new / "new").write_text("n")
    real = os.rename

    def rename(a, b):
        if str(a) == str(new):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(a, b)
    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(FileError, match="cannot write"):
        replace_folder(new, out)
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["old"] and not leftovers(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-1"]
    replace_folder(new, out)
    assert [p.name for p in out.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- bounded reads

def test_reads_stop_at_the_limit(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(3 << 30)                                      # 3 GiB, sparse: refused by its size
    t0 = time.perf_counter()
    tracemalloc.start()
    with pytest.raises(FileError, match=r"big: 3 GiB, more than the 1 MiB allowed for a config"):
        read_bytes(big, limit=1 << 20, what="a config")
    with pytest.raises(FileError, match=r"/dev/zero: more than the 1 MiB allowed"):   # no size: read to the limit
        read_bytes("/dev/zero", limit=1 << 20, what="a config")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20 and time.perf_counter() - t0 < 1.0


def test_read_errors_name_the_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "bad").write_bytes(b"ok \xff")
    cases = {tmp_path: "is a folder, not a chat", tmp_path / "missing": "no such file",
             tmp_path / "bad": r"not UTF-8 text \(byte 0xff at offset 3\)"}
    for path, words in cases.items():
        with pytest.raises(FileError, match=f"^{re.escape(str(path))}: {words}"):
            read_text(path, limit=100, what="a chat")
    with pytest.raises(FileError, match="is a FIFO, not a config"):   # regular=True: never blocks on a FIFO
        read_bytes(tmp_path / "fifo", limit=100, what="a config", regular=True)
    with pytest.raises(FileError, match="empty"):
        read_bytes("", limit=100, what="a config")


def test_json_depth_is_bounded(tmp_path):
    f = tmp_path / "j.json"
    for depth, ok in ((MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False), (100_000, False)):
        f.write_text("[" * depth + "]" * depth)
        if ok:
            assert files.json_depth(read_json(f, limit=1 << 20, what="JSON")) == depth
        else:
            with pytest.raises(FileError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
                read_json(f, limit=1 << 20, what="JSON")
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": [1]}).encode())   # a byte-order mark is dropped
    assert read_json(f, limit=100, what="JSON") == {"a": [1]}
