"""refimpl/kernels/rope.py (apply_rope) against model.rope.apply_rope (kernel_checks.py: the agreement)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kernel_checks import PRECS, bf16, dtype_of
from refimpl.kernels import rope as kr
from refimpl.model.rope import apply_rope, rope_table


@pytest.mark.parametrize("prec", PRECS)
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31), heads=st.sampled_from([None, 1, 3]), s=st.integers(1, 6),
       start=st.integers(0, 70000), inverse=st.booleans())
def test_apply_rope(prec, seed, heads, s, start, inverse):
    rng = np.random.default_rng(seed)
    shape = (2, s, 24) if heads is None else (2, s, heads, 24)
    x = bf16(rng.standard_normal(shape)).astype(dtype_of(prec))
    table = rope_table(start + np.arange(s), dim=16, base=10000.0, original_seq_len=4096, factor=16,
                       beta_fast=32, beta_slow=1, prec=prec)
    want = apply_rope.spec(x, table, prec, inverse=inverse)
    got = kr.apply_rope(x, table, prec, inverse=inverse)
    assert np.array_equal(got, want)                            # the same IEEE ops in every mode
