"""compare.py: the first site out of tolerance, rounding-boundary flips, set agreement and near-ties, refusals.

Traces of the tiny model (80 tokens: the CSA indexer drops entries from 68 tokens on) in float64,
float32 and mirror, and small hand-made traces whose every number is worked out in the test.
"""
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from refimpl.config import Config
from refimpl.oracle.compare import (FP32_KINDS, CompareError, TraceFile, auto_profile, compare, format_report,
                                    load_profiles, load_trace, site_order, split_site, storage_format, ulp_distance)
from refimpl.oracle.trace import TRACE_FORMAT_VERSION, run_trace, site_names

TINY = Config.tiny()
TOKENS = [int(t) for t in np.random.default_rng(11).integers(2, TINY.vocab_size, 80)]
BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def traces(tiny_model, tmp_path_factory):
    """{mode: path} of traces of TOKENS: float64, float32, mirror, and a second mirror run."""
    d = tmp_path_factory.mktemp("traces")
    out = {}
    for mode, prec in (("float64", "float64"), ("float32", "float32"), ("mirror", "mirror"), ("mirror2", "mirror")):
        t = run_trace(tiny_model(prec), TOKENS)
        out[mode] = d / f"{mode}.safetensors"
        t.save(out[mode])
    return out


def write(path, tensors: dict, **meta):
    """A trace file written with safetensors alone (metadata defaults: format 1, mirror, 3 tokens)."""
    meta = {"format_version": TRACE_FORMAT_VERSION, "precision": "mirror", "tokens": [5, 6, 7], **meta}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"refimpl": json.dumps(meta)})
    return path


def perturbed(src, dst, site, index, factor):
    """A copy of trace src with one element of one site multiplied by factor."""
    t = load_trace(src)
    x = t.tensors[site].copy()
    x[index] *= factor
    t.tensors[site] = x
    save_file(t.tensors, str(dst), metadata={"refimpl": json.dumps(t.meta)})
    return dst


# ---------------------------------------------------------------- real traces

def test_float32_vs_float64_passes_its_profile(traces):
    r = compare(traces["float32"], traces["float64"])
    assert r.profile == "float32-vs-float64" and r.ok, format_report(r)
    assert [m["site"] for m in r.sites] == site_names(TINY)          # every site, in data-flow order
    assert not r.only_in_a and not r.only_in_b
    q = next(m for m in r.sites if m["site"] == "layers.0.attn.q")
    assert 0 < q["rms_rel"] < 1e-5 and q["cos"] > 0.999999
    logits = next(m for m in r.sites if m["site"] == "logits")
    assert logits["top1"] == 1.0 and logits["top5"] == 1.0 and logits["kl"] < 1e-9
    topk = next(m for m in r.sites if m["site"] == "layers.2.attn.indexer.topk")
    assert topk["rows"] == 80 and topk["agree"] + topk["near_ties"] == 80 and topk["scores"]
    assert "within tolerance (float32-vs-float64)" in format_report(r)


def test_mirror_vs_float64_passes_its_statistical_profile(traces):
    r = compare(traces["mirror"], traces["float64"])
    assert r.profile == "mirror-vs-float64" and r.ok, format_report(r)
    assert r.first_real["site"] == "layers.0.hc_attn.pre"        # fp32 mixes: exact vs rounded products


def test_the_statistical_profile_catches_a_gross_error(traces, tmp_path):
    """An "engine" whose layer-1 RoPE rotates the wrong way (the rope half of q negated) leaves
    bf16-engine-vs-mirror at that site, though the profile tolerates a whole random model's drift."""
    t = load_trace(traces["mirror2"])
    q = t.tensors["layers.1.attn.q"].copy()
    q[..., -TINY.rope_head_dim:] *= -1
    t.tensors["layers.1.attn.q"] = q
    engine = TraceFile("engine", {**t.meta, "precision": "bf16"}, t.tensors)
    r = compare(engine, traces["mirror"])
    assert r.profile == "bf16-engine-vs-mirror" and r.first["site"] == "layers.1.attn.q"
    assert r.first["metric"] in ("min_site_cos", "max_beyond_frac") and r.first["position"] == 0
    assert [m["site"] for m in r.sites if not m["ok"]] == ["layers.1.attn.q"]


def test_one_perturbed_site_fails_naming_site_layer_and_position(traces, tmp_path):
    col = int(np.argmax(np.abs(load_trace(traces["float32"]).tensors["layers.3.attn.out"][17])))   # row 17's largest
    bad = perturbed(traces["float32"], tmp_path / "bad.st", "layers.3.attn.out", (17, col), 1.01)
    r = compare(bad, traces["float64"])
    assert not r.ok
    f = r.first
    assert (f["site"], f["layer"], f["position"]) == ("layers.3.attn.out", 3, 17)
    assert f["worst"]["index"] == [17, col] and f["metric"] == "max_rel"
    assert [m["site"] for m in r.sites if not m["ok"]] == ["layers.3.attn.out"]   # only that site
    text = format_report(r)
    assert "FIRST OUT OF TOLERANCE: layers.3.attn.out (layer 3), position 17" in text
    assert f"worst element (17, {col})" in text and "(more than one unit in the last place of float32)" in text


def test_identical_mirror_traces_are_exactly_equal(traces):
    r = compare(traces["mirror"], traces["mirror2"])
    assert r.profile == "mirror-vs-mirror" and r.ok
    for m in r.sites:
        if m["kind"] == "float":
            assert m["max_abs"] == 0 and m["rms_rel"] == 0 and m["cos"] == 1 and m["differ"] == 0, m["site"]
            if "kl" in m:
                assert m["kl"] == 0 and m["top1"] == 1
        else:
            assert m["agree"] == m["rows"] and m["real"] == m["near_ties"] == 0, m["site"]


