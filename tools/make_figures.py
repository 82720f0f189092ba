"""Make the pictures of docs/architecture.md.

    python tools/make_figures.py [OUT_DIR] [--only NAME ...]   (default: docs/figures, every picture;
                                                               needs the `plot` extra)

    block_dataflow.png  the data flow through one block: the n = 4 residual streams, mHC, attention
                        with its three index sets, the MoE (a diagram; needs no model run)
    index_sets.png      the rows of the KV tensor each query attends, in a window-only (0), a CSA
                        (2: ratio 4, indexer top-k) and an HCA (3: the tiny preset's ratio 16) layer
    mhc_mixes.png       the mHC mixes of layer 2's attention sublayer: pre and post per position,
                        comb at the last position

The last two come from the built-in tiny model: the script writes a random-weight tiny checkpoint
(seed 0) to a temporary directory and runs one mirror-mode forward pass over a fixed 100-token
prompt with a trace.

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



# ---------------------------------------------------------------- the data flow through one block

# fill colours by kind of step
MHC, NORM, FP8, FP4, DENSE, ATTN, SETS, ROUTE, SUM = ("#e4d7f5", "0.88", "#fbd9b0", "#f6b8b8", "#d6e6f5",
                                                      "#b9d3ee", "#cfeadf", "#e8f2c8", "0.95")


def _box(ax, x, y, w, h, text, color, size=7.5, bold_first=True):
    """A rounded box centred at (x, y); the first line of the text in bold."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.25,rounding_size=0.8",
                                fc=color, ec="0.25", lw=0.8, zorder=2))
    lines = text.split("\n")
    if bold_first and len(lines) > 1:
        step = h / (len(lines) + 0.6)
        top = y + step * (len(lines) - 1) / 2
        for k, line in enumerate(lines):
            ax.text(x, top - k * step, line, ha="center", va="center", fontsize=size, zorder=3,
                    weight="bold" if k == 0 else "normal")
    else:
        ax.text(x, y, text, ha="center", va="center", fontsize=size, zorder=3,
                weight="bold" if bold_first else "normal")


def _arrow(ax, a, b, label=None, dashed=False, rad=0.0, label_at=0.5, dx=0.8, dy=0.0):
    from matplotlib.patches import FancyArrowPatch
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=9, lw=0.9, color="0.2", zorder=1,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=0, shrinkB=0))
    if label:
        lx, ly = a[0] + (b[0] - a[0]) * label_at + dx, a[1] + (b[1] - a[1]) * label_at + dy
        ax.text(lx, ly, label, fontsize=6.5, style="italic", color="0.3", ha="left", va="center", zorder=3)


def _site(ax, x, y, text, ha="left"):
    """A trace site name (docs/trace-format.md), in grey."""
    ax.text(x, y, text, fontsize=6.5, family="monospace", color="#6a6a6a", ha=ha, va="center", zorder=3)


