"""synthetic.py: random-weight checkpoints in the official format; inspect summaries."""
import hashlib
import json

import numpy as np
import pytest

from refimpl.formats.config_file import read_config
import refimpl.synthetic.writer as synthetic
from refimpl.formats.checkpoint import CheckpointError, TensorSource
from refimpl.config import Config, ConfigError
from refimpl.numerics import dequant_fp4_weight, dequant_fp8_weight
from refimpl.formats.inspect import summarize
from refimpl.synthetic.writer import make_checkpoint, shrink
from refimpl.formats.weights import check_checkpoint, expected_tensors

TINY = Config.tiny()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "tiny"
    cfg = make_checkpoint(TINY, out, seed=0, shard_bytes=2 * 2**20)
    assert cfg == TINY
    return out


def _hashes(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------- format

def test_tiny_checkpoint_files(tiny_ckpt):
    names = {p.name for p in tiny_ckpt.iterdir()}
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert names == set(shards) | {"model.safetensors.index.json", "config.json", "generation_config.json",
                                   "tokenizer.json", "tokenizer_config.json", "written_by_refimpl.json"}
    assert not list(tiny_ckpt.parent.glob("*.tmp-*"))                 # no temporaries left
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    src = TensorSource(tiny_ckpt)
    assert index["metadata"]["total_size"] == sum(src.nbytes(k) for k in src.keys())


def test_tiny_checkpoint_validates_and_round_trips_config(tiny_ckpt):
    cfg = read_config(tiny_ckpt)
    assert cfg == TINY
    check_checkpoint(TensorSource(tiny_ckpt), cfg)
    assert json.loads((tiny_ckpt / "config.json").read_text()) == TINY.to_hf_dict()


def test_tokenizer_matches_vocab(tiny_ckpt):
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == TINY.vocab_size


def test_deterministic_for_a_seed(tiny_ckpt, tmp_path):
    again = make_checkpoint(TINY, tmp_path / "again", seed=0, shard_bytes=2 * 2**20)
    assert again == TINY
    assert _hashes(tmp_path / "again") == _hashes(tiny_ckpt)
    make_checkpoint(TINY, tmp_path / "other", seed=1, shard_bytes=2 * 2**20)
    h0, h1 = _hashes(tiny_ckpt), _hashes(tmp_path / "other")
    assert h0["config.json"] == h1["config.json"]
    assert all(h0[k] != h1[k] for k in h0 if k.startswith("model-"))


def test_tensor_bytes_do_not_depend_on_sharding(tiny_ckpt, tmp_path):
    one = make_checkpoint(TINY, tmp_path / "one", seed=0)                # a single shard
    a, b = TensorSource(tiny_ckpt), TensorSource(tmp_path / "one")
    assert one == TINY and len(b.files) == 1
    for name in ("layers.2.attn.wq_b.weight", "layers.2.attn.wq_b.scale", "layers.5.ffn.experts.7.w3.weight",
                 "embed.weight", "mtp.0.hc_head_base"):
        assert a.get(name).tobytes() == b.get(name).tobytes(), name


@pytest.mark.parametrize("layers, experts", [(3, 4), (1, None), (None, 1)])
def test_layers_and_experts_overrides(tmp_path, layers, experts):
    out = tmp_path / "small"
    cfg = make_checkpoint(TINY, out, seed=3, layers=layers, experts=experts)
    n = layers or TINY.n_layers
    assert cfg.n_layers == n and cfg.compress_ratios == TINY.compress_ratios[:n] + TINY.compress_ratios[-1:]
    assert cfg.n_hash_layers == min(TINY.n_hash_layers, n)
    assert cfg.n_routed_experts == (experts or TINY.n_routed_experts)
    assert cfg.n_activated_experts == min(TINY.n_activated_experts, cfg.n_routed_experts)
    assert read_config(out) == cfg
    check_checkpoint(TensorSource(out), read_config(out))


def test_shrink_rejects_out_of_range():
    with pytest.raises(ConfigError, match="layers = 0"):
        shrink(TINY, layers=0)
    with pytest.raises(ConfigError, match="experts = 9"):
        shrink(TINY, experts=9)


def test_non_integer_counts_and_seeds_are_refused(tmp_path):
    """layers=2.5 used to fail with a TypeError deep in slicing, seed=True to run as seed 1."""
    for kwargs in ({"layers": 2.5}, {"experts": True}):
        with pytest.raises(ConfigError, match=f"{next(iter(kwargs))} = .*: must be an int"):
            shrink(TINY, **kwargs)
    for seed in (True, 1.0, -1):
        with pytest.raises(ConfigError, match="seed = .*: must be an int >= 0"):
            make_checkpoint(TINY, tmp_path / "x", seed=seed, layers=1, experts=2)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- weight scales

def test_quantized_linear_weights_have_std_one_over_sqrt_fan_in(tiny_ckpt):
    src = TensorSource(tiny_ckpt)
    for base in ("layers.3.ffn.experts.0.w1", "layers.3.ffn.experts.6.w2", "mtp.0.ffn.experts.2.w3"):
        w = dequant_fp4_weight(src.get(base + ".weight"), src.get(base + ".scale"))
        assert abs(w.std() * np.sqrt(w.shape[1]) - 1) < 0.1, base
        assert abs(w.mean()) < 0.1 * w.std()
    for base in ("layers.2.attn.wq_b", "layers.0.attn.wo_a", "layers.1.ffn.shared_experts.w2", "mtp.0.e_proj"):
        w = dequant_fp8_weight(src.get(base + ".weight"), src.get(base + ".scale"))
        assert abs(w.std() * np.sqrt(w.shape[1]) - 1) < 0.05, base


def test_fp4_codes_look_like_a_quantized_gaussian(tiny_ckpt):
    packed = np.asarray(TensorSource(tiny_ckpt).get("layers.4.ffn.experts.1.w1.weight")).view(np.uint8)
    nibbles = np.concatenate([packed & 15, packed >> 4]).ravel()
    counts = np.bincount(nibbles & 7, minlength=8) / nibbles.size      # by magnitude code
    assert counts[7] < 0.05 and counts[0] > 0.05                       # ±6 rare, zeros present
    assert abs(np.mean(nibbles >= 8) - 0.5) < 0.02                     # symmetric signs


def test_other_tensors_have_the_documented_scales(tiny_ckpt):
    src = TensorSource(tiny_ckpt)
    f = lambda name: np.asarray(src.get(name)).astype(np.float64)     # noqa: E731
    n, c = TINY.hc_mult, TINY.dim
    assert abs(f("embed.weight").std() - 1) < 0.05
    assert abs(f("head.weight").std() * np.sqrt(c) - 1) < 0.05
    for name in ("norm.weight", "layers.0.attn.q_norm.weight", "layers.2.attn.indexer.compressor.norm.weight",
                 "mtp.0.enorm.weight"):
        assert abs(f(name).mean() - 1) < 0.01 and f(name).std() < 0.05, name
    assert abs(f("layers.1.hc_ffn_fn").std() * np.sqrt(n * c) - 1) < 0.05
    base = f("layers.1.hc_attn_base")
    assert np.allclose(1 / (1 + np.exp(-base[:n])), 1 / n, atol=0.03)          # pre ≈ 1/n
    assert np.allclose(2 / (1 + np.exp(-base[n:2 * n])), 1, atol=0.1)         # post ≈ 1
    comb = base[2 * n:].reshape(n, n)
    assert (np.diag(comb) > 1.5).all() and (np.abs(comb - np.diag(np.diag(comb))) < 0.3).all()
    assert ((f("layers.1.hc_attn_scale") > 0.1) & (f("layers.1.hc_attn_scale") < 1)).all()
    assert np.allclose(1 / (1 + np.exp(-f("hc_head_base"))), 1 / n, atol=0.03)
    assert f("layers.4.ffn.gate.bias").std() < 0.2 and f("layers.2.attn.compressor.ape").std() < 0.2
    tid2eid = np.asarray(src.get("layers.0.ffn.gate.tid2eid"))
    assert tid2eid.shape == (TINY.vocab_size, TINY.n_activated_experts)
    assert tid2eid.min() >= 0 and tid2eid.max() < TINY.n_routed_experts
    assert (np.sort(tid2eid, axis=1)[:, 1:] != np.sort(tid2eid, axis=1)[:, :-1]).all()   # distinct per row
    assert len(np.unique(tid2eid)) == TINY.n_routed_experts


# ---------------------------------------------------------------- atomic output

def test_refuses_a_non_empty_output(tiny_ckpt, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not an empty folder"):
        make_checkpoint(TINY, tmp_path / "busy")
    # overwrite replaces only a folder refimpl wrote: another file in it would be lost
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder written by refimpl \(no written_by_refimpl"):
        make_checkpoint(TINY, tmp_path / "busy", overwrite=True, layers=1, experts=2)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["f"]
    (tmp_path / "busy" / "written_by_refimpl.json").write_text("{}")     # marked, but holding another file
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder written by refimpl \(it holds 'f'\)"):
        make_checkpoint(TINY, tmp_path / "busy", overwrite=True, layers=1, experts=2)
    make_checkpoint(TINY, tmp_path / "ck", layers=2, experts=2)
    make_checkpoint(TINY, tmp_path / "ck", overwrite=True, layers=1, experts=2)
    assert read_config(tmp_path / "ck").n_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "ck"]       # old copy and temporaries gone


def test_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(synthetic, "_write_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        make_checkpoint(TINY, tmp_path / "out", layers=1, experts=2)
    assert list(tmp_path.iterdir()) == []


def test_large_vocab_skips_the_tokenizer_with_a_note(tmp_path, capsys):
    cfg = make_checkpoint(TINY.replace(vocab_size=40000), tmp_path / "v", layers=1, experts=2)
    assert "no tokenizer written" in capsys.readouterr().err
    assert not (tmp_path / "v" / "tokenizer.json").exists()
    check_checkpoint(TensorSource(tmp_path / "v"), cfg)


# ---------------------------------------------------------------- inspect

@pytest.mark.slow
def test_flash_one_layer_two_experts(tmp_path):
    cfg = make_checkpoint(Config.flash(), tmp_path / "f", layers=1, experts=2, progress=False)
    assert cfg.n_layers == 1 and cfg.compress_ratios == (0, 0)
    assert summarize(tmp_path / "f")["ok"]