def test_mirror_vs_mirror_tolerates_nothing(traces, tmp_path):
    """One bf16 unit in the last place of one element of the logits' input is out of mirror-vs-mirror."""
    t = load_trace(traces["mirror"])
    x = t.tensors["final.x"].copy()
    x[40, 3] = np.nextafter(x[40, 3].astype(BF16), BF16(np.inf)).astype(np.float32)      # +1 bf16 ulp
    t.tensors["final.x"] = x
    save_file(t.tensors, str(tmp_path / "m.st"), metadata={"refimpl": json.dumps(t.meta)})
    r = compare(tmp_path / "m.st", traces["mirror2"])
    f = r.first
    assert (f["site"], f["position"], f["worst"]["ulps"]) == ("final.x", 40, 1)
    m = next(m for m in r.sites if m["site"] == "final.x")
    assert (m["flips"], m["real"]) == (1, 0)
    assert any("rounding-boundary flip" in h for h in f["hints"])


def test_mirror_trace_storage_formats_match_the_model(traces):
    """The bf16 sites of a mirror trace hold bf16 values; the fp32 ones (FP32_KINDS) do not all."""
    t = load_trace(traces["mirror"])
    for name, x in t.tensors.items():
        kind = split_site(name)[1]
        if x.dtype.kind != "f" or x.size == 0:
            continue
        v = x[np.isfinite(x)]
        is_bf16 = np.array_equal(v.astype(BF16).astype(np.float32), v)
        assert is_bf16 == (storage_format("mirror", kind, x.dtype) == "bfloat16"), name
        assert is_bf16 != (kind in FP32_KINDS), name


def test_site_order_is_the_recording_order():
    names = site_names(TINY)
    shuffled = list(np.random.default_rng(0).permutation(names))
    assert site_order(shuffled, TINY.n_layers) == names
    assert site_order(shuffled + ["my.extra", "layers.2.attn.custom"], TINY.n_layers)[-2:] == \
        ["layers.2.attn.custom", "my.extra"]                               # unknown names last


# ---------------------------------------------------------------- refusals

def test_traces_of_different_runs_are_refused(tmp_path):
    x = {"embed": np.ones((3, 4), np.float32)}
    a = write(tmp_path / "a.st", x)
    cases = [({"tokens": [5, 6, 8]}, "different token ids: 3 vs 3 tokens, first difference at position 2"),
             ({"tokens": [5, 6]}, "different token ids: 3 vs 2 tokens, first difference at position 2"),
             ({"chunks": [2, 1]}, r"different calls \(chunks \[3\] vs chunks \[2, 1\]\).*\(--chunks 2,1\)"),
             ({"config_id": "feedbeef"}, None)]                              # one side without: no check
    for meta, msg in cases:
        b = write(tmp_path / "b.st", {"embed": np.ones((len(meta.get("tokens", "abc")), 4), np.float32)}, **meta)
        if msg is None:
            assert compare(a, b).ok
        else:
            with pytest.raises(CompareError, match=msg):
                compare(a, b)
    a2 = write(tmp_path / "a2.st", x, config_id="0123abcd")
    with pytest.raises(CompareError, match="different model configs"):
        compare(a2, b)


def test_shape_mismatch_names_the_site_and_one_sided_sites_are_listed(tmp_path):
    a = write(tmp_path / "a.st", {"embed": np.ones((3, 4), np.float32), "layers.0.attn.q": np.ones((3, 2, 4), np.float32),
                                  "logits": np.zeros((3, 8), np.float32)})
    b = write(tmp_path / "b.st", {"embed": np.ones((3, 4), np.float32), "layers.0.attn.kv": np.ones((3, 4), np.float32),
                                  "logits": np.zeros((3, 8), np.float32)})
    r = compare(a, b)
    assert r.only_in_a == ["layers.0.attn.q"] and r.only_in_b == ["layers.0.attn.kv"]
    assert "only in A (not compared): layers.0.attn.q" in format_report(r)
    c = write(tmp_path / "c.st", {"embed": np.ones((3, 5), np.float32)})
    with pytest.raises(CompareError, match=r"site 'embed' has shape \[3, 4\] in .* but \[3, 5\]"):
        compare(a, c)
    d = write(tmp_path / "d.st", {"my.probe": np.ones((3, 4), np.int32)})     # a known float site as int: refused
    with pytest.raises(CompareError, match="integer sites must be integers in both"):   # on reading (below)
        compare(write(tmp_path / "e.st", {"my.probe": np.ones((3, 4), np.float32)}), d)


def test_unreadable_or_unversioned_files_are_refused(tmp_path):
    x = {"embed": np.ones((3, 4), np.float32)}
    (tmp_path / "junk.st").write_bytes(b"not a safetensors file")
    save_file(x, str(tmp_path / "nometa.st"))
    cases = [(tmp_path / "missing.st", "no such file"),
             (tmp_path / "junk.st", "not a readable safetensors file"),
             (tmp_path / "nometa.st", "no 'refimpl' metadata entry"),
             (write(tmp_path / "v0.st", x, format_version=None), "no format_version"),
             (write(tmp_path / "v2.st", x, format_version=2), "format version 2; this refimpl reads version 1"),
             (write(tmp_path / "p.st", x, precision="fp8"), "precision 'fp8' is not one of"),
             (write(tmp_path / "t.st", x, tokens=[1.5]), "'tokens' must be a non-empty list of integer"),
             (write(tmp_path / "c.st", x, chunks=[1, 1]), "'chunks' must be positive integers adding up to the 3")]
    for path, msg in cases:
        with pytest.raises(CompareError, match=msg):
            load_trace(path)


