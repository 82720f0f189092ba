"""tools/trace_transformers.py: transformers' DeepSeek V4 traced in refimpl's site names.

The comparison helpers and the partial-block config run everywhere; the end-to-end cases need the
optional `peers` extra (torch + transformers) and are skipped without it, so the default suite
never needs torch.
"""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from refimpl.formats.config_file import read_config
from refimpl.config import Config, ConfigError

TOOL = Path(__file__).resolve().parents[2] / "tools" / "trace_transformers.py"
TOL = 1e-5          # float32-vs-float64-like; measured at most 2.4e-6 on tiny (docs/peers-transformers.md)


def load_tool():
    spec = importlib.util.spec_from_file_location("trace_transformers", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = load_tool()


# ---------------------------------------------------------------- without torch

def test_the_partial_config_is_refimpls_tiny_partial_preset():
    cfg = tool.partial_config()
    assert cfg == Config.preset("tiny-partial") and cfg.head_dim == 192 and cfg.nope_head_dim == 128
    with pytest.raises(ConfigError, match="input widths of FP8 weights must be multiples of 128"):
        Config.tiny().replace(dim=192)                                 # an FP8 input width: still refused
    with pytest.raises(ConfigError, match="multiple of 64"):           # the KV QDQ block check still holds
        Config.tiny().replace(head_dim=160)


def test_compare_traces_hand_worked():
    inf = np.inf
    ref = {"x": np.array([[1.0, -2.0], [3.0, 4.0]]),
           "layers.0.ffn.expert_ids": np.array([[1, 2], [3, 4], [5, 6]], np.int32),
           "layers.0.attn.indexer.scores": np.array([[1.0, -inf], [2.0, 4.0]]),
           "only_in_ref": np.zeros(2)}
    peer = {"x": np.array([[1.0, -2.0], [3.0, 4.4]]),
            "layers.0.ffn.expert_ids": np.array([[2, 1], [3, 4], [5, 7]], np.int32),   # order is free; row 2 differs
            "layers.0.attn.indexer.scores": np.array([[1.0, 0.0], [2.0, 4.0]])}         # -inf moved
    rows = {r["site"]: r for r in tool.compare_traces(peer, ref)}
    assert list(rows) == ["layers.0.attn.indexer.scores", "layers.0.ffn.expert_ids", "x"]   # data flow; unknown last
    x = rows["x"]
    assert math.isclose(x["max_abs"], 0.4) and math.isclose(x["max_rel"], 0.4 / 4.0)
    cos = (1 + 4 + 9 + 4 * 4.4) / (math.sqrt(30) * math.sqrt(14 + 4.4**2))
    assert math.isclose(x["cosine"], cos)
    assert rows["layers.0.ffn.expert_ids"]["rows_differ"] == 1
    assert "error" in rows["layers.0.attn.indexer.scores"]
    assert tool.first_divergent(list(rows.values()), 0.5)["site"] == "layers.0.attn.indexer.scores"
    assert tool.first_divergent(list(rows.values())[1:], 0.5)["site"] == "layers.0.ffn.expert_ids"
    assert tool.first_divergent([x], 0.05)["site"] == "x" and tool.first_divergent([x], 0.2) is None
    with pytest.raises(tool.PeerError, match="first difference at position 1"):
        tool.compare_traces(peer, ref, {"config_id": "a", "tokens": [1, 2]}, {"config_id": "a", "tokens": [1, 3, 4]})
    with pytest.raises(tool.PeerError, match="different models"):
        tool.compare_traces(peer, ref, {"config_id": "a", "tokens": [1]}, {"config_id": "b", "tokens": [1]})
    assert tool.compare_traces(peer, ref, {"config_id": "a", "tokens": [1]}, {"config_id": "a", "tokens": [1]})


def test_data_flow_order_is_the_order_a_forward_pass_records():
    from refimpl.oracle.trace import site_names
    names = site_names(Config.tiny())                                   # MTP block = layer 6, then mtp.*
    assert tool.data_flow_order(sorted(names)) == names
    main = [n for n in names if not n.startswith(("mtp.", "layers.6."))]
    assert tool.data_flow_order(sorted(main)) == main                    # no MTP: layer 6 is not special


def test_row_runs():
    assert tool._row_runs(np.array([3])) == "3"
    assert tool._row_runs(np.r_[96:128, 300, 302:304]) == "96-127, 300, 302-303"


def test_parameter_map_covers_every_official_tensor_but_the_mtp_block():
    from refimpl.formats.weights import expected_tensors
    cfg = Config.tiny()
    used = {n for names in tool.expected_parameters(cfg).values() for n in names}
    quantized = {n.removesuffix(".weight") for n, s in expected_tensors(cfg).items()
                 if s.dtype in ("F8_E4M3", "I8")}
    official = {n for n in expected_tensors(cfg) if not n.endswith(".scale")
                and n.removesuffix(".weight") not in quantized} | quantized
    assert used == {n for n in official if not n.startswith("mtp.")}


# ---------------------------------------------------------------- with torch + transformers

@pytest.fixture(scope="module")
def peers():
    torch = pytest.importorskip("torch", reason="the peers extra (torch, transformers) is not installed")
    pytest.importorskip("transformers", reason="the peers extra (torch, transformers) is not installed")
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="module")
def loader(peers):
    """transformers' FP8 quantizer (which reads the official checkpoints) also needs accelerate."""
    pytest.importorskip("accelerate", reason="transformers' FP8 loader needs accelerate (the peers extra)")
    return peers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from refimpl.synthetic.writer import make_checkpoint
    out = tmp_path_factory.mktemp("peers") / "tiny"
    make_checkpoint(Config.tiny(), out, progress=False)
    return out


