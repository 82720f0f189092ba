"""Files in and out: every file refimpl writes goes through `atomic_file`, every small file it reads
through `read_bytes`.

Writing (`atomic_file`, `write_bytes`, `write_text`):
- the output must be a regular file or a missing path. Refused, with one line naming the path
  and nothing touched: '', a folder, a FIFO, a device (`/dev/null`), a socket, a symbolic link
  (the rename would replace the link, not what it points to), a missing or non-folder parent;
- the bytes go to `NAME.tmp-XXXXXXXX` in the same folder (so the rename cannot cross file
  systems), are flushed to disk, and the temporary is renamed onto NAME only when complete;
- on any failure, Ctrl-C or SIGTERM included, the temporary is removed; an OSError (read-only
  place, full disk, name too long) becomes a `FileError` naming the path.
A folder output (a checkpoint) follows the same scheme: `check_output_path` for the checks,
`replace_folder` for the final rename; `synthetic/writer.py` says which folders it may replace.

Reading (`read_bytes`, `read_text`, `read_json`): at most `limit` bytes are ever read, so a
wrong file (a 2.6 GB shard given as a config, /dev/zero as a chat) fails at once with bounded
memory; a folder, a missing file, text that is not UTF-8, JSON nested more than MAX_JSON_DEPTH
levels, and JSON that `parse_json` refuses (a key given twice in one object, NaN, Infinity, a
number beyond a float) are each one line naming the file. The limits of each input are named
beside the code that reads it (docs/usage.md, "Files").
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

MAX_JSON_DEPTH = 100        # nesting levels: a chat tool schema needs a few; 100k levels blew the stack


class FileError(ValueError):
    """A path that cannot be read or written as asked; the message names it (one line)."""


def os_error(path, err: OSError, doing: str, error: type[ValueError] = FileError) -> ValueError:
    """One line for an OSError: `path: cannot write (No space left on device)`."""
    return error(f"{path}: cannot {doing} ({err.strerror or err})")


def size_text(n: int) -> str:
    """Bytes as a short human-readable size: 8 MiB, 1.5 KiB, 12 bytes."""
    for unit, k in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.3g} {unit}"
    return f"{n} bytes"


# ---------------------------------------------------------------- signals

@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver them.

    For the few steps that must not be cut in two (a rename and its bookkeeping, the removal of
    a temporary): an interrupt arriving inside takes effect right after. Outside the main
    thread signals cannot arrive there anyway, and the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):      # each signal once, in arrival order
            handler = old[s]
            if callable(handler):
                handler(s, None)              # Python's SIGINT handler raises KeyboardInterrupt here
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


# ---------------------------------------------------------------- writing

def check_output_path(path, *, folder: bool = False, error: type[ValueError] = FileError) -> tuple[Path, bool]:
    """Refuse an output path that is not a regular file (a folder, where folder=True) or missing.

    -> (path, exists). Symbolic links are refused (a rename replaces the link itself); so are ''
    and a path whose parent folder is missing or is not a folder.
    """
    want = "folder" if folder else "file"
    if str(path) == "":
        raise error(f"the output path is empty: give a {want} name")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise error(f"{path}: give the {want}'s own name (not '.' or '..')")
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        parent = path.parent
        if not parent.is_dir():
            what = "does not exist" if not os.path.lexists(parent) else "is not a folder"
            raise error(f"{path}: cannot write: its parent folder {str(parent)!r} {what}") from None
        return path, False
    except OSError as e:
        raise os_error(path, e, "write", error) from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise error(f"{path}: is a symbolic link; give the {want} it points to (refimpl does not write through links)")
    if folder and not stat.S_ISDIR(mode):
        raise error(f"{path}: exists and is not a folder ({_kind(mode)})")
    if not folder and not stat.S_ISREG(mode):
        raise error(f"{path}: exists and is not a regular file ({_kind(mode)}); give a file name")
    return path, True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def temporary_name(path: Path) -> Path:
    """NAME.tmp-XXXXXXXX beside path (8 random hex digits; NAME shortened so the name stays within 255 bytes)."""
    name = path.name
    while len(name.encode("utf-8", "surrogateescape")) > 255 - len(".tmp-xxxxxxxx"):
        name = name[:-1]
    return path.with_name(f"{name}.tmp-{secrets.token_hex(4)}")


def _open_temporary(tmp: Path) -> BinaryIO:
    """A new file at tmp (never an existing one), permissions as the umask says."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path) -> Iterator[BinaryIO]:
    """Write a file in one piece: yields a binary file at a temporary name, renamed onto path on success.

    path must be a regular file or missing (checked before and again just before the rename).
    On any exception (KeyboardInterrupt too) the temporary is removed and nothing is renamed;
    an OSError becomes a FileError naming path.
    """
    path, _ = check_output_path(path)
    tmp = temporary_name(path)
    created = False                          # whether tmp is ours to remove
    try:
        with interrupts_deferred():          # an interrupt lands before the open or after `created`
            f = _open_temporary(tmp)
            created = True
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_output_path(path)              # still a regular file or missing
        with interrupts_deferred():
            os.replace(tmp, path)
            created = False
    except BaseException as e:
        if created:
            with interrupts_deferred():
                tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_error(path, e, "write") from None
        raise