# ---------------------------------------------------------------- hand-worked classifications

def test_ulp_distance_hand_worked():
    one, next_bf16 = 1.0, 1.0 + 2 ** -7                  # bf16 has 7 fraction bits
    assert ulp_distance([one], [next_bf16], "bfloat16")[0] == 1
    assert ulp_distance([one], [one + 2 ** -6], "bfloat16")[0] == 2
    assert ulp_distance([one], [one + 2 ** -9], "bfloat16")[0] == 0      # rounds to 1.0 (RNE)
    assert ulp_distance([one], [one + 2 ** -23], "float32")[0] == 1
    assert ulp_distance([one], [one + 2 ** -23], "bfloat16")[0] == 0
    assert ulp_distance([0.0], [-0.0], "float32")[0] == 0
    tiny32 = float(np.float32(2 ** -149))                 # the smallest fp32 subnormal, either side of 0
    assert ulp_distance([tiny32], [-tiny32], "float32")[0] == 2
    assert ulp_distance([tiny32], [0.0], "float32")[0] == 1
    assert ulp_distance([-1.0], [-1.0 - 2 ** -52], "float64")[0] == 1
    assert ulp_distance([1e300], [-1e300], "float64")[0] == 2             # no overflow across zero


def test_one_ulp_flips_are_classified_apart_from_real_differences(tmp_path):
    """attn.out is bf16 in mirror, logits fp32: a step of one unit of each format is a flip, more is real."""
    b_out = np.array([[1.0, 2.0, -3.0, 0.5]], np.float32)
    a_out = np.array([[1.0 + 2 ** -7, 2.0 + 2 ** -6, -3.0 - 2 ** -6 * 2, 0.5]], np.float32)   # 1, 1, 2 bf16 ulps, 0
    b_log = np.array([[1.0, 2.0, 4.0]], np.float32)
    a_log = np.array([[1.0 + 2 ** -23, 2.0 + 2 ** -7, 4.0]], np.float32)    # 1 fp32 ulp; 1 bf16 ulp = 2^16 fp32 ulps
    meta = {"tokens": [9]}
    a = write(tmp_path / "a.st", {"layers.0.attn.out": a_out, "logits": a_log}, **meta)
    b = write(tmp_path / "b.st", {"layers.0.attn.out": b_out, "logits": b_log}, **meta)
    r = compare(a, b, profile="mirror-vs-mirror")
    out, logits = r.sites[0], r.sites[1]
    assert out["format"] == "bfloat16" and (out["differ"], out["flips"], out["real"]) == (3, 2, 1)
    assert logits["format"] == "float32" and (logits["differ"], logits["flips"], logits["real"]) == (2, 1, 1)
    # the same values declared float32: attn.out is then an fp32 site, and every bf16 step is real
    a = write(tmp_path / "a32.st", {"layers.0.attn.out": a_out}, precision="float32", **meta)
    b = write(tmp_path / "b32.st", {"layers.0.attn.out": b_out}, precision="float32", **meta)
    out = compare(a, b, profile="float32-vs-float64").sites[0]
    assert out["format"] == "float32" and (out["flips"], out["real"]) == (0, 3)
    # mirror against float64: the float64 value is rounded to bf16 before counting
    a = write(tmp_path / "m.st", {"layers.0.attn.out": np.array([[1.0, 1.0]], np.float32)}, **meta)
    b = write(tmp_path / "f.st", {"layers.0.attn.out": np.array([[1.0 + 2 ** -9, 1.0 + 2 ** -5]])},
              precision="float64", **meta)
    out = compare(a, b, profile="mirror-vs-float64").sites[0]
    assert (out["format"], out["flips"], out["real"]) == ("bfloat16", 1, 1)


def _topk_traces(tmp_path, a_ids, b_ids, a_scores=None, b_scores=None):
    ta = {"layers.2.attn.indexer.topk": np.array(a_ids, np.int32)}
    tb = {"layers.2.attn.indexer.topk": np.array(b_ids, np.int64)}
    if a_scores is not None:
        ta["layers.2.attn.indexer.scores"] = np.array(a_scores, np.float32)
    if b_scores is not None:
        tb["layers.2.attn.indexer.scores"] = np.array(b_scores, np.float32)
    meta = {"tokens": list(range(len(a_ids)))}
    return write(tmp_path / "a.st", ta, **meta), write(tmp_path / "b.st", tb, **meta)


def test_integer_set_agreement_hand_worked(tmp_path):
    """Rows compared as sets: order and -1 padding do not matter; overlap |A∩B| / max(|A|, |B|)."""
    a_ids = [[3, 1, -1], [0, 2, 5], [4, -1, -1], [-1, -1, -1]]
    b_ids = [[1, 3, -1], [0, 2, 6], [-1, 4, -1], [-1, -1, -1]]
    a, b = _topk_traces(tmp_path, a_ids, b_ids)
    r = compare(a, b, profile="mirror-vs-mirror")
    m = r.sites[0]
    assert (m["rows"], m["agree"], m["near_ties"], m["real"]) == (4, 3, 0, 1)
    assert m["set_agreement"] == pytest.approx((1 + 2 / 3 + 1 + 1) / 4)
    assert not m["scores"] and m["real_rows"][0] == {"row": 1, "spread": float("inf"), "a_only": [5], "b_only": [6]}
    assert (r.first["site"], r.first["position"], r.first["metric"]) == ("layers.2.attn.indexer.topk", 1, "max_real_frac")