def test_hf_config_reads_the_official_config_as_transformers_does(peers):
    """On the official Flash config.json, transformers' own reading and hf_config(Config.flash()) agree.

    (The tool builds the config from refimpl's Config because transformers cannot read the files
    refimpl's writer makes: "swiglu_limit": 10, an int, and ratio 16 in tiny's compress_ratios.)
    """
    import json
    from transformers import DeepseekV4Config
    raw = json.loads((Path(__file__).resolve().parents[1] / "data" / "official_config.json").read_text())
    own = DeepseekV4Config(**raw).to_dict()
    mine = tool.hf_config(Config.flash(), raw["quantization_config"]).to_dict()
    # not read by the model: file bookkeeping; use_cache: the tool runs without a cache
    ignored = {"architectures", "dtype", "topk_method", "use_cache", "rope_parameters"}
    assert {k: v for k, v in own.items() if k not in ignored} == {k: v for k, v in mine.items() if k not in ignored}
    for kind in ("main", "compress"):                                   # the same values; "type" is a spelling
        assert ({k: v for k, v in own["rope_parameters"][kind].items() if k != "type"}
                == mine["rope_parameters"][kind])
    assert own["rope_parameters"]["compress"]["attention_factor"] == 1.0    # no YaRN mscale (docs/architecture.md §19.2)


def test_expert_pairs_are_put_in_refimpl_order(peers):
    """transformers' router top-k is unsorted; the trace holds refimpl's order (descending biased
    score, ties by the lower id), the weights moving with their ids; hash layers keep tid2eid order."""
    from types import SimpleNamespace
    torch = peers
    router = SimpleNamespace(score_fn=lambda z: z, e_score_correction_bias=torch.tensor([0.0, 0.5, 0.0, 0.0]))
    logits = torch.tensor([[0.1, 0.2, 0.9, 0.7], [0.3, 0.0, 0.5, 0.5]])   # biased: [.1 .7 .9 .7], [.3 .5 .5 .5]
    indices = torch.tensor([[3, 1, 2], [3, 2, 1]])
    weights = torch.tensor([[30.0, 10.0, 20.0], [33.0, 22.0, 11.0]])
    ids, w = tool._expert_order(router, logits, weights, indices, hashed=False)
    assert ids.tolist() == [[2, 1, 3], [1, 2, 3]]                       # row 1: a three-way tie
    assert w.tolist() == [[20.0, 10.0, 30.0], [11.0, 22.0, 33.0]]
    ids, w = tool._expert_order(router, logits, weights, indices, hashed=True)
    assert ids.tolist() == indices.tolist() and w.tolist() == weights.tolist()


