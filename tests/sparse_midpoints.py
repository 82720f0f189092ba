"""Sparse-attention queries whose mirror sums sit next to an fp32 rounding midpoint (issue 27).

mirror rounds each of the official kernel's sums once, from the exact sum (`sparse_attn_query`;
the block sum of the probabilities is a float64 sum in NumPy's pairwise order, which the Numba
kernel copies). On random inputs the order of a float64 sum, or an fp32 running sum, almost never
changes that one rounding, so a kernel could sum otherwise and pass; on these queries it cannot.

Each case is one query and one head, KV rows of width 8, softmax scale 1: channels 0-2 hold a
row's score as three bf16 pieces (q is 1 there, so q·kv is exact in float64 and can be any fp32
value), channel 3 is 1 on the row with the top score only (so o[3] = 1 / sum), channel 4 a P·V
probe. Expected o, fp32 before the bf16 store (the store would hide these last bits):

  block_sum  one block of 64, p = [1, 7 × a, b, 55 × a] with a = exp(fp32(ln(0.75·2^-53))) =
             0.74999994·2^-53 and b = exp(fp32(ln 2^-24)) = 2^-24 - 2^-48, sink -200 (adds 0).
             Σp exact = 1 + b + 62a, above the midpoint 1 + 2^-24: sum = 1 + 2^-23, as NumPy's
             pairwise order gives it (its eight accumulators keep 56 of the a). A sequential float64
             sum loses every a added to ~1 and gives 1 + b, below the midpoint: sum = 1.
             o[3] = fp32(1 / (1 + 2^-23)) = 1 - 2^-23 (a sequential sum: 1).
  pv         rows with p = 1, b, exp(fp32(ln 2^-40)) (bf16: 1, 2^-24, 2^-40), channel 4 = 1 on all
             three. Σ bf16(p)·kv[4] exact = 1 + 2^-24 + 2^-40, above the midpoint: 1 + 2^-23 (an
             fp32 running sum: 1 + 2^-24 is a tie, to even 1, then 1); Σp likewise 1 + 2^-23.
             o[4] = 1, o[3] = 1 - 2^-23 (an fp32 running P·V sum: o[4] = 1 - 2^-23).
  dot        one row, kv[0:3] = (16, 2^-20, 2^-40): q·kv exact = 16 + 2^-20 + 2^-40, above the
             midpoint 16 + 2^-20 of fp32's 2^-19 spacing: score 16 + 2^-19 (in fp32 steps: 16). It is
             the max, p = 1; sink 16 adds exp(fp32(16 - score)) = exp(-2^-19) = fp32 1 - 2^-19, so
             sum = 2 - 2^-19 and o[3] = fp32(1 / (2 - 2^-19)) = 0.5 + 2^-21 (score 16: sum 2, o[3] 0.5).
"""
import math

import numpy as np

D = 8


def split3(z) -> tuple:
    """Three bf16 values (as fp32) whose sum is the fp32 value z exactly: its 24 bits, 8 at a time."""
    parts, rest = [], np.float32(z)
    for _ in range(3):
        top = (np.array([rest], np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)[0]
        parts.append(top)
        rest = np.float32(rest - top)                    # exact: the bits below top's 8
    assert rest == 0 and float(parts[0]) + float(parts[1]) + float(parts[2]) == float(np.float32(z))
    return tuple(parts)


def _query(scores, extra=None):
    """q [1,1,1,D] and kv [1,n,D] for rows with these fp32 scores; extra {(row, channel): value}."""
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., :3] = 1
    kv = np.zeros((1, len(scores), D), np.float32)
    for j, z in enumerate(scores):
        kv[0, j, :3] = split3(z)
    kv[0, int(np.argmax(scores)), 3] = 1
    for (j, c), v in (extra or {}).items():
        kv[0, j, c] = v
    return q, kv


def cases() -> dict:
    """name -> (q [1,1,1,8], kv [1,n,8], sink [1], idx [1,1,k] int64, {channel: expected o (fp32)})."""
    a = np.float32(math.log(0.75 * 2.0 ** -53))
    b = np.float32(math.log(2.0 ** -24))
    out = {}
    scores = [0.0] + [a] * 7 + [b] + [a] * 55
    q, kv = _query(scores)
    out["block_sum"] = (q, kv, np.float32([-200]), np.arange(64)[None, None],
                        {3: 1 - 2.0 ** -23})
    q, kv = _query([0.0, b, np.float32(math.log(2.0 ** -40))], {(0, 4): 1, (1, 4): 1, (2, 4): 1})
    out["pv"] = (q, kv, np.float32([-200]), np.arange(3)[None, None], {3: 1 - 2.0 ** -23, 4: 1.0})
    q = np.zeros((1, 1, 1, D), np.float32)
    q[..., :3] = 1
    kv = np.zeros((1, 1, D), np.float32)
    kv[0, 0, :4] = (16, 2.0 ** -20, 2.0 ** -40, 1)
    out["dot"] = (q, kv, np.float32([16]), np.zeros((1, 1, 1), np.int64), {3: 0.5 + 2.0 ** -21})
    return out


def probabilities(name: str) -> np.ndarray:
    """The block's p (fp32 values, as float64) of a case, from its scores: exp(fp32(score - max))."""
    q, kv, _, idx, _ = cases()[name]
    sc = np.array([np.float32(math.fsum((q[0, 0, 0].astype(np.float64) * kv[0, j]).tolist()))
                   for j in idx[0, 0]], np.float32)
    return np.exp((sc - sc.max()).astype(np.float64)).astype(np.float32).astype(np.float64)