def test_sites_without_rows_compare_equal(tmp_path):
    """A golden trace of a short input keeps no row of the MTP block ([0, a] expert ids, [0, e] scores)."""
    t = {"layers.6.ffn.expert_ids": np.zeros((0, 2), np.int32), "layers.6.ffn.gate_scores": np.zeros((0, 8), np.float32),
         "logits": np.ones((1, 4), np.float32)}
    a, b = write(tmp_path / "a.st", t, tokens=[5]), write(tmp_path / "b.st", t, tokens=[5])
    r = compare(a, b, profile="mirror-vs-mirror")
    assert r.ok and {m["site"]: m["rows"] for m in r.sites if m["kind"] == "integer"} == {"layers.6.ffn.expert_ids": 0}


def test_near_ties_are_flagged_apart_from_real_disagreements(tmp_path):
    """Disputed entries whose scores lie within near_tie_rel (relative to the row's largest |score|) are a near-tie.

    Row 0: A picks 2, B picks 3; scores of 2 and 3 are 1.000 and 1.001 (row max 4): spread 0.001/4 = 2.5e-4.
    Row 1: the same choice, scores 1.0 and 2.0: spread 1/4 = 0.25, a real disagreement.
    Row 2: agree; margin between the 2nd best (3.0) and 3rd best (2.99): 0.01/4 = 2.5e-3.
    """
    ninf = -np.inf
    scores = [[4.0, 3.0, 1.000, 1.001, 0.1], [4.0, 3.0, 1.0, 2.0, 0.1], [4.0, 3.0, 2.99, ninf, ninf]]
    a_ids, b_ids = [[0, 2], [0, 2], [1, 0]], [[0, 3], [0, 3], [0, 1]]
    a, b = _topk_traces(tmp_path, a_ids, b_ids, b_scores=scores)
    profiles = load_profiles()
    prof = dict(profiles["bf16-engine-vs-mirror"])
    prof["integer"] = {"near_tie_rel": {"bound": 1e-3}, "max_real_frac": {"bound": 0.5}}
    m = compare(a, b, profile="p", profiles={"p": prof}).sites[0]
    assert (m["agree"], m["near_ties"], m["real"]) == (1, 1, 1)
    assert m["near_tie_rows"] == [{"row": 0, "spread": pytest.approx(2.5e-4, rel=1e-3), "a_only": [2], "b_only": [3]}]
    assert m["real_rows"][0]["row"] == 1 and m["real_rows"][0]["spread"] == pytest.approx(0.25)
    assert m["min_margin"] == pytest.approx(2.5e-3, rel=1e-3) and m["close_calls"] == 0
    # both traces' scores count: if A's own scores put its choice far apart, row 0 is real too
    a_scores = [[4.0, 3.0, 2.0, 1.0, 0.1], scores[1], scores[2]]
    a, b = _topk_traces(tmp_path, a_ids, b_ids, a_scores=a_scores, b_scores=scores)
    m = compare(a, b, profile="p", profiles={"p": prof}).sites[1]
    assert m["site"] == "layers.2.attn.indexer.topk" and (m["near_ties"], m["real"]) == (0, 2)
    # a near-tie upstream is named in the hint of a later failure at that position
    prof["float"] = {"max_rel": {"bound": 0.0}}
    ta, tb = load_trace(a), load_trace(b)
    ta.tensors = {**ta.tensors, "layers.2.attn.out": np.ones((3, 2), np.float32)}
    tb.tensors = {**tb.tensors, "layers.2.attn.out": np.full((3, 2), 2, np.float32)}
    ta.tensors["layers.2.attn.indexer.scores"] = np.array(scores, np.float32)
    prof["integer"]["max_real_frac"] = {"bound": 1.0}
    r = compare(ta, tb, profile="p", profiles={"p": prof})
    assert r.first["site"] == "layers.2.attn.out"
    assert any("near-tie selections upstream (layers.2.attn.indexer.topk rows [0])" in h for h in r.first["hints"])


def test_expert_weights_are_paired_by_expert_id(tmp_path):
    """Another implementation may list the chosen experts in any order: the weights follow their ids."""
    ids_a, w_a = np.array([[5, 2], [1, 7]], np.int32), np.array([[0.6, 0.9], [0.3, 1.2]], np.float32)
    ids_b, w_b = ids_a[:, ::-1].copy(), w_a[:, ::-1].copy()
    t = lambda ids, w: {"layers.3.ffn.expert_ids": ids, "layers.3.ffn.expert_weights": w}   # noqa: E731
    meta = {"tokens": [1, 2]}
    r = compare(write(tmp_path / "a.st", t(ids_a, w_a), **meta), write(tmp_path / "b.st", t(ids_b, w_b), **meta),
                profile="mirror-vs-mirror")
    assert r.ok and all(m.get("max_abs", 0) == 0 for m in r.sites)