def write_bytes(path, data: bytes) -> None:
    """Write data to path atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def write_text(path, text: str) -> None:
    """Write text to path as UTF-8, atomically (atomic_file)."""
    write_bytes(path, text.encode("utf-8"))


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the complete folder tmp onto out (missing, empty, or a folder the caller may replace).

    A non-empty out is first renamed to `out.old-XXXXXXXX`, then removed once tmp is in place;
    if tmp cannot be put in place, out is put back. Interrupts wait until this is done.
    """
    with interrupts_deferred():
        try:
            os.rename(tmp, out)              # out missing, or an empty folder: one rename
            return
        except OSError as e:
            if not out.is_dir() or not any(out.iterdir()):
                raise os_error(out, e, "write") from None
        old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
        try:
            os.rename(out, old)
        except OSError as e:
            raise os_error(out, e, "replace") from None
        try:
            os.rename(tmp, out)
        except OSError as e:
            os.rename(old, out)
            raise os_error(out, e, "write") from None
        try:
            shutil.rmtree(old)
        except OSError as e:
            raise FileError(f"{out}: written, but the old copy {old} could not be removed "
                            f"({e.strerror or e}); remove it by hand") from None


def remove_folder(tmp: Path) -> None:
    """Remove a temporary folder, Ctrl-C deferred (a failed write leaves nothing behind)."""
    with interrupts_deferred():
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- reading

def read_bytes(path, *, limit: int, what: str, regular: bool = False,
               error: type[ValueError] = FileError) -> bytes:
    """The bytes of a file, reading at most limit + 1 of them; too large, a folder, missing: one line.

    regular=True refuses anything but a regular file (a FIFO would block, a device never end);
    otherwise a pipe (`<(cat x)`) or a device is read up to the limit. what: "a chat JSON file".
    """
    if str(path) == "":
        raise error(f"the path of {what} is empty")
    path = Path(path)
    try:
        if regular:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise error(f"{path}: is {_kind(st.st_mode)}, not {what}")
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise error(f"{path}: is a folder, not {what}")
            if stat.S_ISREG(st.st_mode) and st.st_size > limit:
                raise error(f"{path}: {size_text(st.st_size)}, more than the {size_text(limit)} "
                            f"allowed for {what}")
            chunks, n = [], 0                 # in pieces: read(limit + 1) would allocate limit bytes at once
            while n <= limit and (b := f.read(min(1 << 20, limit + 1 - n))):
                chunks.append(b)
                n += len(b)
    except FileNotFoundError:
        raise error(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not {what}") from None
    except OSError as e:
        raise os_error(path, e, "read", error) from None
    if n > limit:
        raise error(f"{path}: more than the {size_text(limit)} allowed for {what}")
    return b"".join(chunks)


def read_text(path, *, limit: int, what: str, regular: bool = False, bom: bool = False,
              error: type[ValueError] = FileError) -> str:
    """read_bytes decoded as UTF-8 (bom=True drops a leading byte-order mark); bad bytes name the file."""
    data = read_bytes(path, limit=limit, what=what, regular=regular, error=error)
    try:
        return data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


class StrictJSONError(ValueError):
    """JSON that Python's `json` reads but other readers refuse or read differently: a key given twice
    in one object, NaN / Infinity, a number too large for a float."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object_pairs_hook refusing a key given twice (`json` keeps the last one, other readers the first)."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen = set()
        k = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise StrictJSONError(f"duplicate key {k[:100]!r} in a JSON object")
    return out


def _no_constant(name: str):
    raise StrictJSONError(f"{name} is not a JSON number (JSON numbers are finite)")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise StrictJSONError(f"number {text[:40]} is too large for a float (it would read as infinity)")
    return v


def _integer(text: str) -> int:
    v = int(text)
    if abs(v) >= 1 << 1024:                     # beyond every float: serde refuses it too
        raise StrictJSONError(f"number {text[:40]}... ({len(text)} digits) is too large")
    return v


def parse_json(text: str) -> Any:
    """json.loads refusing what the JSON standard and stricter readers (serde, the safetensors library)
    refuse: a key given twice in one object, NaN / Infinity, a number beyond the range of a float.

    Raises StrictJSONError for those, json.JSONDecodeError for malformed text, RecursionError
    when nested too deeply for the parser.
    """
    return json.loads(text, object_pairs_hook=unique_keys, parse_constant=_no_constant, parse_float=_finite,
                      parse_int=_integer)


def read_json(path, *, limit: int, what: str, regular: bool = False,
              error: type[ValueError] = FileError) -> Any:
    """read_text parsed by parse_json, nested at most MAX_JSON_DEPTH levels; every failure one line naming the file."""
    text = read_text(path, limit=limit, what=what, regular=regular, bom=True, error=error)
    try:
        value = parse_json(text)
    except RecursionError:
        value = None
        depth = MAX_JSON_DEPTH + 1
    except StrictJSONError as e:
        raise error(f"{path}: {e}") from None
    except ValueError as e:                   # json.JSONDecodeError
        raise error(f"{path}: not valid JSON ({str(e)[:200]})") from None
    else:
        depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{path}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] and {} are 1), without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            d += 1
            depth = max(depth, d)
            if depth > MAX_JSON_DEPTH:
                return depth
            stack.extend((x, d) for x in (v.values() if isinstance(v, dict) else v))
    return depth
