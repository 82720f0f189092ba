"""An independent float32 forward pass of DeepSeek V4 Flash, written as a user of refimpl would:
NumPy, safetensors, json and the standard library only; refimpl is not imported.

It reads an official-format checkpoint (FP8 e4m3 weights with 128x128 E8M0 block scales, FP4 e2m1
routed experts with 1x32 E8M0 scales, bf16 and fp32 tensors), dequantizes every weight to float32,
runs one prefill of the given tokens from position 0 with float32 activations (no simulated
activation quantization: the architecture's math), and writes the sites of
`docs/trace-format.md` with precision "float32".

    python tests/independent/v4_float32.py CKPT --tokens 0,15,27 --out mine.safetensors
        [--swiglu-limit L] [--sites-only embed,layers.0.*]
    python tests/independent/v4_float32.py CKPT --golden golden --input prefill-80 --out mine.safetensors
        (the input's tokens and config override from the golden set's manifest.json)

Official line references: `inference/model.py` (M) and `inference/kernel.py` (K) of
deepseek-ai/DeepSeek-V4-Flash, revision 60d8d70770c6776ff598c94bb586a859a38244f1 (current).
"""
import argparse
import fnmatch
import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

F32 = np.float32


# ----------------------------------------------------------------------------- checkpoint reading