def test_first_divergence_at_attn_q_points_to_the_q_norm_rsqrt(tmp_path):
    q = np.ones((2, 1, 4), np.float32)
    a = write(tmp_path / "a.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q * 0.7890625},
              tokens=[1, 2])
    b = write(tmp_path / "b.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q * 0.79296875},
              tokens=[1, 2])
    r = compare(a, b)
    assert r.first["site"] == "layers.0.attn.q"
    assert any("rsqrt" in h and "not correctly rounded" in h for h in r.first["hints"])
    assert "hint: known cause when the first divergent site is attn.q" in format_report(r)
    # the two values are one bf16 ulp apart (the CPU rsqrt's error): a flip, not a real difference;
    # within tolerance, the first difference at attn.q gets the same pointer
    r = compare(a, b, profile="p", profiles={"p": {}})
    assert r.ok and r.first_real is None and r.first_diff == {"site": "layers.0.attn.q", "layer": 0,
                                                              "label": "layer 0", "position": 0}
    text = format_report(r)
    assert "first difference: layers.0.attn.q (layer 0), position 0" in text
    assert "hint: known cause when the first divergent site is attn.q" in text
    # two float64 traces have no bf16 q norm: no such hint
    a = write(tmp_path / "a64.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q * 0.7890625},
              tokens=[1, 2], precision="float64")
    b = write(tmp_path / "b64.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q * 0.79296875},
              tokens=[1, 2], precision="float64")
    assert "hint: known cause" not in format_report(compare(a, b, profile="p", profiles={"p": {}}))


# ---------------------------------------------------------------- the contract

def test_a_trace_written_from_this_document_alone(traces, tiny_ckpt, tmp_path):
    """docs/trace-format.md followed with the safetensors library only: the embedding read from the
    checkpoint, the other sites taken from a float64 run and laid out with the freedoms the document
    allows (I64 ids, expert ids in another order with their weights, top-k rows in another order,
    F32 storage). compare accepts it as a float32 trace and finds it within float32-vs-float64."""
    from safetensors import safe_open
    src = load_trace(traces["float64"]).tensors                # the numbers of "another implementation"
    with open(tiny_ckpt / "model.safetensors.index.json") as f:
        shard = json.load(f)["weight_map"]["embed.weight"]
    with safe_open(str(tiny_ckpt / shard), "np") as f:
        table = f.get_tensor("embed.weight")                   # bf16 [v, c]
    sites = {"embed": table[TOKENS].astype(np.float32)}
    for name, x in src.items():
        if name == "embed":
            continue
        if name.endswith(".ffn.expert_ids") or name.endswith(".ffn.expert_weights"):
            x = x[:, ::-1]                                      # another column order, shared by ids and weights
        elif name.endswith(".indexer.topk"):
            x = np.sort(x, axis=1)[:, ::-1]                     # entries by number, -1 padding last
        sites[name] = np.ascontiguousarray(x.astype(np.int64 if x.dtype.kind == "i" else np.float32))
    meta = {"format_version": 1, "precision": "float32", "tokens": TOKENS, "implementation": "the document"}
    save_file(sites, str(tmp_path / "doc.safetensors"), metadata={"refimpl": json.dumps(meta)})
    r = compare(tmp_path / "doc.safetensors", traces["float64"])
    assert r.ok and r.profile == "float32-vs-float64", format_report(r)
    assert r.sites[0]["site"] == "embed" and r.sites[0]["max_abs"] == 0
    assert len(r.sites) == len(site_names(TINY)) and r.notes == ["a trace has no config_id: the model config "
                                                                 "could not be checked"]


# ---------------------------------------------------------------- profiles

def test_profiles_state_the_measurement_behind_every_bound():
    """Every bound has the worst measured value and where it was measured, and leaves headroom over it."""
    profiles = load_profiles()
    assert {"float32-vs-float64", "mirror-vs-mirror", "mirror-vs-float64", "bf16-engine-vs-mirror"} <= set(profiles)
    lower = {"min_cos", "min_site_cos", "min_top1", "min_top5"}       # bounds from below
    n = 0
    for name, p in profiles.items():
        assert p["description"] and p["measurement"], name
        tables = [p.get(section, {}) for section in ("float", "logits", "integer")] + list(p.get("sites", {}).values())
        for table in tables:
            for key, v in table.items():
                n += 1
                assert set(v) >= {"bound", "measured", "at"}, (name, key)
                if key in lower:
                    assert v["bound"] <= v["measured"], (name, key)
                elif key not in ("beyond_rel", "near_tie_rel"):      # thresholds, not measured maxima
                    assert v["bound"] >= v["measured"], (name, key)
    assert n > 20
    mm = profiles["mirror-vs-mirror"]
    assert mm["float"]["max_rel"]["bound"] == 0 and mm["integer"]["max_real_frac"]["bound"] == 0
    assert mm["logits"]["max_kl"]["bound"] == 0


@pytest.mark.parametrize("pair, name", [(("float32", "float64"), "float32-vs-float64"),
                                        (("float64", "float32"), "float32-vs-float64"),
                                        (("mirror", "mirror"), "mirror-vs-mirror"),
                                        (("mirror", "float64"), "mirror-vs-float64"),
                                        (("bf16", "mirror"), "bf16-engine-vs-mirror")])
def test_auto_profile_follows_the_precisions(pair, name):
    assert auto_profile(*pair) == name


def test_auto_profile_refuses_an_unknown_pair():
    with pytest.raises(CompareError, match="no profile is chosen automatically for precisions bf16 vs float32"):
        auto_profile("bf16", "float32", {k: v for k, v in load_profiles().items() if k != "mirror-vs-float64"})


def test_compare_accepts_trace_objects_and_checks_them(traces):
    t = load_trace(traces["mirror"])
    assert isinstance(t, TraceFile) and compare(t, traces["mirror2"]).ok
    with pytest.raises(CompareError, match="precision 'fp8'"):
        compare(TraceFile("x", {**t.meta, "precision": "fp8"}, t.tensors), traces["mirror2"])


