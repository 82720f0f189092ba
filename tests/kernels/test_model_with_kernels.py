"""The tiny model with the attention-side Numba kernels against the spec path: logits and every trace site.

Kernels selected one by one on the spec path ("numpy,op=numba,..."), so that this checks only these
kernels: sparse_attention, index_topk, gated_pool, split_sinkhorn, rms_norm, head_rms_norm, apply_rope.
mirror: every site bit-identical (prefill, then decode steps after it). float64: within 1e-12
relative of each site's scale; the integer sites (top-k, expert ids) identical.
"""
import numpy as np
import pytest

from refimpl.formats.weights import load
from refimpl.oracle.trace import Trace

OPS = ("sparse_attention", "index_topk", "gated_pool", "split_sinkhorn", "rms_norm", "head_rms_norm", "apply_rope")
MINE = "numpy," + ",".join(f"{op}=numba" for op in OPS)
TOKENS = (np.arange(40) * 37) % 900 + 3      # 40 tokens: past the window (32), several compressed entries


def run(ckpt, prec, kernels):
    model = load(ckpt, precision=prec, kernels=kernels)
    traces, logits = [], []
    tr = Trace()
    lg, state = model.prefill(TOKENS, trace=tr)
    traces.append(tr.tensors)
    logits.append(lg)
    for token in (5, 77):                     # decode after the prefill
        tr = Trace()
        lg, state = model.decode(token, state, trace=tr)
        traces.append(tr.tensors)
        logits.append(lg)
    return logits, traces


@pytest.mark.parametrize("prec", ["mirror", "float64"])
def test_tiny_model_sites_match_the_spec_path(tiny_ckpt, prec):
    want_logits, want_traces = run(tiny_ckpt, prec, "numpy")
    got_logits, got_traces = run(tiny_ckpt, prec, MINE)
    for step, (want, got) in enumerate(zip(want_traces, got_traces)):
        assert set(want) == set(got) and len(want) > 80
        for name in want:
            w, g = want[name], got[name]
            assert g.dtype == w.dtype and g.shape == w.shape, name
            if prec == "mirror" or w.dtype.kind in "iu":
                assert np.array_equal(g, w), f"step {step}: {name} differs"
            else:
                fin = np.isfinite(w)
                assert np.array_equal(np.isfinite(g), fin) and np.array_equal(g[~fin], w[~fin]), name
                np.testing.assert_allclose(g[fin], w[fin], rtol=0, atol=1e-12 * max(1.0, np.abs(w[fin]).max(initial=0)),
                                           err_msg=f"step {step}: {name}")
    for w, g in zip(want_logits, got_logits):
        if prec == "mirror":
            assert np.array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * np.abs(w).max())