def _e4m3_table():
    """float32 value of every byte of FP8 e4m3fn (bias 7, no infinity, NaN at 0x7F and 0xFF)."""
    table = np.zeros(256, np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp = (b >> 3) & 0xF
        man = b & 0x7
        if exp == 0xF and man == 0x7:
            table[b] = np.nan
        elif exp == 0:
            table[b] = sign * (man / 8.0) * 2.0 ** -6
        else:
            table[b] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return table


E4M3 = _e4m3_table()
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def e8m0(raw):
    """E8M0 scale bytes -> float32 powers of two (255 is NaN)."""
    out = np.ldexp(np.ones(raw.shape, np.float64), raw.astype(np.int64) - 127).astype(np.float32)
    out[raw == 255] = np.nan
    return out


class Checkpoint:
    """The tensors of an official-format checkpoint, read from the safetensors bytes directly."""

    def __init__(self, path):
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        index = json.loads((self.path / "model.safetensors.index.json").read_text())
        self.where = dict(index["weight_map"])          # tensor name -> shard file
        self._headers = {}

    def has(self, name):
        return name in self.where

    def raw(self, name):
        shard = self.where[name]
        if shard not in self._headers:
            with open(self.path / shard, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                self._headers[shard] = (n, json.loads(f.read(n)))
        n, header = self._headers[shard]
        info = header[name]
        begin, end = info["data_offsets"]
        with open(self.path / shard, "rb") as f:
            f.seek(8 + n + begin)
            data = f.read(end - begin)
        return info["dtype"], info["shape"], data

    def get(self, name):
        """A float32 (or int64) array; quantized weights are dequantized with their `.scale`."""
        dtype, shape, data = self.raw(name)
        if dtype == "BF16":
            u = np.frombuffer(data, "<u2").astype(np.uint32) << 16
            return u.view(np.float32).reshape(shape)
        if dtype == "F32":
            return np.frombuffer(data, "<f4").reshape(shape).astype(F32)
        if dtype == "I64":
            return np.frombuffer(data, "<i8").reshape(shape)
        if dtype == "I32":
            return np.frombuffer(data, "<i4").reshape(shape).astype(np.int64)
        scale_name = name[:-len(".weight")] + ".scale"
        _, sshape, sdata = self.raw(scale_name)
        scale = e8m0(np.frombuffer(sdata, np.uint8).reshape(sshape))
        raw = np.frombuffer(data, np.uint8).reshape(shape)
        if dtype == "F8_E4M3":
            # block (o // 128, i // 128): the block size is fixed at 128, never taken from the grid
            w = E4M3[raw]
            rows = np.arange(shape[0]) // 128
            cols = np.arange(shape[1]) // 128
            return w * scale[rows][:, cols]
        if dtype == "I8":
            # two e2m1 values per byte along the input axis, low nibble first; scale per 1x32
            lo = E2M1[raw & 0xF]
            hi = E2M1[raw >> 4]
            w = np.stack([lo, hi], axis=-1).reshape(shape[0], shape[1] * 2)
            cols = np.arange(w.shape[1]) // 32
            return w * scale[:, cols]
        raise ValueError(f"{name}: unsupported dtype {dtype}")


# ----------------------------------------------------------------------------- primitives

def rms_norm(x, weight, eps):
    x = x.astype(F32)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    return y * weight if weight is not None else y


def sigmoid(x):
    return F32(1) / (F32(1) + np.exp(-x))


def softplus(x):
    # torch's softplus: x itself above the threshold 20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(F32)


def rope_freqs(cfg, compressed, n_pos):
    """Angles [n_pos, r/2] of the rotary dims (M:L199-229): base 10000 without YaRN for layers
    without a compressor, compress_rope_theta with YaRN for the others."""
    r = cfg["qk_rope_head_dim"]
    base = float(cfg["compress_rope_theta"] if compressed else cfg["rope_theta"])
    i = np.arange(0, r, 2, dtype=np.float64)
    freqs = 1.0 / base ** (i / r)
    if compressed:
        ys = cfg["rope_scaling"]
        orig = ys["original_max_position_embeddings"]
        factor = ys["factor"]

        def corr(rot):
            return r * np.log(orig / (rot * 2 * np.pi)) / (2 * np.log(base))

        low = max(np.floor(corr(ys["beta_fast"])), 0)
        high = min(np.ceil(corr(ys["beta_slow"])), r - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(r // 2) - low) / (high - low), 0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    freqs = freqs.astype(F32)
    return np.arange(n_pos, dtype=F32)[:, None] * freqs[None, :]


def rope(x, angles, inverse=False):
    """Rotate adjacent pairs of the last r dims of x [..., d] by angles [..., r/2] (broadcast)."""
    r = angles.shape[-1] * 2
    x = x.copy()
    a = x[..., -r::2]
    b = x[..., -r + 1::2]
    c, s = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
    if inverse:
        s = -s
    ra = a * c - b * s
    rb = a * s + b * c
    x[..., -r::2] = ra
    x[..., -r + 1::2] = rb
    return x


def hadamard(n):
    h = np.ones((1, 1), F32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


# ----------------------------------------------------------------------------- the model

class Model:
    def __init__(self, ckpt_path, swiglu_limit=None):
        self.ck = Checkpoint(ckpt_path)
        c = self.ck.config
        self.cfg = c
        self.dim = c["hidden_size"]
        self.n_layers = c["num_hidden_layers"]
        self.n_hc = c["hc_mult"]
        self.eps = c["rms_norm_eps"]
        self.hc_eps = c["hc_eps"]
        self.ratios = c["compress_ratios"]
        self.window = c["sliding_window"]
        self.n_heads = c["num_attention_heads"]
        self.head_dim = c["head_dim"]
        self.rope_dim = c["qk_rope_head_dim"]
        self.swiglu_limit = c["swiglu_limit"] if swiglu_limit is None else swiglu_limit
        self._cache = {}

    def w(self, name):
        if name not in self._cache:
            self._cache[name] = self.ck.get(name)
        return self._cache[name]

    # --- mHC (M:L674-687, K:L371-438)
    def hc_pre(self, X, p):
        s, n, c = X.shape
        v = X.reshape(s, n * c)
        rho = F32(1) / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + F32(self.eps))
        m = (v @ self.w(p + "_fn").T) * rho
        scale, base = self.w(p + "_scale"), self.w(p + "_base")
        pre = sigmoid(m[:, :n] * scale[0] + base[:n]) + F32(self.hc_eps)
        post = F32(2) * sigmoid(m[:, n:2 * n] * scale[1] + base[n:2 * n])
        logits = (m[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(s, n, n)
        comb = np.exp(logits - logits.max(axis=-1, keepdims=True))
        comb = comb / comb.sum(axis=-1, keepdims=True) + F32(self.hc_eps)
        comb = comb / (comb.sum(axis=1, keepdims=True) + F32(self.hc_eps))
        for _ in range(self.cfg["hc_sinkhorn_iters"] - 1):
            comb = comb / (comb.sum(axis=2, keepdims=True) + F32(self.hc_eps))
            comb = comb / (comb.sum(axis=1, keepdims=True) + F32(self.hc_eps))
        y = np.einsum("sn,snc->sc", pre, X)
        return y.astype(F32), pre, post, comb

    def hc_post(self, x, R, post, comb):
        # new stream k = post_k * x + sum_j comb[j, k] * R_j
        return (post[:, :, None] * x[:, None, :] + np.einsum("sjk,sjc->skc", comb, R)).astype(F32)

    def hc_head(self, X, prefix):
        s, n, c = X.shape
        v = X.reshape(s, n * c)
        rho = F32(1) / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + F32(self.eps))
        m = (v @ self.w(prefix + "hc_head_fn").T) * rho
        pre = sigmoid(m * self.w(prefix + "hc_head_scale")[0] + self.w(prefix + "hc_head_base"))
        pre = pre + F32(self.hc_eps)
        return np.einsum("sn,snc->sc", pre, X).astype(F32)

    # --- compressor (M:L279-377)
    def compressor(self, x, p, m, d, angles, rotate):
        s = x.shape[0]
        n_entries = s // m
        if n_entries == 0:
            return np.zeros((0, d), F32)
        kv = x @ self.w(p + ".wkv.weight").T
        ape = self.w(p + ".ape")
        score = x @ self.w(p + ".wgate.weight").T + ape[np.arange(s) % m]
        out = np.zeros((n_entries, d), F32)
        for i in range(n_entries):
            blk = slice(m * i, m * i + m)
            if m == 4:   # overlap: channels [0:d] of block i-1 and [d:2d] of block i
                kvs, scs = [kv[blk, d:]], [score[blk, d:]]
                if i > 0:
                    prev = slice(m * (i - 1), m * i)
                    kvs.insert(0, kv[prev, :d])
                    scs.insert(0, score[prev, :d])
                kvb, scb = np.concatenate(kvs), np.concatenate(scs)
            else:
                kvb, scb = kv[blk], score[blk]
            wgt = np.exp(scb - scb.max(axis=0, keepdims=True))
            wgt = wgt / wgt.sum(axis=0, keepdims=True)
            out[i] = (wgt * kvb).sum(axis=0)
        out = rms_norm(out, self.w(p + ".norm.weight"), self.eps)
        out = rope(out, angles[np.arange(n_entries) * m])
        if rotate:
            out = (out @ hadamard(d)) * F32(d ** -0.5)
        return out.astype(F32)

    # --- attention (M:L436-543, K:L276-368)
    def attention(self, x, li, p, sites):
        s = x.shape[0]
        h, d, r = self.n_heads, self.head_dim, self.rope_dim
        ratio = self.ratios[li]
        angles = rope_freqs(self.cfg, ratio != 0, s)
        qr = rms_norm(x @ self.w(p + "attn.wq_a.weight").T, self.w(p + "attn.q_norm.weight"), self.eps)
        q = (qr @ self.w(p + "attn.wq_b.weight").T).reshape(s, h, d)
        q = rms_norm(q, None, self.eps)
        q = rope(q, angles[:, None, :])
        sites["attn.q"] = q
        kv = rms_norm(x @ self.w(p + "attn.wkv.weight").T, self.w(p + "attn.kv_norm.weight"), self.eps)
        kv = rope(kv, angles)
        sites["attn.kv"] = kv
        comp = None
        topk = None
        if ratio:
            comp = self.compressor(x, p + "attn.compressor", ratio, d, angles, False)
            sites["attn.compressed_kv"] = comp
        if ratio == 4:
            topk = self.indexer(x, qr, p, s, angles, sites)
        sink = self.w(p + "attn.attn_sink")
        scale = F32(d ** -0.5)
        o = np.zeros((s, h, d), F32)
        for t in range(s):
            idx = np.arange(max(0, t - self.window + 1), t + 1)
            keys = kv[idx]
            if ratio == 4:
                sel = topk[t][topk[t] >= 0]
                keys = np.concatenate([keys, comp[sel]])
            elif ratio:
                keys = np.concatenate([keys, comp[:(t + 1) // ratio]])
            sc = (q[t] @ keys.T) * scale                      # [h, k]
            mx = sc.max(axis=1, keepdims=True)
            e = np.exp(sc - mx)
            den = e.sum(axis=1, keepdims=True) + np.exp(sink[:, None] - mx)
            o[t] = (e @ keys) / den
        o = rope(o, angles[:, None, :], inverse=True)
        g = self.cfg["o_groups"]
        wo_a = self.w(p + "attn.wo_a.weight")
        rank = self.cfg["o_lora_rank"]
        og = o.reshape(s, g, h * d // g)
        u = np.einsum("sgi,goi->sgo", og, wo_a.reshape(g, rank, h * d // g)).reshape(s, g * rank)
        out = u @ self.w(p + "attn.wo_b.weight").T
        sites["attn.out"] = out.astype(F32)
        return out.astype(F32)

    def indexer(self, x, qr, p, s, angles, sites):
        c = self.cfg
        nh, hd = c["index_n_heads"], c["index_head_dim"]
        qi = (qr @ self.w(p + "attn.indexer.wq_b.weight").T).reshape(s, nh, hd)
        qi = rope(qi, angles[:, None, :])
        qi = (qi @ hadamard(hd)) * F32(hd ** -0.5)
        keys = self.compressor(x, p + "attn.indexer.compressor", 4, hd, angles, True)
        wts = (x @ self.w(p + "attn.indexer.weights_proj.weight").T) * F32(hd ** -0.5 * nh ** -0.5)
        n_e = s // 4
        scores = np.einsum("sh,she->se", wts, np.maximum(np.einsum("shd,ed->she", qi, keys), 0))
        visible = 4 * (np.arange(n_e)[None, :] + 1) <= np.arange(s)[:, None] + 1
        scores = np.where(visible, scores, -np.inf).astype(F32)
        k = min(c["index_topk"], n_e)
        topk = np.full((s, k), -1, np.int64)
        for t in range(s):
            order = sorted(range(n_e), key=lambda e: (-scores[t, e], e))[:k]
            chosen = [e for e in order if visible[t, e]]
            topk[t, :len(chosen)] = chosen
        sites["attn.indexer.scores"] = scores
        sites["attn.indexer.topk"] = topk.astype(np.int32)
        return topk

    # --- MoE (M:L546-645)
    def moe(self, x, li, p, tokens, sites):
        c = self.cfg
        a = c["num_experts_per_tok"]
        z = x @ self.w(p + "ffn.gate.weight").T
        sc = np.sqrt(softplus(z)).astype(F32)
        if li < c["num_hash_layers"]:
            ids = self.w(p + "ffn.gate.tid2eid")[np.asarray(tokens)]
        else:
            biased = sc + self.w(p + "ffn.gate.bias")
            sites["ffn.gate_scores"] = biased
            ids = np.array([sorted(range(biased.shape[1]), key=lambda e: (-biased[t, e], e))[:a]
                            for t in range(x.shape[0])], np.int64).reshape(x.shape[0], a)
        wts = np.take_along_axis(sc, ids, axis=1)
        wts = wts / wts.sum(axis=1, keepdims=True) * F32(c["routed_scaling_factor"])
        sites["ffn.expert_ids"] = ids.astype(np.int32)
        sites["ffn.expert_weights"] = wts.astype(F32)
        y = np.zeros_like(x)
        for e in range(c["n_routed_experts"]):
            rows, cols = np.nonzero(ids == e)
            if len(rows) == 0:
                continue
            y[rows] += self.expert(x[rows], p + f"ffn.experts.{e}.", wts[rows, cols][:, None])
        y += self.expert(x, p + "ffn.shared_experts.", None)
        sites["ffn.out"] = y
        return y

    def expert(self, x, p, weight):
        g = x @ self.w(p + "w1.weight").T
        u = x @ self.w(p + "w3.weight").T
        lim = F32(self.swiglu_limit)
        if lim > 0:
            u = np.clip(u, -lim, lim)
            g = np.minimum(g, lim)
        hmid = g * sigmoid(g) * u
        if weight is not None:
            hmid = hmid * weight
        return (hmid @ self.w(p + "w2.weight").T).astype(F32)

    # --- one block (M:L648-701)
    def block(self, X, li, p, tokens, sites, prefix):
        loc = {}
        R = X
        y, pre, post, comb = self.hc_pre(X, p + "hc_attn")
        sites[prefix + "hc_attn.pre"], sites[prefix + "hc_attn.post"] = pre, post
        sites[prefix + "hc_attn.comb"] = comb
        y = rms_norm(y, self.w(p + "attn_norm.weight"), self.eps)
        out = self.attention(y, li, p, loc)
        X = self.hc_post(out, R, post, comb)
        sites[prefix + "hc_attn.out"] = X
        R = X
        y, pre, post, comb = self.hc_pre(X, p + "hc_ffn")
        sites[prefix + "hc_ffn.pre"], sites[prefix + "hc_ffn.post"] = pre, post
        sites[prefix + "hc_ffn.comb"] = comb
        y = rms_norm(y, self.w(p + "ffn_norm.weight"), self.eps)
        out = self.moe(y, li, p, tokens, loc)
        X = self.hc_post(out, R, post, comb)
        for k, v in loc.items():
            sites[prefix + k] = v
        sites[prefix + "out"] = X
        return X

    def forward(self, tokens):
        vocab = self.cfg["vocab_size"]
        if not tokens or any(not 0 <= t < vocab for t in tokens):
            raise ValueError(f"tokens must be a non-empty list of ids in [0, {vocab})")
        sites = {}
        emb = self.w("embed.weight")[np.asarray(tokens)]
        sites["embed"] = emb
        X = np.repeat(emb[:, None, :], self.n_hc, axis=1).astype(F32)
        for li in range(self.n_layers):
            X = self.block(X, li, f"layers.{li}.", tokens, sites, f"layers.{li}.")
        final = rms_norm(self.hc_head(X, ""), self.w("norm.weight"), self.eps)
        sites["final.x"] = final
        head = self.w("head.weight")
        sites["logits"] = (final @ head.T).astype(F32)
        if len(tokens) > 1 and self.ck.has("mtp.0.e_proj.weight"):
            self.mtp(X, tokens, sites, head)
        return sites

    # --- MTP block (M:L739-767): row t pairs the final streams of t with token t + 1
    def mtp(self, X, tokens, sites, head):
        p = "mtp.0."
        e = rms_norm(self.w("embed.weight")[np.asarray(tokens[1:])], self.w(p + "enorm.weight"), self.eps)
        hs = rms_norm(X[:-1], self.w(p + "hnorm.weight"), self.eps)
        Y = (e @ self.w(p + "e_proj.weight").T)[:, None, :] + hs @ self.w(p + "h_proj.weight").T
        li = self.n_layers
        Y = self.block(Y.astype(F32), li, p, tokens[1:], sites, f"layers.{li}.")
        final = rms_norm(self.hc_head(Y, p), self.w(p + "norm.weight"), self.eps)
        sites["mtp.final.x"] = final
        sites["mtp.logits"] = (final @ head.T).astype(F32)


def write_trace(path, tokens, sites, n_layers, implementation="independent float32 (tests/independent)"):
    meta = {"format_version": 1, "precision": "float32", "tokens": [int(t) for t in tokens],
            "n_layers": n_layers, "implementation": implementation}
    save_file({k: np.ascontiguousarray(v) for k, v in sites.items()}, str(path),
              metadata={"refimpl": json.dumps(meta)})


def run(ckpt, tokens, out, swiglu_limit=None, sites_only=None):
    model = Model(ckpt, swiglu_limit)
    sites = model.forward(list(tokens))
    if sites_only:
        sites = {k: v for k, v in sites.items() if any(fnmatch.fnmatch(k, g) for g in sites_only)}
    sites = {k: (v.astype(F32) if v.dtype.kind == "f" else v) for k, v in sites.items()}
    write_trace(out, tokens, sites, model.n_layers)
    return sites


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--tokens", help="comma-separated token ids")
    ap.add_argument("--golden", help="a golden-set folder (with manifest.json); with --input")
    ap.add_argument("--input", help="the golden input whose tokens (and config override) to run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--swiglu-limit", type=float, default=None)
    ap.add_argument("--sites-only", default=None, help="comma-separated globs of sites to write")
    args = ap.parse_args(argv)
    limit = args.swiglu_limit
    try:
        if args.golden or args.input:
            if not (args.golden and args.input) or args.tokens:
                ap.error("--golden and --input go together, without --tokens")
            manifest = json.loads((Path(args.golden) / "manifest.json").read_text())
            case = next((i for i in manifest["inputs"] if i["name"] == args.input), None)
            if case is None:
                ap.error(f"no input {args.input!r} in the manifest: "
                         + ", ".join(i["name"] for i in manifest["inputs"]))
            tokens = manifest["tokens"][:case["length"]]
            if limit is None:
                limit = (case.get("config") or {}).get("swiglu_limit")
        elif args.tokens:
            tokens = [int(t) for t in args.tokens.split(",")]
        else:
            ap.error("give --tokens, or --golden and --input")
        if not tokens:
            ap.error("no tokens")
        run(args.ckpt, tokens, args.out, limit, args.sites_only.split(",") if args.sites_only else None)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise SystemExit(f"v4_float32: error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