def test_traces_of_different_index_layouts_are_refused(tiny_model, tmp_path):
    """In mirror the layout decides the softmax blocks: comparing across layouts would mislead."""
    from refimpl.oracle.compare import CompareError, compare
    from refimpl.oracle.trace import run_trace
    toks = [0, 5, 9, 2, 7]
    a = run_trace(tiny_model("mirror"), toks, patterns=("logits",))
    b = run_trace(tiny_model("mirror", layout="canonical"), toks, patterns=("logits",))
    a.save(tmp_path / "a.st")
    b.save(tmp_path / "b.st")
    with pytest.raises(CompareError, match="different attention index layouts \\(official vs canonical\\)"):
        compare(tmp_path / "a.st", tmp_path / "b.st")


def test_files_that_are_not_traces_get_one_line_saying_what_they_are(tiny_ckpt, tmp_path):
    """A checkpoint shard (F8_E4M3 / F8_E8M0 dtypes NumPy lacks), deeply nested metadata, a folder, a FIFO."""
    import os
    shard = next(tiny_ckpt.glob("model-*.safetensors"))
    with pytest.raises(CompareError, match="not a trace file") as e:
        load_trace(shard)
    assert "\n" not in str(e.value)
    deep = tmp_path / "deep.st"
    save_file({"embed": np.ones((3, 4), np.float32)}, str(deep), metadata={"refimpl": "[" * 100000 + "]" * 100000})
    with pytest.raises(CompareError, match="nested too deeply"):
        load_trace(deep)
    os.mkfifo(tmp_path / "fifo")
    for path, what in ((tiny_ckpt, "is a folder"), (tmp_path / "fifo", "is a FIFO"),
                       ("/dev/null", "is a character device")):
        with pytest.raises(CompareError, match=what):
            load_trace(path)


def test_a_candidate_without_the_reference_logits_fails(tmp_path):
    """It used to pass: 'within tolerance: 1 sites compared'."""
    x = {"embed": np.ones((3, 4), np.float32)}
    ref = write(tmp_path / "ref.st", {**x, "final.x": np.ones((3, 4), np.float32), "logits": np.zeros((3, 8), np.float32)})
    cand = write(tmp_path / "cand.st", x)
    r = compare(cand, ref)
    assert not r.ok and r.first is None and "has no 'logits' site" in r.missing
    text = format_report(r)
    assert text.splitlines()[0].startswith("FAILED: the candidate") and "within tolerance (" not in text.splitlines()[-1][:20]
    assert r.to_json()["ok"] is False
    # missing sites other than logits: a loud note, still judged on what was compared
    cand2 = write(tmp_path / "cand2.st", {**x, "logits": np.zeros((3, 8), np.float32)})
    r2 = compare(cand2, ref)
    assert r2.ok and r2.notes[0].startswith("NOT COMPARED: 1 of the reference's 3 sites are missing")
    assert "note: NOT COMPARED" in format_report(r2)
    assert compare(ref, cand).ok                            # the reference lacks it: nothing to miss


@pytest.mark.parametrize("tensors, meta, msg", [
    ({"embed": np.ones((2, 4), np.float32)}, {}, r"site 'embed' has 2 rows; the 3 tokens give it 3"),
    ({"embed": np.ones((3, 4, 1), np.float32)}, {}, r"site 'embed' has 3 axes \[3, 4, 1\]"),
    ({"layers.0.attn.q": np.ones((3, 4), np.float32)}, {}, r"'layers.0.attn.q' has 2 axes"),
    ({"mtp.logits": np.ones((3, 8), np.float32)}, {}, r"'mtp.logits' has 3 rows; the 3 tokens give it 2"),
    ({"layers.2.out": np.ones((3, 2, 4), np.float32)}, {"n_layers": 2}, "the MTP block has s - 1"),
    ({"layers.1.ffn.expert_ids": np.array([[0, 1], [2, 8], [3, 4]], np.int32),
      "layers.1.ffn.gate_scores": np.zeros((3, 8), np.float32)}, {}, r"row 1 holds \[2, 8\]; it must hold expert ids in \[0, 8\)"),
    ({"layers.1.ffn.expert_ids": np.array([[0, 1], [2, 3], [-1, 4]], np.int32)}, {}, "row 2 holds .*expert ids >= 0"),
    ({"layers.2.attn.indexer.topk": np.array([[0], [-1], [-2]], np.int32)}, {}, r"row 2 holds \[-2\]"),
    ({"layers.1.ffn.expert_ids": np.array([[0, 1], [1, 1], [3, 4]], np.int32)}, {}, r"row 1 holds \[1, 1\]: a selection"),
    ({"layers.2.attn.indexer.topk": np.array([[0, -1, -1], [2, 0, 2], [1, 0, -1]], np.int32)}, {},
     r"row 1 holds \[2, 0, 2\]: a selection names each entry once"),
    ({"layers.1.ffn.expert_ids": np.ones((3, 2), np.float32)}, {}, "it is an integer site"),
    ({"embed": np.ones((3, 4), np.float32)}, {"format_version": True}, "format_version must be an integer"),
    ({"embed": np.ones((3, 4), np.float32)}, {"n_layers": "2"}, "'n_layers' must be a non-negative integer"),
])
def test_traces_breaking_the_format_contract_are_refused_even_against_themselves(tmp_path, tensors, meta, msg):
    p = write(tmp_path / "bad.st", tensors, **meta)
    with pytest.raises(CompareError, match=msg) as e:
        compare(p, p)
    assert "\n" not in str(e.value)


def test_the_contract_allows_what_the_format_allows(tmp_path):
    """compressed_kv with any entry count, -1 top-k padding, an MTP layer of s - 1 rows, names refimpl does not know."""
    t = {"layers.2.attn.compressed_kv": np.ones((0, 4), np.float32), "layers.0.attn.compressed_kv": np.ones((1, 4), np.float32),
         "layers.2.attn.indexer.topk": np.array([[-1], [-1], [0]], np.int32), "layers.3.ffn.expert_ids": np.zeros((2, 1), np.int64),
         "mtp.logits": np.ones((2, 8), np.float32), "logits": np.ones((3, 8), np.float32), "my.probe": np.ones((7,), np.float32)}
    p = write(tmp_path / "ok.st", t, n_layers=3)
    assert compare(p, p).ok


