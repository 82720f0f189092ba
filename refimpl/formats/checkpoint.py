"""Safetensors bytes: a strict, zero-copy reader (`TensorSource`) and a streaming, atomic writer.

This module knows bytes and dtypes, not model names (those live in `weights.py`).

Why a hand-written reader: the `safetensors` library's NumPy backend (`safetensors.numpy`, 0.8)
cannot read the checkpoint's F8_E4M3 / F8_E8M0 tensors (it looks for `numpy.float8_e4m3fn`,
which NumPy lacks; here `ml_dtypes` supplies the formats, and the packed FP4 experts are I8), and
it returns every tensor as a writeable copy in memory instead of a view of the mapped file,
which a 160 GB checkpoint cannot afford. The format is small (a length, a JSON header, raw
C-order bytes), so this module reads it directly.

File layout (the safetensors format, as the `safetensors` library writes it):
    [8 bytes]  N, little-endian u64: the header length
    [N bytes]  JSON {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [b, e]}, ...},
               padded with spaces to a multiple of 8
    [rest]     the data region; tensor `name` is bytes [b, e) of it, C order, little-endian
A checkpoint directory holds either `model.safetensors`, or shards `model-0000i-of-0000n.safetensors`
plus `model.safetensors.index.json` = {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}.

Reading maps each file with `np.memmap` (mode "r") and returns read-only views: opening a
checkpoint reads only the headers, and a tensor's pages are read when its values are touched
(each map is registered with `sigbus`, so that a file truncated meanwhile is one line, not a crash).
Every malformed input raises `CheckpointError` naming the file and the tensor. `scan_values`
streams tensors through pread in 16 MiB chunks to count NaN/Inf. Writing streams one tensor at
a time (peak memory: one tensor) to a temporary name, renamed when complete.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from refimpl.formats import sigbus
from refimpl.formats.files import StrictJSONError, atomic_file, parse_json, read_json, write_text

class CheckpointError(ValueError):
    """A checkpoint file or directory that is malformed, incomplete or inconsistent."""


# safetensors dtype string -> NumPy dtype (all little-endian; the header names the format)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
MAX_HEADER_BYTES = 100_000_000        # the safetensors library refuses larger headers too
MAX_INDEX_BYTES = 64 << 20            # model.safetensors.index.json: Flash's is about 5 MB
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

assert np.little_endian, "safetensors data is little-endian; refimpl reads it on little-endian hosts only"


def dtype_name(dtype) -> str:
    """The safetensors dtype string of a NumPy dtype (inverse of DTYPES)."""
    for name, dt in DTYPES.items():
        if dt == np.dtype(dtype):
            return name
    raise CheckpointError(f"dtype {np.dtype(dtype)} has no safetensors name")


# ---------------------------------------------------------------- reading one file

class TensorInfo:
    """Where one tensor lives: dtype string, shape, byte range [begin, end) of the data region."""
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def __repr__(self):
        return f"TensorInfo({self.dtype}, {list(self.shape)}, [{self.begin}, {self.end}))"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensors, metadata, data start offset in the file)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):               # a FIFO would block, a device never end
            raise CheckpointError(f"{path}: not a regular file, so not a safetensors file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, shorter than the 8-byte header "
                                      "length field (truncated, or not a safetensors file)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length field says {n} bytes, more than the "
                                      f"{MAX_HEADER_BYTES} allowed (not a safetensors file?)")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length field says {n} bytes but the file has "
                                      f"only {size - 8} after it (truncated, or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = parse_json(raw.decode("utf-8"))
    except StrictJSONError as e:
        raise CheckpointError(f"{path}: header: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    data_len = size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of string values")
    tensors = {name: _tensor_info(path, name, entry, data_len) for name, entry in header.items()}
    _check_coverage(path, tensors, data_len)
    return tensors, meta, 8 + n


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Every byte of the data section belongs to exactly one tensor, as the safetensors library requires.

    In offset order each tensor starts where the one before it ended and the last ends at the end
    of the file: no gap, no overlap, no trailing bytes (the library refuses each: a gap or extra
    bytes could hide data a reader never checks). The header may list the tensors in any order,
    and a zero-size tensor sits at a boundary between two others; unaligned offsets are allowed
    (the library reads them too, and NumPy views them as they are).
    """
    pos, before = 0, None
    for begin, end, name in sorted((t.begin, t.end, name) for name, t in tensors.items()):
        if begin > pos:
            after = f"after tensor {before[0]!r}" if before else "before the first tensor"
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] leave bytes "
                                  f"[{pos}, {begin}) of the data section unused ({after})")
        if begin < pos:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] overlap those of "
                                  f"tensor {before[0]!r} [{before[1]}, {before[2]}]")
        pos, before = end, (name, begin, end)
    if pos != data_len:
        raise CheckpointError(f"{path}: {data_len - pos} byte(s) after the last tensor (the data section has "
                              f"{data_len} bytes, the tensors cover {pos}; a safetensors file holds nothing else)")


