"""tools/grad_transformers.py: transformers' float64 autograd as a gradient peer, end to end.

Needs the optional `peers` extra (torch + transformers); skipped without it, so the default suite
never needs torch. Slow: transformers loads the tiny model in float64 (tens of seconds).
"""
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.mark.slow
def test_transformers_autograd_agrees_with_refimpls_gradients(tiny_ckpt, tmp_path):
    pytest.importorskip("torch", reason="the peer needs the peers extra: pip install '.[peers]'")
    pytest.importorskip("transformers", reason="the peer needs the peers extra: pip install '.[peers]'")
    sys.path.insert(0, str(TOOLS))
    import grad_transformers as peer
    from refimpl.formats.config_file import read_config
    from refimpl.formats.weights import load
    from refimpl.grad import backward
    from refimpl.oracle.gradients import GradTrace, compare_gradients

    ids = list(range(40, 64))
    targets = ids[1:] + [-1]
    cfg = read_config(tiny_ckpt)
    grads, loss = peer.transformers_gradients(peer.load_transformers64(tiny_ckpt, cfg), cfg, ids, targets)
    g = backward(load(tiny_ckpt, precision="float64", kernels="numpy"), ids, targets)
    ours = {**g.sites, **{f"grad.{k}": v for k, v in g.params.items()}}
    assert loss == pytest.approx(g.loss, rel=1e-7)
    assert len(grads) > 300 and set(grads) <= set(ours)
    meta = {"n_layers": cfg.n_layers, "tokens": ids}
    report = compare_gradients(GradTrace("hf", meta, grads), GradTrace("refimpl", meta, ours), rtol=2e-5)
    assert report.ok, report.first_failure                      # measured: at most 1.5e-5 (hc_head_scale)
    sites = [r for r in report.rows if r["name"] in g.sites]
    assert len(sites) >= 20 and max(r["rel"] for r in sites) < 2e-6
    missing = {n for n in set(ours) - set(grads) if n[5:] in g.params}   # parameters: MTP, the indexer, the bias
    assert all(n.startswith(("grad.mtp.", "grad.layers.6.")) or ".indexer." in n or n.endswith("gate.bias")
               for n in missing), sorted(missing)[:5]
    assert all(not np.any(ours[n]) for n in missing if ".indexer." in n or n.endswith("gate.bias"))
