"""The model: every V4 component as a NumPy function, in data-flow order.

Reading order: `linear` (the products and their rounding) → `norm` → `rope` → `hyperconn`
(mHC) → `compressor` → `indexer` → `attention` (CSA / HCA / window) → `moe` → `block` (one
layer) → `transformer` (embed → blocks → head, MTP, `Model`) → `state` (what decode carries).
Nothing here reads files: `refimpl.formats.weights` builds the weight dataclasses from a checkpoint.
"""