def draw_block_dataflow(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 15))
    ax.set_xlim(0, 110)
    ax.set_ylim(17, 153)
    ax.axis("off")
    ax.set_title("The data flow through one block of DeepSeek V4 Flash (docs/architecture.md §7-§12)",
                 fontsize=11, weight="bold")

    # the two sublayers, shaded
    from matplotlib.patches import Rectangle
    for y0, y1, name in ((72.5, 148.5, "attention sublayer"), (25.5, 71.5, "MoE sublayer")):
        ax.add_patch(Rectangle((9, y0), 100, y1 - y0, fc="0.975", ec="0.8", lw=0.8, zorder=0))
        ax.text(108, y1 - 1.2, name, ha="right", va="top", fontsize=9, color="0.35", weight="bold")

    # the n = 4 residual streams run down the left edge
    for k, x in enumerate((2.0, 3.6, 5.2, 6.8)):
        ax.plot([x, x], [149.5, 21], color="#7b5ea7", lw=1.6, zorder=1)
        ax.text(x, 150.3, str(k), ha="center", va="bottom", fontsize=7, color="#7b5ea7")
    ax.text(1.2, 152.3, "n = 4 residual streams [s, n, c], bf16", fontsize=8, color="#7b5ea7", va="bottom")
    ax.annotate("", xy=(4.4, 18), xytext=(4.4, 21), arrowprops={"arrowstyle": "-|>", "color": "#7b5ea7"})
    ax.text(8.5, 19.5, "to the next block", fontsize=7.5, color="#7b5ea7", va="center")
    _site(ax, 8.5, 22.5, "layers.{i}.out")

    def mhc_pair(y_pre, y_post, which, norm):
        _box(ax, 57, y_pre, 62, 6.2,
             f"hc_pre (hc_{which}_fn, _base, _scale)\n"
             "mixes = (flatten(streams) · fnᵀ) / rms over all n·c values;  pre = sigmoid + eps,  "
             "post = 2·sigmoid,  comb = Sinkhorn\n"
             "x = Σ_j pre_j · stream_j", MHC)
        _arrow(ax, (7.2, y_pre), (25.7, y_pre), "collapse")
        _site(ax, 88.5, y_pre + 2, f"{'hc_attn' if which == 'attn' else 'hc_ffn'}.pre / .post / .comb")
        _box(ax, 57, y_pre - 6.8, 24, 3, f"{norm} (RMSNorm)", NORM, bold_first=False)
        _arrow(ax, (57, y_pre - 3.3), (57, y_pre - 5.3))
        _box(ax, 57, y_post, 62, 4.2,
             "hc_post (post and comb from hc_pre)\n"
             "new stream k = post_k · y + Σ_j comb[j, k] · stream_j   (a column of comb)", MHC)
        _arrow(ax, (25.7, y_post), (7.2, y_post), "spread", label_at=0.25, dy=1.0)

    # ------------------------------------------------------------ attention
    mhc_pair(143.5, 76.5, "attn", "attn_norm")
    top = 135.2                                                   # the bottom of attn_norm's box
    qx, kx, cx, ix = 46, 68, 93, 20
    for x in (qx, kx, cx):
        _arrow(ax, (57 if x == qx else 62 if x == kx else 69, top), (x, 131.2 if x != cx else 131.9))
    _arrow(ax, (45, 135.7), (ix, 124.4), "x")

    steps_q = [("wq_a (FP8)", FP8), ("q_norm (RMSNorm) → qr [s, q]", NORM), ("wq_b (FP8) → [s, h, d]", FP8),
               ("head norm (weightless, bf16 ops)", NORM), ("RoPE (last p dims, adjacent pairs)", DENSE)]
    steps_kv = [("wkv (FP8)", FP8), ("kv_norm (RMSNorm)", NORM), ("RoPE (last p dims)", DENSE),
                ("FP8 QDQ of dims 0..d−p (block 64)", FP8)]
    for x, steps in ((qx, steps_q), (kx, steps_kv)):
        for k, (text, color) in enumerate(steps):
            y = 129.5 - 4.4 * k
            _box(ax, x, y, 19.5, 2.9, text, color, size=7, bold_first=False)
            if k:
                _arrow(ax, (x, y + 2.95), (x, y + 1.45))
    ax.text(qx, 133.2, "query path", ha="center", fontsize=8, weight="bold", color="0.3")
    ax.text(kx, 133.2, "key/value path", ha="center", fontsize=8, weight="bold", color="0.3")
    _site(ax, qx + 10.2, 111.9, "attn.q")
    _site(ax, kx + 10.2, 114.6, "attn.kv  (K = V)")
    _box(ax, cx, 126.0, 24, 10.5,
         "compressor\nCSA: m = 4, HCA: m = 128\nkv = x·wkvᵀ, score = x·wgateᵀ + ape\n"
         "gated pooling of m tokens → entry\nnorm, RoPE at position m·i, FP8 QDQ", DENSE, size=6.8)
    _site(ax, cx, 119.6, "attn.compressed_kv", ha="center")
    _box(ax, ix, 117.5, 22, 13,
         "lightning indexer (CSA)\nqI = wq_b(qr) per head, RoPE,\nHadamard, FP4 QDQ\n"
         "keys: its own compressor (m = 4),\nHadamard, FP4 QDQ\nI[t, e] = Σ_h w_h · ReLU(qI_h · K_e)",
         SETS, size=6.8)
    _arrow(ax, (qx - 9.8, 124.4), (ix + 11.2, 121.5), "qr", label_at=0.5, dx=-1.0, dy=1.6)
    _site(ax, ix, 109.9, "attn.indexer.scores / .topk", ha="center")

    # the three index sets
    ax.text(57, 107.6, "the index set of query t: (1) + nothing (window-only layers), (1) + (2) (HCA) or "
            "(1) + (3) (CSA)", ha="center", fontsize=7.5, color="0.25", weight="bold", zorder=3,
            bbox={"fc": "0.975", "ec": "none", "pad": 1.5})
    _box(ax, kx, 103, 20, 5, "(1) sliding window\nthe raw KV of positions\nmax(0, t−W+1) .. t", SETS, size=6.8)
    _box(ax, cx, 103, 24, 5, "(2) HCA: every visible\ncompressed entry\n(entry i once m·(i+1) ≤ t+1)",
         SETS, size=6.8)
    _box(ax, ix, 103, 22, 5, "(3) CSA: the indexer's top-k\n(index_topk) of the visible\nentries of the compressor",
         SETS, size=6.8)
    _arrow(ax, (kx, 114.65), (kx, 105.55))
    _arrow(ax, (cx, 120.75), (cx, 105.55))
    _arrow(ax, (ix, 111.0), (ix, 105.55))

    _box(ax, 57, 93, 76, 7,
         "sparse attention with a sink (per query t, head h, over its index set J)\n"
         "o = Σ_j exp(s_j − M) · kv_j / (Σ_j exp(s_j − M) + exp(sink_h − M)),   s_j = d^-½ · q · kv_j,  "
         "M = max_j s_j (sink not in the max)\n"
         "mirror: the official kernel's online softmax over blocks of 64 index entries, bf16 probabilities",
         ATTN, size=7)
    _arrow(ax, (qx, 128.0 - 4.4 * 4 + 0.1), (qx, 96.7))
    for x in (ix, kx, cx):
        _arrow(ax, (x, 100.4), (x if x != cx else 90, 96.7))
    _box(ax, 30, 84.3, 22, 3.2, "inverse RoPE (query position)", DENSE, size=7, bold_first=False)
    _box(ax, 57, 84.3, 24, 3.2, "grouped wo_a (bf16, g groups)", DENSE, size=7, bold_first=False)
    _box(ax, 82, 84.3, 17, 3.2, "wo_b (FP8)", FP8, size=7, bold_first=False)
    _arrow(ax, (30, 89.4), (30, 86.0))
    _arrow(ax, (41.2, 84.3), (44.8, 84.3))
    _arrow(ax, (69.2, 84.3), (73.3, 84.3))
    _arrow(ax, (82, 82.6), (70, 78.7), "y", label_at=0.4)
    _site(ax, 91.2, 84.3, "attn.out")

    # ------------------------------------------------------------ MoE
    mhc_pair(66.2, 29.5, "ffn", "ffn_norm")
    _box(ax, 28, 47.5, 34, 11,
         "router (gate)\nz = x · gateᵀ (fp32);  sc = sqrt(softplus(z))\n"
         "ids: hash layers tid2eid[token],\nothers top-a(sc + bias): the bias only chooses\n"
         "weights = sc[ids] / Σ sc[ids] · route_scale", ROUTE, size=7)
    _site(ax, 28, 40.8, "ffn.gate_scores, .expert_ids, .expert_weights", ha="center")
    for k in (2, 1, 0):                                                      # a stack of experts
        _box(ax, 66 + 0.8 * k, 47.5 + 0.8 * k, 30, 9,
             "" if k else "routed experts (FP4), a of e\n"
             "h = weight · silu(min(w1 x, L)) · clamp(w3 x, −L, L)\nexpert = w2(bf16(h))\n(weight inside w2's FP8 input)",
             FP4, size=7)
    _box(ax, 96, 47.5, 17, 9, "shared expert\n(FP8)\nno routing weight;\nclamp in the\ncurrent revision",
         FP8, size=7)
    _arrow(ax, (52, 57.8), (30, 53.2))
    _arrow(ax, (57, 57.8), (64, 53.2))
    _arrow(ax, (63, 57.8), (93, 52.3))
    _arrow(ax, (45.2, 47.5), (50.8, 47.5))
    ax.text(48, 49.8, "ids,\nweights", fontsize=6.5, style="italic", color="0.3", ha="center", va="center")
    _box(ax, 72, 36.5, 44, 4, "Σ over the chosen experts in ascending id, shared expert last (fp32) → bf16",
         SUM, size=7, bold_first=False)
    _arrow(ax, (66, 42.8), (66, 38.6))
    _arrow(ax, (96, 42.8), (90, 38.6))
    _arrow(ax, (72, 34.4), (64, 31.7), "y", label_at=0.5)
    _site(ax, 94.5, 33.4, "ffn.out", ha="left")

    # legend of the colours
    from matplotlib.patches import Patch
    legend = [(MHC, "mHC"), (NORM, "norm"), (FP8, "FP8 product / QDQ"), (FP4, "FP4 product"),
              (DENSE, "bf16 / fp32 product, RoPE, pooling"), (SETS, "index sets"), (ATTN, "attention"),
              (ROUTE, "routing")]
    ax.legend([Patch(fc=c, ec="0.25") for c, _ in legend], [t for _, t in legend], loc="lower right",
              ncol=4, fontsize=7, frameon=False, bbox_to_anchor=(1.0, -0.005))
    ax.text(16, 18.3, "grey monospace: trace sites (docs/trace-format.md)", fontsize=7, color="#6a6a6a")
    fig.tight_layout()
    fig.savefig(out / "block_dataflow.png", **PNG)
    plt.close(fig)


FIGURES = ("block_dataflow", "index_sets", "mhc_mixes")


def main(argv: list[str]) -> int:
    only = set(argv[argv.index("--only") + 1:]) if "--only" in argv else set(FIGURES)
    rest = argv[:argv.index("--only")] if "--only" in argv else argv
    if not only or only - set(FIGURES):
        print(f"--only takes some of {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    out = Path(rest[0]) if rest else Path(__file__).resolve().parents[1] / "docs" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    if "block_dataflow" in only:
        draw_block_dataflow(out)
    if only & {"index_sets", "mhc_mixes"}:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, tensors = run_tiny(Path(tmp))
        if "index_sets" in only:
            draw_index_sets(cfg, tensors, out)
        if "mhc_mixes" in only:
            draw_mhc(cfg, tensors, out)
    for name in sorted(only):
        f = out / f"{name}.png"
        print(f"{f}  {f.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
