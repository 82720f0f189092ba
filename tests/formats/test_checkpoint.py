"""checkpoint.py: the safetensors reader (strict, zero-copy), the streaming writer, the sharded layout."""
import gc
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl.formats.checkpoint import (DTYPES, INDEX_NAME, CheckpointError, SafetensorsFile, TensorSource,
                                header_bytes, read_header, write_json, write_safetensors, write_sharded)


def _random(dtype: str, shape, rng) -> np.ndarray:
    """Random bytes reinterpreted as dtype (any bit pattern is a valid tensor for the format)."""
    n = int(np.prod(shape)) * DTYPES[dtype].itemsize
    raw = rng.integers(0, 256, n, dtype=np.uint8)
    if dtype == "BOOL":
        raw &= 1
    return raw.view(DTYPES[dtype]).reshape(shape)


def _write(path, arrays: dict, metadata=None) -> Path:
    specs = {k: (next(n for n, d in DTYPES.items() if d == a.dtype), a.shape) for k, a in arrays.items()}
    write_safetensors(path, specs, arrays.__getitem__, metadata)
    return Path(path)


def _raw_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A file with an arbitrary header (dict -> JSON) and data, for the bad-input tests."""
    js = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(js) if length is None else length) + js + data)
    return Path(path)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- round trips

def test_round_trip_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"t.{dt}.{i}": _random(dt, shape, rng)
              for dt in DTYPES for i, shape in enumerate([(3, 5), (7,), (), (0, 4)])}
    f = _write(tmp_path / "a.safetensors", arrays, {"format": "pt"})
    src = TensorSource(f)
    assert sorted(src.keys()) == sorted(arrays)
    for name, a in arrays.items():
        got = src.get(name)
        assert _same(got, a), name
        assert not got.flags.writeable, name                     # views of a read-only map
        assert src.shape(name) == a.shape and src.nbytes(name) == a.nbytes
        assert DTYPES[src.dtype(name)] == a.dtype
    assert SafetensorsFile(f).metadata == {"format": "pt"}


def test_header_is_padded_to_8_and_tensors_aligned(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"odd": _random("I8", (3,), rng), "wide": _random("F64", (2,), rng), "mid": _random("BF16", (5,), rng)}
    f = _write(tmp_path / "a.safetensors", arrays)
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    assert n % 8 == 0
    tensors, _, start = read_header(f)
    assert start % 8 == 0
    for name, t in tensors.items():
        assert t.begin % DTYPES[t.dtype].itemsize == 0, name     # wider dtypes are written first


def test_our_files_load_in_safetensors(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"bf16": _random("BF16", (4, 6), rng), "f32": _random("F32", (3, 2), rng),
              "i64": _random("I64", (5,), rng), "e4m3": _random("F8_E4M3", (2, 8), rng),
              "e8m0": _random("F8_E8M0", (2, 2), rng), "i8": _random("I8", (9,), rng)}
    f = _write(tmp_path / "a.safetensors", arrays, {"format": "pt"})
    loaded = dict(safetensors.deserialize(f.read_bytes()))      # the library's own (Rust) parser
    assert set(loaded) == set(arrays)
    for name, a in arrays.items():
        assert loaded[name]["shape"] == list(a.shape)
        assert bytes(loaded[name]["data"]) == a.tobytes(), name
    assert loaded["e4m3"]["dtype"] == "F8_E4M3" and loaded["bf16"]["dtype"] == "BF16"
    g = _write(tmp_path / "b.safetensors", {k: arrays[k] for k in ("f32", "i64", "i8")})
    np_loaded = safetensors.numpy.load_file(g)                  # numpy backend: no BF16 / F8 there
    for k in ("f32", "i64", "i8"):
        assert _same(np_loaded[k], arrays[k])


def test_safetensors_library_files_load_in_ours(tmp_path):
    rng = np.random.default_rng(3)
    plain = {"f32": _random("F32", (3, 4), rng), "i64": _random("I64", (2,), rng),
             "i8": _random("I8", (5, 3), rng), "f16": _random("F16", (4,), rng),
             "u8": _random("U8", (6,), rng), "b": _random("BOOL", (3,), rng)}
    safetensors.numpy.save_file(plain, tmp_path / "np.safetensors", metadata={"format": "np"})
    src = TensorSource(tmp_path / "np.safetensors")
    for k, a in plain.items():
        assert _same(src.get(k), a), k
    special = {"bf16": (_random("BF16", (4, 2), rng), "bfloat16"),
               "e4m3": (_random("F8_E4M3", (3, 8), rng), "float8_e4m3fn"),
               "e8m0": (_random("F8_E8M0", (2, 3), rng), "float8_e8m0fnu")}
    specs = {k: safetensors.TensorSpec(dtype=dt, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
             for k, (a, dt) in special.items()}
    safetensors.serialize_file(specs, str(tmp_path / "rs.safetensors"))
    src = TensorSource(tmp_path / "rs.safetensors")
    for k, (a, _) in special.items():
        assert _same(src.get(k), a), k


def test_sharded_writer_layout_and_index(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {f"w.{i}": _random("BF16", (100, 10), rng) for i in range(7)}   # 2000 bytes each
    specs = {k: ("BF16", a.shape) for k, a in arrays.items()}
    index = write_sharded(tmp_path, specs, arrays.__getitem__, max_shard_bytes=4500)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + [INDEX_NAME]
    on_disk = json.loads((tmp_path / INDEX_NAME).read_text())
    assert on_disk == index and index["metadata"]["total_size"] == 7 * 2000
    assert index["weight_map"]["w.0"] == "model-00001-of-00004.safetensors"
    assert index["weight_map"]["w.6"] == "model-00004-of-00004.safetensors"
    src = TensorSource(tmp_path)
    assert sorted(src.keys()) == sorted(arrays)
    for k, a in arrays.items():
        assert _same(src.get(k), a)
    assert all(n == 1 for n in src.used.values()) and set(src.used) == set(arrays)


def test_single_model_safetensors_dir(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    _write(tmp_path / "model.safetensors", {"x": a})
    assert _same(TensorSource(tmp_path).get("x"), a)


def test_writer_checks_produced_arrays_and_leaves_nothing(tmp_path):
    path = tmp_path / "a.safetensors"
    with pytest.raises(CheckpointError, match=r"'x'.*produced float32 \[2, 3\].*BF16 \[2, 3\]"):
        write_safetensors(path, {"x": ("BF16", (2, 3))}, lambda n: np.zeros((2, 3), np.float32))
    with pytest.raises(CheckpointError, match=r"'x'.*\[3, 2\]"):
        write_safetensors(path, {"x": ("F32", (2, 3))}, lambda n: np.zeros((3, 2), np.float32))
    assert list(tmp_path.iterdir()) == []                        # no file, no temporary


def test_writer_failure_midway_leaves_nothing(tmp_path):
    def produce(name):
        if name == "b":
            raise RuntimeError("boom")
        return np.zeros(4, np.float32)
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "a.safetensors", {"a": ("F32", (4,)), "b": ("F32", (4,))}, produce)
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_arrays_are_written_in_c_order(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(tmp_path / "a.safetensors", {"t": ("F32", (4, 3))}, lambda n: a.T)
    assert np.array_equal(TensorSource(tmp_path / "a.safetensors").get("t"), a.T)


# ---------------------------------------------------------------- bad input: one file

def _valid_header():
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "I8", "shape": [4], "data_offsets": [8, 12]}}


def test_valid_raw_file_reads(tmp_path):
    f = _raw_file(tmp_path / "ok.safetensors", _valid_header(), bytes(12))
    assert TensorSource(f).shape("b") == (4,)


def test_truncated_file(tmp_path):
    good = _write(tmp_path / "good.safetensors", {"x": np.zeros((64, 64), np.float32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: tensor 'x'.*run past the end.*truncated"):
        TensorSource(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(good.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors.*shorter than the 8-byte"):
        TensorSource(tiny)
    half = tmp_path / "half.safetensors"
    half.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"half\.safetensors: header length field"):
        TensorSource(half)


def test_overlapping_offsets(tmp_path):
    h = _valid_header()
    h["b"]["data_offsets"] = [4, 8]
    f = _raw_file(tmp_path / "o.safetensors", h, bytes(12))
    with pytest.raises(CheckpointError, match=r"o\.safetensors: tensor 'b'.*overlap.*'a'"):
        TensorSource(f)


def _library_refuses(path) -> bool:
    try:
        safetensors.deserialize(Path(path).read_bytes())        # the library's own (Rust) parser
    except Exception:                                            # SafetensorError
        return True
    return False


U8 = lambda begin, end: {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}   # noqa: E731


@pytest.mark.parametrize("header, data, message", [
    ({"a": U8(0, 4), "b": U8(4, 8)}, 9, r"1 byte\(s\) after the last tensor \(the data section has 9 bytes, "
                                         r"the tensors cover 8"),
    ({}, 3, r"3 byte\(s\) after the last tensor"),
    ({"a": U8(0, 4), "b": U8(5, 9)}, 9, r"tensor 'b': data_offsets \[5, 9\] leave bytes \[4, 5\) of the data "
                                        r"section unused \(after tensor 'a'\)"),
    ({"a": U8(1, 5)}, 5, r"tensor 'a': .* leave bytes \[0, 1\) .* \(before the first tensor\)"),
    ({"a": U8(0, 4), "b": U8(2, 6)}, 6, r"tensor 'b': data_offsets \[2, 6\] overlap those of tensor 'a' \[0, 4\]"),
    ({"a": U8(0, 4), "b": U8(0, 4)}, 4, r"tensor 'b': .* overlap those of tensor 'a'"),
    ({"a": U8(0, 4), "z": U8(2, 2)}, 4, r"tensor 'z': data_offsets \[2, 2\] overlap those of tensor 'a'"),
    ({"a": U8(0, 4), "z": U8(6, 6)}, 6, r"tensor 'z': .* leave bytes \[4, 6\)"),
])
def test_the_data_section_is_covered_exactly_once(tmp_path, header, data, message):
    """Gaps, overlaps and trailing bytes are refused, naming the tensor, as the safetensors library does (issue 25)."""
    f = _raw_file(tmp_path / "c.safetensors", header, bytes(data))
    assert _library_refuses(f)
    with pytest.raises(CheckpointError, match=r"c\.safetensors: " + message):
        TensorSource(f)


@pytest.mark.parametrize("header, data", [
    ({"b": U8(4, 8), "a": U8(0, 4)}, 8),                                 # the header's order is free
    ({"a": U8(0, 4), "z": U8(4, 4), "b": U8(4, 8), "y": U8(8, 8)}, 8),    # zero-size tensors at boundaries
    ({"z": U8(0, 0)}, 0),
    ({"a": U8(0, 1), "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}, 9),   # unaligned
])
def test_what_the_library_accepts_is_read(tmp_path, header, data):
    raw = np.random.default_rng(0).integers(0, 256, data, dtype=np.uint8).tobytes()
    f = _raw_file(tmp_path / "ok.safetensors", header, raw)     # the header is not padded: data starts unaligned
    assert not _library_refuses(f)
    src, theirs = TensorSource(f), dict(safetensors.deserialize(f.read_bytes()))
    for name in header:
        assert src.get(name).tobytes() == bytes(theirs[name]["data"]), name


def test_offsets_past_the_file(tmp_path):
    h = _valid_header()
    h["b"]["data_offsets"] = [8, 12]
    f = _raw_file(tmp_path / "p.safetensors", h, bytes(10))
    with pytest.raises(CheckpointError, match=r"p\.safetensors: tensor 'b'.*\[8, 12\] run past the end"):
        TensorSource(f)


def test_absurd_length_field(tmp_path):
    f = _raw_file(tmp_path / "l.safetensors", _valid_header(), bytes(12), length=2**63)
    with pytest.raises(CheckpointError, match=r"l\.safetensors: header length field says 9223372036854775808"):
        TensorSource(f)
    g = _raw_file(tmp_path / "m.safetensors", _valid_header(), bytes(12), length=10**6)
    with pytest.raises(CheckpointError, match="header length field"):
        TensorSource(g)


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["a"].pop("dtype"), r"tensor 'a': entry lacks dtype"),
    (lambda h: h["a"].pop("data_offsets"), r"tensor 'a': entry lacks data_offsets"),
    (lambda h: h["a"].update(dtype="F4"), r"tensor 'a': unknown dtype 'F4'"),
    (lambda h: h["a"].update(shape=[3]), r"tensor 'a': data_offsets \[0, 8\] hold 8 bytes, but F32 \[3\] needs 12"),
    (lambda h: h["a"].update(shape=[-2]), r"tensor 'a': shape"),
    (lambda h: h["a"].update(data_offsets=[8, 0]), r"tensor 'a': data_offsets"),
    (lambda h: h["a"].update(shape=[0, 2**62], data_offsets=[0, 0]), r"tensor 'a': shape .* beyond"),
    (lambda h: h["a"].update(shape=[0] * 65, data_offsets=[0, 0]), r"tensor 'a': shape .* beyond"),
    (lambda h: h["a"].update(shape=[2.0]), r"tensor 'a': shape"),
    (lambda h: h.update(__metadata__={"k": 1}), r"__metadata__"),
    (lambda h: h.update(c=[1, 2]), r"tensor 'c': entry is a JSON list"),
])
def test_malformed_entries(tmp_path, mutate, message):
    h = _valid_header()
    mutate(h)
    f = _raw_file(tmp_path / "e.safetensors", h, bytes(12))
    with pytest.raises(CheckpointError, match=r"e\.safetensors: " + message):
        TensorSource(f)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe{}", b'{"a": 1, "a": 2}', b"[" * 100000])
def test_invalid_json_header(tmp_path, raw):
    f = _raw_file(tmp_path / "j.safetensors", raw)
    with pytest.raises(CheckpointError, match=r"j\.safetensors: header"):
        TensorSource(f)


# ---------------------------------------------------------------- bad input: directories and keys

def _two_shards(tmp_path) -> Path:
    arrays = {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.int64), "c": np.ones(2, np.int64)}
    write_sharded(tmp_path, {k: (("F32" if k == "a" else "I64"), v.shape) for k, v in arrays.items()},
                  arrays.__getitem__, max_shard_bytes=50)       # shard 1: a; shard 2: b, c
    return tmp_path


def test_index_naming_a_missing_shard(tmp_path):
    d = _two_shards(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: names shard "
                                              r"'model-00002-of-00002\.safetensors'"):
        TensorSource(d)


def test_index_listing_a_tensor_its_shard_lacks(tmp_path):
    d = _two_shards(tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    write_json(d / INDEX_NAME, index)
    with pytest.raises(CheckpointError, match=r"index\.json: lists tensor 'ghost' in shard 'model-00001-of-00002"):
        TensorSource(d)


def test_index_not_listing_a_shard_tensor_is_recorded(tmp_path):
    d = _two_shards(tmp_path)
    index = json.loads((d / INDEX_NAME).read_text())
    del index["weight_map"]["b"]
    write_json(d / INDEX_NAME, index)
    src = TensorSource(d)
    assert "b" not in src and src.unlisted == {"b": "model-00002-of-00002.safetensors"}


@pytest.mark.parametrize("text", ["{", "[]", '{"weight_map": {"a": 3}}', '{"metadata": {}}'])
def test_bad_index_json(tmp_path, text):
    (tmp_path / INDEX_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        TensorSource(tmp_path)


def test_missing_key_names_key_and_checkpoint(tmp_path):
    d = _two_shards(tmp_path)
    src = TensorSource(d)
    for call in (src.get, src.shape, src.dtype, src.nbytes):
        with pytest.raises(CheckpointError, match=rf"{d}: no tensor 'layers\.0\.nope' in the checkpoint"):
            call("layers.0.nope")
    assert "layers.0.nope" not in src and not src.used


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        TensorSource(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        TensorSource(tmp_path / "nothing")


def test_get_record_flag(tmp_path):
    src = TensorSource(_two_shards(tmp_path))
    src.get("a", record=False)
    assert not src.used
    src.get("a"), src.get("a")
    assert src.used["a"] == 2


def test_resident_reads_give_the_mapped_bytes(tmp_path):
    """get(resident=True): the same bytes, dtype and shape as the mapped view, read-only, in anonymous memory
    (not a view of the file), counted as a read; every dtype and an empty tensor."""
    rng = np.random.default_rng(1)
    arrays = {f"t.{dt}.{i}": _random(dt, shape, rng) for dt in DTYPES for i, shape in enumerate([(3, 5), (), (0, 4)])}
    arrays["big"] = _random("BF16", (300, 1000), rng)
    src = TensorSource(_write(tmp_path / "a.safetensors", arrays))
    for name, a in arrays.items():
        got = src.get(name, resident=True)
        assert _same(got, a) and _same(got, src.get(name, record=False)), name
        assert not got.flags.writeable, name
        assert src.used[name] == 1
    assert not isinstance(np.asarray(src.get("big", resident=True)).base, np.memmap)


def test_resident_read_of_a_file_cut_after_opening(tmp_path, monkeypatch):
    """A shard cut short after its header was read: a CheckpointError naming the tensor, not a short array."""
    import refimpl.formats.checkpoint as C
    f = _write(tmp_path / "a.safetensors", {"x": np.arange(4096, dtype=np.float32)})
    src = TensorSource(f)
    monkeypatch.setattr(C, "RESIDENT_CHUNK", 1000)                # several reads, the last one short
    os.truncate(f, f.stat().st_size - 5000)
    with pytest.raises(CheckpointError, match=r"a\.safetensors: tensor 'x' is cut short"):
        src.get("x", resident=True)


# ---------------------------------------------------------------- fuzzing: only CheckpointError

def _valid_file_bytes() -> bytes:
    h = header_bytes({"x": ("F32", (2, 3)), "y": ("BF16", (4,)), "z": ("I8", (5,))}, {"format": "pt"})
    return h + bytes(range(24 + 8 + 5))


def _open_and_read_all(path):
    src = TensorSource(path)
    for k in src.keys():
        np.asarray(src.get(k)).sum()                             # touch every byte of every view
    assert not _library_refuses(path), "a file the safetensors library refuses was read"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path, data):
    f = tmp_path / "r.safetensors"
    f.write_bytes(data)
    try:
        _open_and_read_all(f)
    except CheckpointError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=0, max_size=4)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 250)))
def test_fuzz_mutated_valid_file(tmp_path, edits, cut):
    b = bytearray(_valid_file_bytes())
    for pos, rep in edits:                                       # splice: replace len(rep) bytes at pos
        pos = min(pos, len(b))
        b[pos:pos + max(1, len(rep))] = rep
    if cut is not None:
        b = b[:cut]
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(b))
    try:
        _open_and_read_all(f)
    except CheckpointError:
        pass


_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
                            | st.sampled_from(["F32", "I8", "BF16", [0, 2**63], [0] * 70, [0, 0], [2, 3]]),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                            max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["x", "y", "z", "__metadata__", "new"]),
       key=st.sampled_from(["dtype", "shape", "data_offsets", "other"]), value=_json_values)
def test_fuzz_mutated_header_values(tmp_path, name, key, value):
    raw = _valid_file_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    entry = header.setdefault(name, {})
    if isinstance(entry, dict):
        entry[key] = value
    f = _raw_file(tmp_path / "h.safetensors", header, raw[8 + n:])
    try:
        _open_and_read_all(f)
    except CheckpointError:
        pass


# ---------------------------------------------------------------- memory: reading costs what is read

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_opening_costs_memory_in_proportion_to_what_is_read(tmp_path):
    big = 200 * 2**20
    specs = {"small": ("F32", (1024,)), "big": ("U8", (big,))}
    write_safetensors(tmp_path / "big.safetensors", specs,
                      lambda n: np.ones(1024, np.float32) if n == "small" else np.zeros(big, np.uint8))
    gc.collect()
    before = _rss_bytes()
    src = TensorSource(tmp_path / "big.safetensors")
    assert float(src.get("small").sum()) == 1024.0
    view = src.get("big")                                        # a view: nothing is read yet
    assert view.shape == (big,) and int(view[-10:].sum()) == 0   # touch only the last page
    grown = _rss_bytes() - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB for a {big / 2**20:.0f} MiB file"
