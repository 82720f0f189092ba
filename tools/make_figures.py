"""Make the pictures of docs/architecture.md from the built-in tiny model.

    python tools/make_figures.py [OUT_DIR]        (default: docs/figures; needs the `plot` extra)

Writes a random-weight tiny checkpoint (seed 0) to a temporary directory, runs one mirror-mode
forward pass over a fixed 100-token prompt with a trace, and draws:

    index_sets.png   the rows of the KV tensor each query attends, in a window-only (0), a CSA
                     (2: ratio 4, indexer top-k) and an HCA (3: the tiny preset's ratio 16) layer
    mhc_mixes.png    the mHC mixes of layer 2's attention sublayer: pre and post per position,
                     comb at the last position

The script is deterministic: the same versions of refimpl, NumPy and matplotlib give the same
bytes.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt                                   # noqa: E402
import numpy as np                                                # noqa: E402
from matplotlib.colors import ListedColormap                      # noqa: E402

import refimpl                                                    # noqa: E402
from refimpl.config import Config                                 # noqa: E402
from refimpl.oracle.trace import Trace                            # noqa: E402
from refimpl.synthetic.writer import make_checkpoint              # noqa: E402

PROMPT_LEN = 100
LAYERS = {0: "layer 0, window only", 2: "layer 2, CSA", 3: "layer 3, HCA"}
# cell values of the index-set matrix
NONE, WINDOW, VISIBLE, ATTENDED = 0, 1, 2, 3
COLORS = ListedColormap(["white", "0.55", "#b9d3ee", "#1f4e9c"])
PNG = {"dpi": 110, "metadata": {"Software": None}}


def run_tiny(workdir: Path):
    cfg = make_checkpoint(Config.tiny(), workdir / "tiny", seed=0, progress=False)
    model = refimpl.load(workdir / "tiny", precision="mirror")
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, PROMPT_LEN).tolist()
    trace = Trace(("layers.*.attn.indexer.topk", "layers.*.hc_attn.*"))
    model.forward(tokens, trace=trace)
    return cfg, trace.tensors


def index_set(cfg: Config, layer: int, s: int, topk: np.ndarray | None) -> np.ndarray:
    """[s, s] window cells and, for a compressed layer, [s, s] entry cells (None otherwise).

    Entry e is drawn over the m token columns of its block (m·e .. m·e+m-1), so both halves share
    the position axis.
    """
    m, W = cfg.compress_ratio(layer), cfg.window_size
    window = np.full((s, s), NONE, np.int8)
    entries = np.full((s, s), NONE, np.int8) if m else None
    for t in range(s):
        window[t, max(0, t - W + 1):t + 1] = WINDOW
        if not m:
            continue
        visible = (t + 1) // m                           # entries 0 .. visible-1 are complete
        entries[t, :visible * m] = VISIBLE if topk is not None else ATTENDED
        if topk is not None:
            for e in topk[t][topk[t] >= 0]:
                entries[t, e * m:(e + 1) * m] = ATTENDED
    return window, entries


def draw_index_sets(cfg: Config, tensors: dict, out: Path) -> None:
    s = PROMPT_LEN
    fig, axes = plt.subplots(1, 5, figsize=(14, 3.9), sharey=True)
    panels = []
    for layer, title in LAYERS.items():
        window, entries = index_set(cfg, layer, s, tensors.get(f"layers.{layer}.attn.indexer.topk"))
        panels.append((window, f"{title}:\nwindow rows"))
        if entries is not None:
            panels.append((entries, f"{title}:\ncompressed entries (over their blocks)"))
    for ax, (grid, title) in zip(axes, panels):
        ax.imshow(grid, cmap=COLORS, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("key position", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("query position", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS(i)) for i in (WINDOW, VISIBLE, ATTENDED)]
    fig.legend(handles, ["window position (raw KV row)", "compressed entry, complete, not selected",
                         "compressed entry attended"], loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"What each query attends in a {s}-token prefill (tiny model: window {cfg.window_size}, "
                 f"CSA ratio 4 with top-{cfg.index_topk}, HCA ratio 16)", fontsize=10)
    fig.tight_layout(rect=(0, 0.09, 1, 0.95))
    fig.savefig(out / "index_sets.png", **PNG)
    plt.close(fig)


def draw_mhc(cfg: Config, tensors: dict, out: Path, layer: int = 2) -> None:
    pre, post, comb = (tensors[f"layers.{layer}.hc_attn.{k}"] for k in ("pre", "post", "comb"))
    n = cfg.hc_mult
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 3, 2]})
    for ax, data, name, vmax in ((axes[0], pre, "pre (sigmoid + eps)", 1), (axes[1], post, "post (2 sigmoid)", 2)):
        im = ax.imshow(data.T, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name}, per position", fontsize=9)
        ax.set_xlabel("position", fontsize=8)
        ax.set_ylabel("stream", fontsize=8)
        ax.set_yticks(range(n))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04)
    last = comb[-1]
    im = axes[2].imshow(last, cmap="viridis", vmin=0, vmax=1)
    for j in range(n):
        for k in range(n):
            axes[2].text(k, j, f"{last[j, k]:.2f}", ha="center", va="center", fontsize=7,
                         color="white" if last[j, k] < 0.5 else "black")
    axes[2].set_title(f"comb at position {len(comb) - 1}", fontsize=9)
    axes[2].set_xlabel("new stream k (column sums = 1)", fontsize=8)
    axes[2].set_ylabel("old stream j", fontsize=8)
    axes[2].set_xticks(range(n))
    axes[2].set_yticks(range(n))
    axes[2].tick_params(labelsize=7)
    fig.suptitle(f"mHC mixes of layer {layer}'s attention sublayer (tiny model, random weights)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out / "mhc_mixes.png", **PNG)
    plt.close(fig)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, tensors = run_tiny(Path(tmp))
    draw_index_sets(cfg, tensors, out)
    draw_mhc(cfg, tensors, out)
    for f in sorted(out.glob("*.png")):
        print(f"{f}  {f.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
