"""A prefill's row-wise work taken in chunks of positions (refimpl/model/chunks.py) changes no result.

float64 and mirror: the logits, the MTP logits, every recorded site and the state are bit-identical
with chunks of a few positions and slices of the head's vocabulary forced (chunks.ROWS, chunks.BYTES,
chunks.COLUMNS) and without (one chunk), with the
kernels and with the spec functions, from position 0 and from a later position. float32: the same
chunking gives the same bits every time, and another chunking agrees within float32 rounding (its
many-row products are sgemm calls whose last bits may depend on the row count; chunks.py says so).
"""
import numpy as np
import pytest

from refimpl.model import chunks
from refimpl.oracle.trace import Trace

TOKENS = 41          # > window 32 + 2 ratios of 4 (CSA) and > 2 ratios of 16 (HCA): every index part in play


def run(model, ids, *, start: int = 0):
    """(logits, mtp logits, sites, state) of a forward (start 0) or of a prefill of ids[start:] after ids[:start]."""
    trace = Trace(("*",))
    if start == 0:
        logits, mtp = model.forward(ids, trace=trace, mtp=True)
        return logits, mtp, dict(trace.tensors), None
    _, state = model.prefill(ids[:start])
    logits, state = model.prefill(ids[start:], state, trace=trace)
    return logits, None, dict(trace.tensors), state


def unchunked(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(chunks, "ROWS", 1 << 30)
        m.setattr(chunks, "BYTES", 1 << 60)
        m.setattr(chunks, "COLUMNS", 1 << 30)
        m.setattr(chunks, "HEAD_ROWS", 1 << 30)
        return fn()


def forced(monkeypatch, fn, rows=3, nbytes=1, columns=96):
    """fn() with chunks of `rows` positions, one position where a row is wide (BYTES = 1), and the head's
    vocabulary in slices of `columns` rows (not a divisor of the tiny vocabulary, 1280)."""
    with monkeypatch.context() as m:
        m.setattr(chunks, "ROWS", rows)
        m.setattr(chunks, "BYTES", nbytes)
        m.setattr(chunks, "COLUMNS", columns)
        return fn()


def assert_same(a, b, exact: bool):
    la, ma, sa, st_a = a
    lb, mb, sb, st_b = b
    check = np.testing.assert_array_equal if exact else \
        (lambda x, y, err_msg="": np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5, err_msg=err_msg))
    check(la, lb)
    if ma is not None or mb is not None:
        check(ma, mb)
    assert sa.keys() == sb.keys()
    for name in sa:
        if exact or sa[name].dtype.kind in "iu":
            np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
        else:
            check(sa[name].astype(np.float64), sb[name].astype(np.float64), err_msg=name)
    if st_a is not None:
        for x, y in zip(st_a.layers, st_b.layers):
            for f in ("window", "compressed"):
                if getattr(x, f) is not None:
                    check(getattr(x, f).astype(np.float64), getattr(y, f).astype(np.float64))
            if x.indexer is not None:
                check(x.indexer.keys.astype(np.float64), y.indexer.keys.astype(np.float64))


def test_spans():
    assert chunks.spans(7) == [(0, 7)]
    assert chunks.spans(0) == []
    old = chunks.ROWS, chunks.BYTES, chunks.COLUMNS
    try:
        chunks.ROWS, chunks.BYTES, chunks.COLUMNS = 3, 100, 4
        assert chunks.columns(10, 10) == [(0, 8), (8, 10)]                       # 100 bytes: 10 columns, 8 of them whole
        assert chunks.columns(10, 1000) == [(0, 4), (4, 8), (8, 10)]             # at least COLUMNS
        assert chunks.spans(7) == [(0, 3), (3, 6), (6, 7)]
        assert chunks.spans(7, row_bytes=50) == [(0, 2), (2, 4), (4, 6), (6, 7)]   # 100 bytes: 2 rows of 50
        assert chunks.spans(3, row_bytes=1000) == [(0, 1), (1, 2), (2, 3)]        # wider than BYTES: one row
        assert chunks.spans(7, most=2) == [(0, 2), (2, 4), (4, 6), (6, 7)]         # fewer than ROWS: `most`
        assert chunks.spans(7, most=5) == [(0, 3), (3, 6), (6, 7)]                 # never more than ROWS
    finally:
        chunks.ROWS, chunks.BYTES, chunks.COLUMNS = old


@pytest.mark.parametrize("prec", ["float64", "mirror"])
@pytest.mark.parametrize("kernels", [None, "numpy"])
def test_chunks_change_no_bit(tiny_model, monkeypatch, prec, kernels):
    model = tiny_model(prec, kernels=kernels)
    ids = np.random.default_rng(5).integers(0, model.cfg.vocab_size, TOKENS)
    whole = unchunked(monkeypatch, lambda: run(model, ids))
    assert_same(forced(monkeypatch, lambda: run(model, ids)), whole, exact=True)
    # without a trace the MoE half writes over the attention half's streams (block.py): the same logits
    plain = forced(monkeypatch, lambda: model.forward(ids, mtp=True))
    np.testing.assert_array_equal(plain[0], whole[0])
    np.testing.assert_array_equal(plain[1], whole[1])
    if kernels is None:          # rows of 5 (the MoE half), and byte-limited chunks of 2 positions elsewhere
        row = model.cfg.hc_mult ** 2 * model.cfg.dim * 8
        assert_same(forced(monkeypatch, lambda: run(model, ids), rows=5, nbytes=2 * row), whole, exact=True)


@pytest.mark.parametrize("prec", ["float64", "mirror"])
def test_chunks_change_no_bit_from_a_later_position(tiny_model, monkeypatch, prec):
    model = tiny_model(prec)
    ids = np.random.default_rng(6).integers(0, model.cfg.vocab_size, TOKENS)
    whole = unchunked(monkeypatch, lambda: run(model, ids, start=9))
    assert_same(forced(monkeypatch, lambda: run(model, ids, start=9)), whole, exact=True)


def test_float32_chunks_deterministic_and_close(tiny_model, monkeypatch):
    model = tiny_model("float32")
    ids = np.random.default_rng(7).integers(0, model.cfg.vocab_size, TOKENS)
    first = forced(monkeypatch, lambda: run(model, ids))
    assert_same(forced(monkeypatch, lambda: run(model, ids)), first, exact=True)    # the same chunking: the same bits
    assert_same(unchunked(monkeypatch, lambda: run(model, ids)), first, exact=False)


def test_chunked_expert_ids_and_replay_positions(tiny_model, monkeypatch):
    """The MoE half in chunks routes each position as one call does; hash-layer ids come from the token at
    that position (a chunk offset error would shift them)."""
    model = tiny_model("float64")
    ids = np.random.default_rng(8).integers(0, model.cfg.vocab_size, TOKENS)
    _, _, sites, _ = forced(monkeypatch, lambda: run(model, ids))
    for i in range(model.cfg.n_layers):
        got = sites[f"layers.{i}.ffn.expert_ids"]
        assert got.shape == (TOKENS, model.cfg.n_activated_experts)
        tid2eid = model.weights.layers[i].ffn.gate.tid2eid
        if tid2eid is not None:
            np.testing.assert_array_equal(got, np.asarray(tid2eid)[ids])