def trace_both(ckpt, cfg, ids):
    from refimpl.oracle.trace import run_trace
    model = tool.load_transformers(ckpt, cfg)
    bad = tool.check_weights(model, ckpt, cfg)
    peer = tool.trace_transformers(model, cfg, ids)
    ref = run_trace(tool._load_refimpl(ckpt, cfg, "float32"), ids)
    return bad, peer, ref


def test_transformers_matches_refimpl_float32_on_tiny(loader, tiny):
    """70 tokens cross the window (32), the first HCA entries (16) and the indexer's top-k (16 of 17)."""
    cfg = read_config(tiny)
    ids = np.random.default_rng(7).integers(2, cfg.vocab_size, 70)
    bad, peer, ref = trace_both(tiny, cfg, ids)
    assert bad == []                                                    # every weight exactly as the format defines it
    # every site refimpl records but the MTP block's (transformers does not build it)
    absent = {n for n in ref.tensors if n.startswith(("mtp.", f"layers.{cfg.n_layers}."))}
    assert list(peer.tensors) == [n for n in ref.tensors if n not in absent]   # same names, same order
    assert {f"layers.{i}.hc_attn.out" for i in range(cfg.n_layers)} <= set(peer.tensors)
    assert {f"layers.{i}.ffn.gate_scores" for i in range(cfg.n_hash_layers, cfg.n_layers)} <= set(peer.tensors)
    for name, x in peer.tensors.items():
        assert (x.shape, x.dtype) == (ref.tensors[name].shape, ref.tensors[name].dtype), name
    rows = tool.compare_traces(peer.tensors, ref.tensors, tool.peer_metadata(cfg, ids), ref.metadata)
    assert len(rows) == len(peer.tensors)
    worst = max(r.get("max_rel", 0.0) for r in rows)
    assert worst < TOL and tool.first_divergent(rows, TOL) is None, tool.format_table(rows)
    assert all(r["rows_differ"] == 0 for r in rows if "rows_differ" in r)
    topk = peer.tensors["layers.2.attn.indexer.topk"]
    assert topk.shape == (70, 16) and (topk[-1] >= 0).all() and (topk[0] == -1).all()


def test_a_partial_fp8_block_is_misread_and_shows_first_at_attn_kv(loader, tmp_path):
    """docs/architecture.md §19.34: transformers takes the block from the scale grid (192 rows / 2 = 96)."""
    ckpt = tmp_path / "partial"
    changed = tool.make_partial_checkpoint(ckpt)
    assert set(changed) <= {f"layers.{i}.attn.wkv.scale" for i in range(6)} | {"mtp.0.attn.wkv.scale"}
    cfg = tool.load_config(ckpt)
    from refimpl.formats.checkpoint import TensorSource
    source = TensorSource(ckpt)
    for i in range(6):                                                 # every partial block's scales differ from the block above
        grid = np.asarray(source.get(f"layers.{i}.attn.wkv.scale")).view(np.uint8)
        assert grid.shape == (2, cfg.dim // 128) and (grid[1] != grid[0]).all()
    bad, peer, ref = trace_both(ckpt, cfg, np.arange(2, 10))
    assert [(hf, n, rows) for hf, _, _, n, rows in bad] == [
        (f"model.layers.{i}.self_attn.kv_proj.weight", 32 * cfg.dim, "rows 96-127") for i in range(6)]
    rows = tool.compare_traces(peer.tensors, ref.tensors)
    first = tool.first_divergent(rows, TOL)
    assert first["site"] == "layers.0.attn.kv" and first["max_rel"] > 0.05
    before = rows[:[r["site"] for r in rows].index("layers.0.attn.kv")]
    assert before and all(r["max_rel"] < TOL for r in before)          # embed, mHC, q: untouched
