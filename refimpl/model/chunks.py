"""Position chunks of a many-token call: the row-wise work of a prefill taken a slice of positions at a time.

A prefill of s tokens holds every position's activations at once; most of the work is row-wise
(each position's result depends on that position's row only): the mHC mixes (hc_pre / hc_post),
the norms, the projections, the MoE, the queries and their sparse attention over the full keys,
the head. `block`, `attention` and the head take that work in chunks of positions (`spans`), so
that the largest temporaries (hc_post's [rows, n, n, c], the queries [rows, h, d], the head's
float64 [rows, vocab] inside its product, taken in spans of HEAD_ROWS positions and slices of the
vocabulary: the head's weight is read once per span) exist for one chunk at a time. A prefill (which
returns no streams) lets go of the final streams before the head's product. The index layout is the
call's (window_width of the whole call), never a chunk's: a chunk changes no index set.

Results. In float64 and mirror every product is independent of the number of rows in the call
(model/linear.py; the kernels keep it), and every other row-wise step is elementwise per row, so a
chunk size changes no bit (tests/model/test_chunks.py forces chunks of a few rows). In float32 the
many-row products are one float32 BLAS product (sgemm) whose last bits can change with the row
count, and products of fewer than 16 rows take the kernels' fixed-order path: a chunk size can
change float32 results in the last bits (within the float32 tolerance profile); with a given
chunk size they are deterministic.

Knobs (module constants; tests set them): ROWS positions per chunk at most, and BYTES, the size a
chunk's largest temporary is held under (fewer rows where a row is wide).
"""
from __future__ import annotations

import copy

import numpy as np

from refimpl.sites import Recording

ROWS = 2048          # positions per chunk at most (the MoE half: its experts decode their weights once per chunk)
BYTES = 1 << 27      # a chunk's largest temporary stays under this (128 MiB), e.g. the head's float64 [rows, vocab]
COLUMNS = 2048       # the head's vocabulary is split at multiples of this (the products' weight slices: 512 / 2048 rows)
HEAD_ROWS = 1024     # the head's product takes positions in spans of at most this many (its float64 copy of the
                     # input and its panels' [rows, 512] products grow with them; each span reads the head once)


def columns(n: int, column_bytes: int) -> list[tuple[int, int]]:
    """Chunks (lo, hi) of a weight's n output rows (the head's vocabulary): multiples of COLUMNS rows,
    at most BYTES / column_bytes of them (at least COLUMNS)."""
    step = max(COLUMNS, BYTES // max(1, column_bytes) // COLUMNS * COLUMNS)
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def spans(s: int, row_bytes: int = 0, *, most: int | None = None) -> list[tuple[int, int]]:
    """Chunks (lo, hi) of positions 0..s-1: ROWS (or `most`, if fewer) at most, and at most BYTES / row_bytes
    (at least 1)."""
    rows = ROWS if most is None else min(ROWS, most)
    rows = rows if row_bytes <= 0 else min(rows, BYTES // row_bytes)
    rows = max(1, int(rows))
    return [(lo, min(s, lo + rows)) for lo in range(0, s, rows)]


class Pieces(Recording):
    """A recording of the sites of a call taken in chunks: each chunk's tensor kept, all of them joined
    along the positions (axis 1) and handed to the call's own recording by `close`."""

    def __init__(self, trace):
        super().__init__(trace.patterns if isinstance(trace, Recording) else ("*",))
        self.trace = trace
        self.pieces: dict[str, list[np.ndarray]] = {}

    def wants(self, name: str) -> bool:
        return self.trace.wants(name)

    def record(self, name: str, x: np.ndarray) -> None:
        if self.wants(name):
            self.pieces.setdefault(name, []).append(np.asarray(x))

    def close(self) -> None:
        for name, parts in self.pieces.items():
            self.trace.record(name, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1))
        self.pieces = {}


def chunked(ctx):
    """(ctx for the chunks, finish): the chunks record their sites into pieces, finish() joins them into
    ctx.trace. Without a trace, ctx itself and a no-op."""
    if ctx.trace is None:
        return ctx, lambda: None
    pieces = Pieces(ctx.trace)
    sub = copy.copy(ctx)                         # the same options and replay, checked once already (context.py)
    object.__setattr__(sub, "trace", pieces)
    return sub, pieces.close
