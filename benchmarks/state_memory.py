"""Decode-state bytes per token at Flash dimensions, measured, against the arithmetic of docs/architecture.md §15.

The state must grow by the compressed entries only (plus the fixed window and compressor rows):
per CSA layer one main entry (head_dim) and one index key (index_head_dim) per 4 tokens, per HCA
layer one entry per 128 tokens. In bf16 that is (512+128)·2/4 = 320 B per CSA layer and
512·2/128 = 8 B per HCA layer per token: 21·320 + 20·8 = 6880 B ≈ 6.9 KB per token for Flash.

The measurement writes a Flash-dimension checkpoint with 4 layers (SWA, SWA, CSA, HCA), 8 experts
and a small vocabulary (neither changes the attention state), prefills 128 tokens, then 256 more
as a second chunk, and takes the growth of `State.nbytes()` per layer type. Run:
    python benchmarks/state_memory.py [--precision mirror] [--dir /tmp/flash-state]
"""
import argparse
import time
from pathlib import Path

import numpy as np

from refimpl.config import Config
from refimpl.formats.weights import load
from refimpl.synthetic.writer import make_checkpoint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="mirror")
    ap.add_argument("--dir", default="/tmp/refimpl-flash-state")
    a = ap.parse_args()
    path = Path(a.dir)
    cfg = Config.flash().replace(vocab_size=1280)
    if not (path / "config.json").exists():
        make_checkpoint(cfg, path, seed=0, layers=4, experts=8)
    model = load(path, precision=a.precision)
    rng = np.random.default_rng(0)
    n1, n2 = 128, 256
    t0 = time.perf_counter()
    _, s1 = model.prefill(rng.integers(0, cfg.vocab_size, n1))
    _, s2 = model.prefill(rng.integers(0, cfg.vocab_size, n2), s1)     # chunked prefill from position 128
    secs = time.perf_counter() - t0
    kinds = {0: "SWA", 4: "CSA"}
    per = {}
    for i, (l1, l2) in enumerate(zip(s1.layers, s2.layers)):
        kind = kinds.get(model.cfg.compress_ratio(i), "HCA")
        per[kind] = (l2.nbytes() - l1.nbytes()) / n2
        print(f"layer {i} ({kind}): {l1.nbytes():,} B at {n1} tokens, {l2.nbytes():,} B at {n1 + n2}: "
              f"{per[kind]:.1f} B/token")
    flash = Config.flash()
    n_csa = sum(r == 4 for r in flash.compress_ratios[:flash.n_layers])
    n_hca = sum(r > 4 for r in flash.compress_ratios[:flash.n_layers])
    measured = n_csa * per["CSA"] + n_hca * per["HCA"] + (flash.n_layers - n_csa - n_hca) * per["SWA"]
    spec = n_csa * (flash.head_dim + flash.index_head_dim) * 2 / 4 + n_hca * flash.head_dim * 2 / 128
    print(f"Flash ({n_csa} CSA, {n_hca} HCA layers), precision {a.precision}: {measured:.0f} B/token measured, "
          f"{spec:.0f} B/token by the spec's bf16 arithmetic (ratio {measured / spec:.3f}); "
          f"fixed part at {n1 + n2} tokens: window + compressor rows; prefill time {secs:.0f} s")


if __name__ == "__main__":
    main()