def test_golden_set_traces_keep_only_their_listed_rows(tmp_path):
    """metadata golden_rows (oracle/golden.py): per-position sites hold those rows, the MTP block the ones below s - 1."""
    t = {"embed": np.ones((2, 4), np.float32), "mtp.logits": np.ones((1, 8), np.float32)}
    p = write(tmp_path / "g.st", t, golden_rows=[0, 2])
    assert compare(p, p).ok
    bad = write(tmp_path / "b.st", {"embed": np.ones((3, 4), np.float32)}, golden_rows=[0, 2])
    with pytest.raises(CompareError, match=r"'embed' has 3 rows; golden_rows \[0, 2\] give it 2"):
        compare(bad, bad)
    with pytest.raises(CompareError, match="'golden_rows' must be increasing positions in"):
        compare(write(tmp_path / "c.st", t, golden_rows=[0, 3]), p)
    with pytest.raises(CompareError, match="'golden_rows' must be increasing positions in"):   # in order, once each
        compare(write(tmp_path / "d.st", t, golden_rows=[2, 0]), p)


# ---------------------------------------------------------------- sizes and ranges before allocating (issue 25)

def test_a_site_of_no_bytes_claiming_2_to_the_40_rows_is_refused_on_reading(tmp_path):
    """Such a site (shape [2^40, 0]: zero bytes) used to hang compare, walking its rows (90 s and more)."""
    p = write(tmp_path / "huge.st", {"logits": np.zeros((3, 8), np.float32), "my.ids": np.zeros((1 << 40, 0), np.int32)})
    with pytest.raises(CompareError, match=r"site 'my.ids' has 1099511627776 rows of 0 values in all; a trace of 3 "
                                           r"tokens has at most 3 rows per site unless its values fill them"):
        load_trace(p)
    ok = write(tmp_path / "ok.st", {"logits": np.zeros((3, 8), np.float32), "my.ids": np.zeros((3, 0), np.int32),
                                    "my.probe": np.ones((7,), np.float32)})
    assert compare(ok, ok).ok                       # rows backed by the tokens, or by the values they hold


