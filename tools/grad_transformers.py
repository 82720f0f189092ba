"""Hugging Face transformers' DeepSeek V4 with PyTorch autograd as a gradient peer of refimpl.grad.

Loads an official-format checkpoint with transformers' own loader (as tools/trace_transformers.py
does), in float64 with the eager experts (the grouped-matmul experts take no float64), runs one
prefill with autograd, takes the main head's next-token cross-entropy and its backward, and writes
a gradient trace (docs/gradients.md) in refimpl's names: every parameter transformers builds
(`grad.<checkpoint name>`, the routed experts' stacked matrices split back per expert) and the
sites its modules expose (embed, layers.i.attn.out, layers.i.ffn.out, layers.i.out, final.x,
logits). `check` also runs refimpl's backward and prints the comparison.

    python tools/grad_transformers.py trace CKPT --tokens 40,41,... --out hf-grad.safetensors
    python tools/grad_transformers.py check CKPT --tokens 40,41,...
    refimpl trace CKPT --tokens 40,41,... --grad main --out ref-grad.safetensors
    refimpl compare hf-grad.safetensors ref-grad.safetensors --rtol 2e-5     # --json: every gradient's error

What transformers computes is not all float64: its DeepSeek V4 casts to float32 inside the RMS
norms, the mHC mixes and collapse, RoPE and the compressor's softmax (`.to(torch.float32)`,
`.float()` in modeling_deepseek_v4.py), whatever the model dtype. So its gradients carry float32
rounding: they agree with refimpl's float64 gradients to about 1e-6 relative, not 1e-12
(docs/gradients.md, "transformers as a peer"). transformers builds no MTP block, so the MTP
loss and the mtp.* gradients are absent.
Needs the `peers` extra (torch, transformers, accelerate); refimpl itself never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

import trace_transformers as tt  # noqa: E402
from refimpl.formats.config_file import read_config  # noqa: E402
from refimpl.formats.weights import load  # noqa: E402
from refimpl.grad import backward  # noqa: E402
from refimpl.oracle.gradients import (KIND, compare_gradients, format_grad_report, save_grad_trace)  # noqa: E402
from refimpl.oracle.trace import TRACE_FORMAT_VERSION  # noqa: E402


def load_transformers64(ckpt: Path, cfg):
    """DeepseekV4ForCausalLM over the checkpoint, float64 parameters, eager experts, the probe attention."""
    import json
    torch, transformers = tt._torch()
    raw = json.loads((ckpt / "config.json").read_text())
    tt._register_probe()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        str(ckpt), config=tt.hf_config(cfg, raw["quantization_config"]), dtype=torch.float64,
        attn_implementation=tt.PROBE, experts_implementation="eager", output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise tt.PeerError(f"transformers did not load the checkpoint cleanly: {info}")
    return model.eval()


def transformers_gradients(model, cfg, ids: list[int], targets: list[int]) -> tuple[dict, float]:
    """Autograd gradients of the main head's mean cross-entropy (targets -1 left out), in refimpl's names."""
    torch, _ = tt._torch()
    kept, handles = {}, []

    def keep(name):
        def hook(module, args, out):
            t = out[0] if isinstance(out, tuple) else out
            t.retain_grad()
            kept[name] = t
        return hook
    inner = model.model
    handles.append(inner.embed_tokens.register_forward_hook(keep("embed")))
    for i, layer in enumerate(inner.layers):
        handles.append(layer.self_attn.register_forward_hook(keep(f"layers.{i}.attn.out")))
        handles.append(layer.mlp.register_forward_hook(keep(f"layers.{i}.ffn.out")))
        handles.append(layer.register_forward_hook(keep(f"layers.{i}.out")))
    handles.append(inner.norm.register_forward_hook(keep("final.x")))
    handles.append(model.lm_head.register_forward_hook(keep("logits")))
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        t = torch.tensor(targets)
        loss = torch.nn.functional.cross_entropy(logits, t.clamp(min=0), reduction="none")
        loss = (loss * (t >= 0)).sum() / (t >= 0).sum()
        loss.backward()
        loss = loss.detach()
    finally:
        for h in handles:
            h.remove()
    grads = {f"grad.{k}": v.grad[0].detach().numpy().copy() for k, v in kept.items() if v.grad is not None}
    named = dict(model.named_parameters())
    for hf, official in tt.expected_parameters(cfg).items():
        p = named.get(hf)
        if p is None or p.grad is None:                     # tid2eid and the router bias are buffers: no gradient
            continue
        g = p.grad.detach().numpy()
        names = [n if n.endswith((".weight", "_fn", "_base", "_scale", ".ape", ".attn_sink")) else f"{n}.weight"
                 for n in official]
        if hf.endswith("experts.gate_up_proj"):             # [e, 2f, c]: per expert cat(w1, w3)
            f = g.shape[1] // 2
            for e in range(g.shape[0]):
                grads[f"grad.{names[2 * e]}"], grads[f"grad.{names[2 * e + 1]}"] = g[e, :f], g[e, f:]
        elif hf.endswith("experts.down_proj"):              # [e, c, f]: per expert w2
            for e in range(g.shape[0]):
                grads[f"grad.{names[e]}"] = g[e]
        else:
            grads[f"grad.{names[0]}"] = g.reshape(named[hf].shape).copy()
    return grads, float(loss)


def cmd_trace(a, compare: bool = False) -> int:
    ckpt = Path(a.ckpt)
    cfg = read_config(ckpt)
    ids = [int(t) for t in a.tokens.split(",")]
    targets = ids[1:] + [-1]
    grads, loss = transformers_gradients(load_transformers64(ckpt, cfg), cfg, ids, targets)
    ref = load(ckpt, precision="float64", kernels="numpy")
    meta = {"format_version": TRACE_FORMAT_VERSION, "kind": KIND, "implementation": "transformers (float64 autograd)",
            "n_layers": cfg.n_layers, "tokens": ids, "head": "main", "targets": targets, "loss": loss,
            "config_id": ref.config_id, "precision": "float64"}
    if a.out:
        save_grad_trace(a.out, grads, meta)
        print(f"wrote {a.out}: {len(grads)} gradients, loss {loss:.10g}")
    if compare:
        g = backward(ref, ids, targets)
        ours = {**g.sites, **{f"grad.{k}": v for k, v in g.params.items()}}
        from refimpl.oracle.gradients import GradTrace
        report = compare_gradients(GradTrace("transformers", meta, grads),
                                   GradTrace("refimpl", {**meta, "implementation": "refimpl"}, ours), rtol=a.rtol)
        print(f"loss: transformers {loss:.12g}, refimpl {g.loss:.12g}")
        print(format_grad_report(report))
        worst = sorted(report.rows, key=lambda r: -r.get("rel", 0))[:8]
        for r in worst:
            print(f"  {r['name']}: {r['rel']:.3g} of max|B|")
        return 0 if report.ok else 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("trace", "check"):
        q = sub.add_parser(name)
        q.add_argument("ckpt")
        q.add_argument("--tokens", required=True)
        q.add_argument("--out", default=None)
        q.add_argument("--rtol", type=float, default=2e-5,
                       help="check: max|A-B| <= rtol * max|B| (default 2e-5: transformers rounds to float32 inside)")
    a = ap.parse_args(argv)
    try:
        return cmd_trace(a, compare=a.cmd == "check")
    except (ValueError, tt.PeerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
