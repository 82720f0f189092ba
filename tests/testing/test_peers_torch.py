"""PyTorch implementations property-tested through refimpl.testing (needs the `peers` extra; skipped without it).

A hand-written torch sparse attention (docs/testing.md's worked example) passes. transformers' DeepSeek V4 FP8
loading path does not, on partial blocks:

transformers dequantizes every FP8 weight of the official checkpoint on load (on a CPU it always does) with
`Fp8Dequantize` (transformers/integrations/finegrained_fp8.py, the op its FP8 quantizer runs first on each
weight and its `weight_scale_inv`), then runs F.linear in float32. The kit's fp8_linear strategy draws
output dimensions that are not multiples of 128: transformers takes the block height from the scale grid
(N / grid rows) instead of the format's fixed 128, so the rows of a partial block's neighbour take the
wrong scale (docs/peers-transformers.md found the same on a whole checkpoint, at layers.0.attn.kv). Shapes
whose N is not a multiple of the grid's row count are refused by transformers ("not divisible by scale
grid"); those examples are rejected here and counted.
"""
import numpy as np
import pytest
from hypothesis import reject

from refimpl.testing import MismatchError, assert_matches, check_op
from refimpl.testing.ops_linear import bf16_values, fp8_weight

torch = pytest.importorskip("torch", reason="needs the peers extra: pip install '.[peers]'")
fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8",
                          reason="needs transformers (the peers extra: pip install '.[peers]')")


def transformers_fp8_linear(inp):
    """The weight as transformers' loader dequantizes it, then its float32 F.linear."""
    weight = torch.from_numpy(np.asarray(inp["weight"]).view(np.uint8).copy()).view(torch.float8_e4m3fn)
    scale = torch.from_numpy(np.asarray(inp["scale"]).view(np.uint8).copy())        # E8M0 bytes, as shipped
    w = fp8.Fp8Dequantize(None).convert({"weight": weight, "weight_scale_inv": scale})["weight"]
    return torch.nn.functional.linear(torch.from_numpy(inp["x"]), w.float()).numpy()


def torch_sparse_attention(inp):
    """docs/testing.md's hand-written torch op: the sink as one more logit that holds no value."""
    q, kv = torch.from_numpy(inp["q"]), torch.from_numpy(inp["kv"])
    sink, idx = torch.from_numpy(inp["attn_sink"]), torch.from_numpy(inp["topk_idxs"])
    b, s, h, d = q.shape
    rows = kv[torch.arange(b)[:, None, None], idx.clamp(min=0)]          # [b, s, k, d]
    scores = torch.einsum("bshd,bskd->bshk", q, rows) * inp["softmax_scale"]
    scores = scores.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
    scores = torch.cat([scores, sink.view(1, 1, h, 1).expand(b, s, h, 1)], dim=-1)
    p = scores.softmax(dim=-1)[..., :-1]
    return torch.einsum("bshk,bskd->bshd", p, rows).numpy()


def test_a_hand_written_torch_sparse_attention_passes():
    check_op(torch_sparse_attention, "sparse_attention", "float32", max_examples=60, derandomize=True)


def test_full_blocks_agree():
    rng = np.random.default_rng(0)
    w, s = fp8_weight(rng, 256, 256, spread=3)
    inp = {"x": bf16_values(rng, (3, 256)), "weight": w, "scale": s}
    assert_matches(transformers_fp8_linear(inp), "fp8_linear", inp, "float32")


def test_the_partial_block_error_shows_through_the_kit():
    """Every example the kit fails has a partial block (N or K not a multiple of 128), and there are such failures;
    every full-block example passes."""
    refused, failed, passed = [], [], []

    def candidate(inp):
        try:
            y = transformers_fp8_linear(inp)
        except ValueError as e:                  # "Weight shape (..) not divisible by scale grid (..)"
            refused.append(str(e))
            reject()
        try:
            assert_matches(y, "fp8_linear", inp, "float32")
            passed.append(inp["weight"].shape)
        except MismatchError:
            failed.append(inp["weight"].shape)
        return y
    with pytest.raises(MismatchError) as e:
        check_op(candidate, "fp8_linear", "float32", max_examples=100, derandomize=True)
    print(e.value, f"\nfailed {len(failed)}, passed {len(passed)}, refused by transformers {len(refused)}")
    assert "fp8_linear.y at float32" in str(e.value) and "inputs: x [" in str(e.value)
    assert failed and all(n % 128 or k % 128 for n, k in failed)
    assert any(n % 128 == 0 and k % 128 == 0 for n, k in passed)