@pytest.mark.parametrize("k", [-10 ** 7, 0, 3, 10 ** 7])
def test_decode_from_is_checked_against_its_range_before_anything_is_allocated(tmp_path, k):
    """decode_from -1e8 used to build a list of 1e8 ones (1.6 GB) just to refuse it; -3e9 needed 24 GB."""
    import tracemalloc
    p = write(tmp_path / "d.st", {"logits": np.zeros((3, 8), np.float32)}, decode_from=k)
    tracemalloc.start()
    try:
        with pytest.raises(CompareError, match=f"'decode_from' must be null or K with chunks .* got {k}"):
            load_trace(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    good = write(tmp_path / "g.st", {"logits": np.zeros((3, 8), np.float32)}, decode_from=2, chunks=[2, 1])
    assert load_trace(good).meta["decode_from"] == 2


def test_a_known_float_site_stored_as_integers_is_refused(tmp_path):
    """It used to be compared as sets of ids per row, saying nothing about its values."""
    p = write(tmp_path / "i.st", {"logits": np.zeros((3, 8), np.int32)})
    with pytest.raises(CompareError, match="site 'logits' has dtype int32; it is a float site"):
        compare(p, p)


def _profile(**tables):
    base = load_profiles()["mirror-vs-mirror"]
    return {"custom": {**base, **tables}}


@pytest.mark.parametrize("profile, words", [
    (_profile(float={"max_rel": {"bound": "1e-3"}}),
     r"\[float\] max_rel = '1e-3': a bound must be a finite number >= 0"),
    (_profile(float={"max_rel": "1e-3"}), r"\[float\] max_rel = '1e-3'"),
    (_profile(float={"max_rel": {"measured": 0.0}}), r"\[float\] max_rel = None"),
    (_profile(float={"max_rel": float("nan")}), r"\[float\] max_rel = nan"),
    (_profile(float={"min_cos": 2.0}), r"\[float\] min_cos = 2.0: a bound must be a finite number in \[-1, 1\]"),
    (_profile(logits={"max_kl": True}), r"\[logits\] max_kl = True"),
    (_profile(float={"max_rell": 0.0}), r"\[float\] has no bound 'max_rell'"),
    (_profile(integer={"max_kl": 0.0}), r"\[integer\] has no bound 'max_kl'"),
    (_profile(sites={"logits": {"max_rel": "x"}}), r"\[sites.\"logits\"\] max_rel = 'x'"),
    (_profile(sites={"logits": 1.0}), "'sites' must hold one table per site kind"),
    (_profile(flaot={"max_rel": 0.0}), "unknown key 'flaot'"),
    (_profile(auto="mirror"), "'auto' must be a list of precision pairs"),
    ({"custom": "loose"}, "profile 'custom': must be a table, got str"),
])
def test_a_custom_profile_with_a_bad_bound_is_refused_by_name(tmp_path, profile, words):
    """A text bound used to raise numpy's UFuncTypeError (a TypeError, not the ValueError every refusal
    is); a misspelt bound or a NaN one was never checked, so every comparison passed."""
    p = write(tmp_path / "t.st", {"logits": np.zeros((3, 8), np.float32)})
    with pytest.raises(CompareError, match=f"profile 'custom': {words}" if "custom" not in words else words):
        compare(p, p, profile="custom", profiles=profile)
    assert compare(p, p, profile="custom", profiles=_profile()).ok


def test_traces_whose_common_sites_hold_no_values_are_not_within_tolerance(tmp_path):
    """Zero values compared used to read `within tolerance: 1 sites compared`."""
    a = write(tmp_path / "a.st", {"layers.2.attn.compressed_kv": np.zeros((0, 4), np.float32)}, tokens=[5])
    with pytest.raises(CompareError, match=r"1 common site\(s\) hold no values .*: nothing to compare"):
        compare(a, a)


def test_a_float32_trace_gets_no_first_difference_lines_and_no_rsqrt_hint(tmp_path):
    """A float32 trace differs from any other by rounding at its first site: naming it says nothing; and
    its q norm is not bf16, so the bf16-rsqrt hint's premise does not hold even where attn.q fails first."""
    q = np.ones((2, 1, 4), np.float32)
    a = write(tmp_path / "a.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q * 1.5},
              tokens=[1, 2], precision="float32")
    b = write(tmp_path / "b.st", {"embed": np.ones((2, 4), np.float32), "layers.0.attn.q": q},
              tokens=[1, 2], precision="float64")
    r = compare(a, b, profile="float32-vs-float64")
    assert r.first["site"] == "layers.0.attn.q" and not any("rsqrt" in h for h in r.first["hints"])
    assert r.first["hints"] == [next(m for m in r.sites if m["site"] == "layers.0.attn.q")["hints"][0]]   # c = 1.5
    text = format_report(r)
    assert "first difference" not in text and "rsqrt" not in text


def test_metadata_that_names_a_key_twice_is_refused(tmp_path):
    """Python's json keeps the last of two equal keys; the metadata is read strictly (as the config is)."""
    p = tmp_path / "dup.st"
    save_file({"embed": np.ones((2, 4), np.float32)}, str(p),
              metadata={"refimpl": '{"format_version": 1, "tokens": [1, 2], "tokens": [1, 2, 3], "precision": "float64"}'})
    with pytest.raises(CompareError, match="duplicate key 'tokens'"):
        compare(p, p)



def test_a_float64_reference_takes_a_candidate_run_in_other_calls(tmp_path):
    """float64 rows do not depend on the chunking or the call type: a note, not a refusal."""
    x = {"embed": np.ones((3, 4), np.float32)}
    a = write(tmp_path / "a.st", x, precision="float32")
    b = write(tmp_path / "b.st", x, precision="float64", chunks=[1, 2])
    r = compare(a, b)
    assert r.ok and any("a float64 reference's rows do not depend on them" in n for n in r.notes)


def test_a_full_trace_is_cut_to_a_golden_traces_rows_and_positions_are_token_positions(tmp_path):
    """A golden trace keeps only some positions; a full-length candidate is cut to them, and the report names the
    token position, not the row; two different row selections are refused."""
    full = np.arange(40, dtype=np.float32).reshape(10, 4) + 1
    ref = write(tmp_path / "ref.st", {"embed": full[[0, 3, 7]]}, tokens=list(range(10)), golden_rows=[0, 3, 7])
    cand = full.copy()
    cand[7, 2] *= 1.5                                              # token 7, the golden trace's third row
    r = compare(write(tmp_path / "a.st", {"embed": cand}, tokens=list(range(10))), ref, profile="mirror-vs-mirror")
    assert not r.ok and r.first["position"] == 7 and r.first["worst"]["index"] == [7, 2]
    assert "FIRST OUT OF TOLERANCE: embed, position 7" in format_report(r)
    other = write(tmp_path / "o.st", {"embed": full[[0, 3]]}, tokens=list(range(10)), golden_rows=[0, 3])
    with pytest.raises(CompareError, match="keep different rows"):
        compare(other, ref)



@pytest.mark.parametrize("key, value", [("revision", "future"), ("layout", "diagonal")])
def test_metadata_naming_an_unknown_revision_or_layout_is_refused(tmp_path, key, value):
    p = write(tmp_path / "a.st", {"embed": np.ones((3, 4), np.float32)}, **{key: value})
    with pytest.raises(CompareError, match=f"metadata '{key}' is '{value}', not one of"):
        compare(p, p)


def test_sites_that_hold_no_rows_are_not_counted_as_compared(tmp_path):
    """A golden trace that keeps only the last position has no MTP rows (the MTP block's rows stop one position
    earlier): a candidate whose MTP block is wrong passes there, so the report must say those sites were empty,
    not count them as compared (found by an independent implementation: negated MTP norms passed 'within
    tolerance, 115 sites compared' on prefill-5)."""
    from refimpl.oracle.golden import default_dir
    ref = default_dir() / "traces" / "float64" / "prefill-5.safetensors"
    report = compare(ref, ref)
    empty = report.empty_sites
    mtp = [m["site"] for m in report.sites if m["site"].startswith(("mtp.", "layers.6."))]     # tiny: MTP = layer 6
    assert mtp and set(mtp) <= set(empty), empty                     # and compressed_kv before its first entry
    assert set(empty) - set(mtp) <= {"layers.3.attn.compressed_kv", "layers.5.attn.compressed_kv"}, empty
    assert all(report.sites[[m["site"] for m in report.sites].index(s)]["shape"][0] == 0 for s in empty)
    text = format_report(report)
    assert f"{len(report.sites) - len(empty)} sites compared; {len(empty)} held no rows here and were not " \
           f"compared" in text
    assert report.to_json()["empty_sites"] == empty
