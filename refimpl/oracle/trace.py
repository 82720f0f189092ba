"""Named intermediate tensors ("sites") of a forward pass, recorded on request.

A trace costs nothing when unused: every site is recorded through `record(trace, name, x)`,
which returns at once when `trace` is None. Site names follow the official code (README table).
A trace file is a safetensors file, one tensor per site, plus JSON metadata.
"""
from __future__ import annotations

import fnmatch
import json

import numpy as np

# The stable sites, in data-flow order ({i} = layer index). See README "Trace sites".
SITES = (
    "embed",                                   # [s, c]
    "layers.{i}.hc_attn.pre", "layers.{i}.hc_attn.post", "layers.{i}.hc_attn.comb",   # mHC mixes, attention
    "layers.{i}.attn.q",                       # [s, h, d] after norm + RoPE
    "layers.{i}.attn.kv",                      # [s, d] after norm + RoPE (+ QDQ in mirror)
    "layers.{i}.attn.compressed_kv",           # [s//m, d] entries completed in this call
    "layers.{i}.attn.indexer.scores",          # [s, s//4] (-inf where not visible)
    "layers.{i}.attn.indexer.topk",            # [s, k] int32, -1 padding
    "layers.{i}.attn.out",                     # [s, c] after wo_b
    "layers.{i}.hc_ffn.pre", "layers.{i}.hc_ffn.post", "layers.{i}.hc_ffn.comb",
    "layers.{i}.ffn.expert_ids",               # [s, a] int32
    "layers.{i}.ffn.expert_weights",           # [s, a]
    "layers.{i}.ffn.out",                      # [s, c]
    "layers.{i}.out",                          # [s, n, c] residual streams after block i
    "final.x",                                 # [s, c] after hc_head + norm
    "logits",                                  # [s, v] every position
    "mtp.logits",                              # [s-1, v] MTP predictions of token t+2
)


class Trace:
    """Collects site tensors of one forward pass (batch element 0), filtered by glob patterns."""

    def __init__(self, patterns: tuple[str, ...] = ("*",)):
        self.patterns = tuple(patterns)
        self.tensors: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            x = np.asarray(x)
            self.tensors[name] = np.ascontiguousarray(x[0])   # every site has a batch axis; keep element 0

    def save(self, path, metadata: dict) -> None:
        """Write the trace as safetensors (written to a temporary name, then renamed)."""
        import os
        from safetensors.numpy import save_file
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, tmp,
                  metadata={"refimpl": json.dumps(metadata, sort_keys=True)})
        os.replace(tmp, path)


def record(trace: Trace | None, name: str, x) -> None:
    """Record a site tensor; a no-op when trace is None."""
    if trace is not None:
        trace.record(name, x)
