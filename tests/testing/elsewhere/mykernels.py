"""Another project's implementations (what a user of refimpl.testing writes): plain NumPy, float32 results."""
import numpy as np


def fp8_linear(inp):
    """y = x @ W^T, W = e4m3 values times their 128x128 block's E8M0 scale."""
    w, s = inp["weight"].astype(np.float64), np.exp2(inp["scale"].view(np.uint8) - 127.0)
    w = w * s.repeat(128, 0).repeat(128, 1)[: w.shape[0], : w.shape[1]]
    return (inp["x"].astype(np.float64) @ w.T).astype(np.float32)


def sparse_attention(inp, sink_head_offset=0):
    """Softmax over each query's listed rows (-1: none) with the head's sink in the denominator."""
    q, kv, sink, idx = inp["q"].astype(np.float64), inp["kv"].astype(np.float64), inp["attn_sink"], inp["topk_idxs"]
    sink = np.roll(sink, sink_head_offset)                       # nonzero: a planted bug (another head's sink)
    o = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            rows = kv[b, idx[b, t][idx[b, t] >= 0]]
            sc = q[b, t] @ rows.T * inp["softmax_scale"]
            mx = sc.max(-1, keepdims=True)
            p = np.exp(sc - mx)
            o[b, t] = p @ rows / (p.sum(-1, keepdims=True) + np.exp(sink[:, None] - mx))
    return o.astype(np.float32)