def _tensor_info(path: Path, name: str, entry, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is a JSON {type(entry).__name__}, expected an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair [begin, end] with 0 <= begin <= end")
    if len(shape) > 32 or math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize >= 2**62:
        raise CheckpointError(f"{where}: shape {shape!r} is beyond what an array can hold")
    begin, end = offsets
    want = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != want:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but "
                              f"{dtype} {shape} needs {want}")
    if end > data_len:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] run past the end of the file "
                              f"(data region has {data_len} bytes; truncated file?)")
    return TensorInfo(dtype, tuple(shape), begin, end)


class SafetensorsFile:
    """One safetensors file: its validated header, and memory-mapped read-only tensor views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._map = None                     # np.memmap of the data region, made on first get()

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` (no bytes are read until its values are used)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dt = DTYPES[t.dtype]
        if t.nbytes == 0:
            z = np.zeros(t.shape, dt)        # np.memmap cannot map zero bytes
            z.flags.writeable = False
            return z
        if self._map is None:
            size = max(t.end for t in self.tensors.values())
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start, shape=(size,))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot map the file ({e})") from None
            sigbus.register(self._map, self.path)      # truncated while mapped: one line, not a bus error
        return np.ndarray(t.shape, dtype=dt, buffer=self._map, offset=t.begin)

    def read_resident(self, name: str) -> np.ndarray:
        """A read-only copy of tensor `name` in anonymous memory, read with pread (the file is never mapped
        for it, so the process holds the bytes once), on transparent huge pages where the system allows
        them (madvise MADV_HUGEPAGE): see TensorSource.get(resident=True)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        if t.nbytes == 0:
            return self.get(name)
        buf = mmap.mmap(-1, t.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:                                             # Linux: 2 MiB pages, one TLB entry each
            buf.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):                 # no such advice here (other systems; THP compiled out)
            pass
        view = memoryview(buf)
        done = 0
        with open(self.path, "rb") as f:
            while done < t.nbytes:
                n = os.preadv(f.fileno(), [view[done:done + min(RESIDENT_CHUNK, t.nbytes - done)]],
                              self.data_start + t.begin + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
                done += n
        view.release()
        a = np.frombuffer(buf, dtype=DTYPES[t.dtype], count=math.prod(t.shape)).reshape(t.shape)
        a.flags.writeable = False
        return a

    def iter_bytes(self, name: str, chunk: int = 1 << 24):
        """The raw bytes of tensor `name` in chunks, read with pread: nothing stays mapped (for scans)."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        pos, end = self.data_start + t.begin, self.data_start + t.end
        with open(self.path, "rb") as f:
            while pos < end:
                b = os.pread(f.fileno(), min(chunk, end - pos), pos)
                if not b:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is cut short (truncated file?)")
                yield b
                pos += len(b)


# ---------------------------------------------------------------- reading a checkpoint

class TensorSource:
    """The tensors of a checkpoint (directory with index + shards, `model.safetensors`, or one file).

    `get(name)` returns a read-only memory-mapped view and counts the read in `self.used`
    (a Counter), so a test can check that a full load reads every tensor exactly once.
    """

    def __init__(self, path: str | Path):
        if str(path) == "":
            raise CheckpointError("the checkpoint path is empty")
        self.path = Path(path)
        self.used: Counter[str] = Counter()
        self.index_metadata: dict = {}
        self.unlisted: dict[str, str] = {}   # tensors in a shard that the index does not name
        p = self.path
        if p.is_dir():
            if (p / INDEX_NAME).exists():
                self._open_index(p / INDEX_NAME)
            elif (p / SINGLE_NAME).exists():
                self._open_files([p / SINGLE_NAME])
            else:
                raise CheckpointError(f"{p}: neither {INDEX_NAME} nor {SINGLE_NAME} in the directory")
        elif p.name.endswith(".index.json"):
            self._open_index(p)
        elif p.exists():
            self._open_files([p])
        else:
            raise CheckpointError(f"{p}: no such file or directory")

    def _open_files(self, files: list[Path]):
        self.files = {f.name: SafetensorsFile(f) for f in files}
        self.where = {}
        for fname, sf in self.files.items():
            for name in sf.tensors:
                self.where[name] = fname

    def _open_index(self, index: Path):
        raw = read_json(index, limit=MAX_INDEX_BYTES, what="a safetensors index", regular=True,
                        error=CheckpointError)
        wm = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: expected an object with a 'weight_map' of tensor name -> shard file")
        meta = raw.get("metadata", {})
        self.index_metadata = meta if isinstance(meta, dict) else {}
        files = {}
        for shard in sorted(set(wm.values())):
            f = index.parent / shard
            if Path(shard).name != shard or not f.is_file():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is not a file in {index.parent}")
            files[shard] = SafetensorsFile(f)
        self.files = files
        self.where = dict(wm)
        for name, shard in wm.items():
            if name not in files[shard].tensors:
                raise CheckpointError(f"{index}: lists tensor {name!r} in shard {shard!r}, but that shard "
                                      "does not hold it")
        for shard, sf in files.items():
            for name in sf.tensors:
                if wm.get(name) != shard:
                    self.unlisted[name] = shard

    def _info(self, name: str) -> TensorInfo:
        fname = self.where.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in the checkpoint")
        return self.files[fname].tensors[name]

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name) -> bool:
        return name in self.where

    def __len__(self) -> int:
        return len(self.where)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (e.g. "F8_E4M3")."""
        return self._info(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def file_of(self, name: str) -> Path:
        self._info(name)
        return self.files[self.where[name]].path

    def iter_bytes(self, name: str, chunk: int = 1 << 24):
        """Raw bytes of tensor `name` in chunks, without mapping them (memory stays flat; not recorded)."""
        self._info(name)
        return self.files[self.where[name]].iter_bytes(name, chunk)

    def get(self, name: str, *, record: bool = True, resident: bool = False) -> np.ndarray:
        """Read-only memory-mapped view of tensor `name`; counted in `self.used` unless record=False.

        resident=True: a read-only copy in anonymous memory instead (SafetensorsFile.read_resident), read
        now. For a large matrix that every step streams (the output head): file pages are mapped 4 KiB
        at a time, anonymous memory can take 2 MiB pages, and streaming it is then faster (fewer page
        walks). It costs the tensor's bytes of memory at once, as anonymous memory (the file's pages
        stay in the page cache, which the system may drop).
        """
        self._info(name)
        if record:
            self.used[name] += 1
        f = self.files[self.where[name]]
        return f.read_resident(name) if resident else f.get(name)


# ---------------------------------------------------------------- NaN / Inf in the values

CHUNK_BYTES = 1 << 24            # 16 MiB per read: a multiple of every item size
RESIDENT_CHUNK = 1 << 26         # read_resident: 64 MiB per pread

# dtype -> (unsigned view, mask): a value is NaN or Inf iff (bits & mask) == mask
NONFINITE_BITS = {
    "BF16": (np.uint16, 0x7F80),                   # IEEE layouts: every exponent bit set = Inf or NaN
    "F16": (np.uint16, 0x7C00),
    "F32": (np.uint32, 0x7F80_0000),
    "F64": (np.uint64, 0x7FF0_0000_0000_0000),
    "F8_E5M2": (np.uint8, 0x7C),
    "F8_E4M3": (np.uint8, 0x7F),                   # float8_e4m3fn: only S.1111.111 (0x7F, 0xFF) is NaN; no Inf
}
# integer codes and ids (FP4 e2m1 packed two per I8 byte: every code is finite)
NEVER_NONFINITE = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL")


def count_nonfinite(chunks, dtype: str) -> int:
    """NaN/Inf values (FP8 e4m3: NaN codes) in a stream of raw little-endian byte chunks of one dtype."""
    view, mask = NONFINITE_BITS[dtype]
    size = np.dtype(view).itemsize
    n, carry = 0, b""
    for chunk in chunks:
        buf = carry + chunk if carry else chunk
        whole = len(buf) - len(buf) % size            # a short read may split an item: keep the rest
        u = np.frombuffer(buf, view, count=whole // size)
        n += int(np.count_nonzero((u & view(mask)) == view(mask)))
        carry = buf[whole:]
    return n


def scan_values(src: TensorSource, dtypes: tuple[str, ...] = tuple(NONFINITE_BITS)) -> tuple[list[str], dict]:
    """NaN/Inf in the tensors of these dtypes -> (a line per bad tensor, {bytes, skipped_bytes, tensors}).

    E8M0 scales are scanned by weights.validate (byte 0xFF); integer tensors hold codes or ids.
    """
    problems, scanned, skipped, tensors = [], 0, 0, 0
    for name in src.keys():
        dtype, nbytes = src.dtype(name), src.nbytes(name)
        if dtype in NEVER_NONFINITE:
            skipped += nbytes
            continue
        if dtype not in NONFINITE_BITS or dtype not in dtypes:
            continue
        bad = count_nonfinite(src.iter_bytes(name, CHUNK_BYTES), dtype)
        scanned, tensors = scanned + nbytes, tensors + 1
        if bad and dtype == "F8_E4M3":
            problems.append(f"tensor {name!r}: {bad} FP8 e4m3 byte(s) are NaN (0x7F/0xFF)")
        elif bad:
            problems.append(f"tensor {name!r}: {bad} NaN/Inf value(s) ({dtype})")
    return problems, {"bytes": scanned, "skipped_bytes": skipped, "tensors": tensors}



# ---------------------------------------------------------------- writing

Spec = tuple  # (dtype string, shape); a weights.TensorSpec (dtype, shape, kind) works as well


def _layout(specs: Mapping[str, Spec]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Data order and offsets: wider dtypes first (stable), so every tensor is aligned to its itemsize."""
    for name, spec in specs.items():
        dt, shape = spec[0], tuple(spec[1])
        if dt not in DTYPES:
            raise CheckpointError(f"tensor {name!r}: unknown dtype {dt!r}")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"tensor {name!r}: bad shape {shape!r}")
    order = sorted(specs, key=lambda k: -DTYPES[specs[k][0]].itemsize)
    offsets, pos = {}, 0
    for name in order:
        n = spec_nbytes(specs[name])
        offsets[name] = (pos, pos + n)
        pos += n
    return order, offsets


def header_bytes(specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header (space-padded to a multiple of 8) for tensors laid out by _layout."""
    order, offsets = _layout(specs)
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in order:
        header[name] = {"dtype": specs[name][0], "shape": list(specs[name][1]),
                        "data_offsets": list(offsets[name])}
    js = json.dumps(header, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def write_safetensors(path: str | Path, specs: Mapping[str, Spec], produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file, one tensor at a time: produce(name) is called once per tensor.

    Each produced array must have exactly the spec's dtype and shape. The file appears at `path`
    only when complete (written as `path.tmp-…`, then renamed). Returns the file size in bytes.
    """
    path = Path(path)
    order, offsets = _layout(specs)
    head = header_bytes(specs, metadata)
    with atomic_file(path) as f:
        f.write(head)
        for name in order:
            want_dt, want_shape = DTYPES[specs[name][0]], tuple(specs[name][1])
            arr = produce(name)
            if not isinstance(arr, np.ndarray) or arr.dtype != want_dt or arr.shape != want_shape:
                got = (f"{arr.dtype} {list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__)
                raise CheckpointError(f"{path}: tensor {name!r}: produced {got}, spec says "
                                      f"{specs[name][0]} {list(want_shape)}")
            if arr.size:
                f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            del arr
            if f.tell() != len(head) + offsets[name][1]:
                raise CheckpointError(f"{path}: tensor {name!r}: wrote to {f.tell()}, expected "
                                      f"{len(head) + offsets[name][1]}")
        size = f.tell()
    return size


def shard_name(i: int, n: int) -> str:
    """HF shard file name, 1-based: model-00001-of-00046.safetensors."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def plan_shards(specs: Mapping[str, Spec], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in spec order, into consecutive groups of at most max_shard_bytes (a larger tensor sits alone)."""
    shards, cur, cur_bytes = [], [], 0
    for name, spec in specs.items():
        n = spec_nbytes(spec)
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur or not shards:
        shards.append(cur)
    return shards


def write_sharded(out_dir: str | Path, specs: Mapping[str, Spec], produce: Callable[[str], np.ndarray], *,
                  max_shard_bytes: int, metadata: Mapping[str, str] | None = None,
                  on_shard: Callable[[Path], None] | None = None) -> dict:
    """Write shards model-0000i-of-0000n.safetensors + model.safetensors.index.json (the index last).

    Returns the index dict: {"metadata": {"total_size": sum of tensor bytes}, "weight_map": {name: shard}}.
    """
    out_dir = Path(out_dir)
    groups = plan_shards(specs, max_shard_bytes)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        fname = shard_name(i, len(groups))
        sub = {k: specs[k] for k in group}
        write_safetensors(out_dir / fname, sub, produce, metadata)
        for k in group:
            weight_map[k] = fname
            total += spec_nbytes(specs[k])
        if on_shard is not None:
            on_shard(out_dir / fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / INDEX_NAME, index)
    return index


def write_json(path: str | Path, obj) -> None:
    """Write a JSON file atomically (temporary name, then rename; files.atomic_file)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def spec_nbytes(spec: Spec) -> int:
    """Bytes of a (dtype string, shape) spec."""
    return math.prod(spec[1]) * DTYPES[spec[0]].itemsize
