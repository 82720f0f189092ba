"""weights.py: the key table of docs/architecture.md §16 and checkpoint validation against a Config."""
import math
import re

import numpy as np
import pytest

from refimpl.formats.checkpoint import DTYPES, CheckpointError, TensorSource, write_safetensors
from refimpl.config import Config
from refimpl.synthetic.writer import make_checkpoint
from refimpl.formats.weights import KINDS, TensorSpec, check_checkpoint, expected_tensors, validate

TINY = Config.tiny()


@pytest.fixture(scope="module")
def flash_specs():
    return expected_tensors(Config.flash())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "tiny"
    make_checkpoint(TINY, out, seed=0, shard_bytes=2 * 2**20)
    return out


# ---------------------------------------------------------------- the inventory

def test_flash_inventory_count_and_total_size(flash_specs):
    specs = flash_specs
    assert len(specs) == 69_187                                  # the official index's tensor count
    total = sum(math.prod(s.shape) * DTYPES[s.dtype].itemsize for s in specs.values())
    assert total == 159_609_485_896                              # S4: index.json metadata.total_size


@pytest.mark.parametrize("name, dtype, shape", [
    ("layers.2.attn.wq_b.weight", "F8_E4M3", (32768, 1024)),
    ("layers.2.attn.wq_b.scale", "F8_E8M0", (256, 8)),
    ("layers.0.attn.wq_a.scale", "F8_E8M0", (8, 32)),
    ("layers.0.attn.wkv.scale", "F8_E8M0", (4, 32)),
    ("layers.0.attn.wo_a.weight", "F8_E4M3", (8192, 4096)),
    ("layers.0.attn.wo_b.scale", "F8_E8M0", (32, 64)),
    ("layers.0.attn.attn_sink", "F32", (64,)),
    ("layers.0.attn.kv_norm.weight", "BF16", (512,)),
    ("layers.3.ffn.experts.255.w1.weight", "I8", (2048, 2048)),
    ("layers.3.ffn.experts.0.w1.scale", "F8_E8M0", (2048, 128)),
    ("layers.3.ffn.experts.7.w2.weight", "I8", (4096, 1024)),
    ("layers.3.ffn.experts.7.w2.scale", "F8_E8M0", (4096, 64)),
    ("layers.3.ffn.shared_experts.w1.scale", "F8_E8M0", (16, 32)),
    ("layers.3.ffn.shared_experts.w2.weight", "F8_E4M3", (4096, 2048)),
    ("layers.2.attn.compressor.wkv.weight", "BF16", (1024, 4096)),
    ("layers.3.attn.compressor.wgate.weight", "BF16", (512, 4096)),
    ("layers.2.attn.compressor.ape", "F32", (4, 1024)),
    ("layers.3.attn.compressor.ape", "F32", (128, 512)),
    ("layers.2.attn.compressor.norm.weight", "BF16", (512,)),
    ("layers.2.attn.indexer.wq_b.scale", "F8_E8M0", (64, 8)),
    ("layers.2.attn.indexer.weights_proj.weight", "BF16", (64, 4096)),
    ("layers.2.attn.indexer.compressor.wkv.weight", "BF16", (256, 4096)),
    ("layers.2.attn.indexer.compressor.ape", "F32", (4, 256)),
    ("layers.2.attn.indexer.compressor.norm.weight", "BF16", (128,)),
    ("layers.2.ffn.gate.tid2eid", "I64", (129280, 6)),
    ("layers.3.ffn.gate.bias", "F32", (256,)),
    ("layers.42.hc_ffn_fn", "F32", (24, 16384)),
    ("layers.42.hc_attn_base", "F32", (24,)),
    ("layers.42.hc_attn_scale", "F32", (3,)),
    ("embed.weight", "BF16", (129280, 4096)),
    ("head.weight", "BF16", (129280, 4096)),
    ("hc_head_fn", "F32", (4, 16384)),
    ("hc_head_scale", "F32", (1,)),
    ("mtp.0.e_proj.scale", "F8_E8M0", (32, 32)),
    ("mtp.0.h_proj.weight", "F8_E4M3", (4096, 4096)),
    ("mtp.0.ffn.gate.bias", "F32", (256,)),
    ("mtp.0.hc_head_base", "F32", (4,)),
])
def test_flash_shapes_spec_5_1(flash_specs, name, dtype, shape):
    s = flash_specs[name]
    assert (s.dtype, s.shape) == (dtype, shape)


def test_flash_layer_structure(flash_specs):
    specs = flash_specs
    assert "layers.3.ffn.gate.tid2eid" not in specs and "layers.2.ffn.gate.bias" not in specs
    assert "layers.0.attn.compressor.ape" not in specs and "layers.1.attn.compressor.ape" not in specs
    assert "layers.3.attn.indexer.wq_b.weight" not in specs            # HCA: no indexer
    assert not any(k.startswith("mtp.0.attn.compressor") or k.startswith("mtp.0.attn.indexer") for k in specs)
    assert "mtp.0.ffn.gate.tid2eid" not in specs and "mtp.0.embed.weight" not in specs
    assert "layers.43.attn_norm.weight" not in specs
    kinds = {s.kind for s in specs.values()}
    assert kinds == set(KINDS)
    assert all(s.kind == "mtp" for k, s in specs.items() if k.startswith("mtp."))


def test_tiny_inventory_follows_the_config():
    specs = expected_tensors(TINY)
    for i in range(TINY.n_layers):
        p = f"layers.{i}."
        assert (p + "attn.compressor.ape" in specs) == TINY.uses_compressor(i)
        assert (p + "attn.indexer.wq_b.weight" in specs) == TINY.uses_indexer(i)
        assert (p + "ffn.gate.tid2eid" in specs) == TINY.is_hash_layer(i)
        assert (p + "ffn.gate.bias" in specs) != TINY.is_hash_layer(i)
        assert sum(k.startswith(p + "ffn.experts.") for k in specs) == 6 * TINY.n_routed_experts
    assert specs["layers.3.attn.compressor.ape"].shape == (16, 128)   # HCA ratio 16: coff 1
    assert specs["layers.2.attn.compressor.wkv.weight"].shape == (256, 256)   # CSA: coff 2
    assert specs["layers.0.ffn.gate.tid2eid"] == TensorSpec("I64", (1280, 2), "router")


def test_pro_inventory_builds():
    specs = expected_tensors(Config.pro())
    assert specs["layers.0.attn.wq_b.scale"].shape == (512, 12)      # 128*512 / 128, 1536 / 128
    assert specs["layers.0.attn.compressor.ape"].shape == (128, 512)


# ---------------------------------------------------------------- validation

def _rewrite(src: TensorSource, path, *, drop=(), add=None, reshape=None, retype=None, poke=None):
    """Copy src into one file with one change: drop names, add {name: array}, reshape/retype {name: spec}."""
    specs, arrays = {}, {}
    for name in src.keys():
        if name in drop:
            continue
        specs[name] = (src.dtype(name), src.shape(name))
    for name, a in (add or {}).items():
        specs[name] = (next(k for k, d in DTYPES.items() if d == a.dtype), a.shape)
        arrays[name] = a
    for name, shape in (reshape or {}).items():
        specs[name] = (specs[name][0], shape)
        arrays[name] = np.zeros(shape, DTYPES[specs[name][0]])
    for name, dtype in (retype or {}).items():
        specs[name] = (dtype, specs[name][1])
        arrays[name] = np.zeros(specs[name][1], DTYPES[dtype])
    for name, (index, byte) in (poke or {}).items():
        a = np.array(src.get(name, record=False))
        a.view(np.uint8).reshape(-1)[index] = byte
        arrays[name] = a
    write_safetensors(path, specs, lambda n: arrays[n] if n in arrays else src.get(n, record=False))
    return TensorSource(path)


def test_valid_checkpoint_has_no_problems(tiny_ckpt):
    src = TensorSource(tiny_ckpt)
    assert validate(src, TINY) == []
    check_checkpoint(src, TINY)
    assert not src.used                                           # validation reads without recording


def test_full_read_uses_every_tensor_exactly_once(tiny_ckpt):
    src = TensorSource(tiny_ckpt)
    for name in expected_tensors(TINY):
        src.get(name)
    assert set(src.used) == set(src.keys()) and set(src.used.values()) == {1}


def test_missing_tensor(tiny_ckpt, tmp_path):
    src = _rewrite(TensorSource(tiny_ckpt), tmp_path / "m.safetensors", drop={"layers.2.attn.indexer.wq_b.scale"})
    assert validate(src, TINY) == ["missing tensor 'layers.2.attn.indexer.wq_b.scale' (F8_E8M0 [16, 1])"]
    with pytest.raises(CheckpointError, match=r"(?s)1 problem.*missing tensor 'layers\.2\.attn\.indexer\.wq_b\.scale'"):
        check_checkpoint(src, TINY)


def test_extra_tensor(tiny_ckpt, tmp_path):
    src = _rewrite(TensorSource(tiny_ckpt), tmp_path / "x.safetensors",
                   add={"layers.0.attn.indexer.wq_b.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensor 'layers\.0\.attn\.indexer\.wq_b\.weight' \(F32 \[4, 4\]\)"):
        check_checkpoint(src, TINY)


def test_misshaped_tensor(tiny_ckpt, tmp_path):
    src = _rewrite(TensorSource(tiny_ckpt), tmp_path / "s.safetensors", reshape={"layers.1.attn.wkv.scale": (2, 3)})
    with pytest.raises(CheckpointError,
                       match=r"tensor 'layers\.1\.attn\.wkv\.scale' has shape \[2, 3\], expected \[1, 2\]"):
        check_checkpoint(src, TINY)


def test_mistyped_tensor(tiny_ckpt, tmp_path):
    src = _rewrite(TensorSource(tiny_ckpt), tmp_path / "t.safetensors", retype={"embed.weight": "F32"})
    with pytest.raises(CheckpointError, match=r"tensor 'embed\.weight' has dtype F32, expected BF16"):
        check_checkpoint(src, TINY)


@pytest.mark.parametrize("name", ["layers.4.attn.wo_b.scale", "layers.3.ffn.experts.5.w2.scale"])
def test_nan_e8m0_scale(tiny_ckpt, tmp_path, name):
    src = _rewrite(TensorSource(tiny_ckpt), tmp_path / "n.safetensors", poke={name: (0, 0xFF)})
    assert validate(src, TINY, scan_scales=False) == []
    with pytest.raises(CheckpointError, match=rf"tensor '{name}': 1 E8M0 scale byte\(s\) are 0xFF \(NaN\)"):
        check_checkpoint(src, TINY)


def test_wrong_config_lists_problems_with_a_cap(tiny_ckpt):
    with pytest.raises(CheckpointError, match=r"(?s)problem\(s\).*\.\.\. and \d+ more"):
        check_checkpoint(TensorSource(tiny_ckpt), TINY.replace(n_routed_experts=16))


def test_unlisted_shard_tensor_is_a_problem(tiny_ckpt, tmp_path):
    import json
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["layers.0.attn.wq_a.scale"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = validate(d, TINY)
    assert any("missing tensor 'layers.0.attn.wq_a.scale'" in p for p in problems)
    assert any("'layers.0.attn.wq_a.scale' in shard" in p and "not listed in the index" in p for p in problems)


@pytest.mark.parametrize("value", [2.9, True, "4096", 0.0])
def test_load_refuses_a_non_integer_max_seq_len(tiny_ckpt, value):
    """2.9 used to run as 2 and True as 1."""
    from refimpl.config import ConfigError
    from refimpl.formats.weights import load
    with pytest.raises(ConfigError, match=r"max_seq_len = .*: must be an int"):
        load(tiny_ckpt, max_seq_len=value)


def test_load_refuses_an_out_of_range_tid2eid(tiny_ckpt, patched_ckpt):
    """-1 in the hash-routing table used to pick the last expert silently."""
    from refimpl.formats.weights import load
    name = "layers.0.ffn.gate.tid2eid"
    bad = patched_ckpt({name: {3 * TINY.n_activated_experts + 1: -1}})
    assert validate(bad, TINY) == [f"tensor {name!r}: 1 expert id(s) outside [0, n_routed_experts = 8), "
                                   "the first -1 for token id 3"]
    with pytest.raises(CheckpointError, match=rf"tensor '{name}': 1 expert id\(s\) outside"):
        load(bad)


@pytest.mark.parametrize("tensor, index, value", [
    ("layers.0.attn.attn_sink", 1, np.float32(-np.inf)),        # the forward stays finite: sink ignored
    ("layers.3.attn.compressor.ape", 4, np.float32(-np.inf)),   # the forward stays finite: one row dropped
    ("layers.2.hc_attn_fn", 0, np.float32(np.nan)),              # an mHC tensor
    ("layers.4.ffn.gate.bias", 3, np.float32(np.inf)),           # would always choose expert 3
])
def test_nonfinite_f32_weights_are_refused_at_load(patched_ckpt, tensor, index, value):
    """Inf in a sink, ape or router bias can vanish into a softmax or a top-k without reaching any
    site, so load scans the (small) F32 tensors and names the tensor."""
    from refimpl.formats.weights import load
    with pytest.raises(CheckpointError, match=rf"NaN/Inf in the weights: tensor '{re.escape(tensor)}': 1 NaN/Inf"):
        load(patched_ckpt({tensor: {index: value}}))


@pytest.mark.parametrize("cfg", [TINY, TINY.replace(n_routed_experts=16), Config.flash(), Config.pro(),
                                 Config.flash().replace(n_mtp_layers=0, compress_ratios=Config.flash().compress_ratios[:-1])])
def test_expected_size_counts_what_expected_tensors_lists(cfg):
    from refimpl.formats.checkpoint import spec_nbytes
    from refimpl.formats.weights import expected_size
    specs = expected_tensors(cfg)
    assert expected_size(cfg) == (len(specs), sum(spec_nbytes(s) for s in specs.values()))


def test_load_refuses_a_config_implying_far_more_tensors_at_once(tiny_ckpt, tmp_path):
    """Checked against the files before any per-tensor work (issue 25): one line, in well under a second."""
    import time
    big = TINY.replace(n_routed_experts=1 << 16, n_layers=64, compress_ratios=(0,) * 65)
    src = TensorSource(tiny_ckpt)
    t0 = time.perf_counter()
    problems = validate(src, big)
    assert time.perf_counter() - t0 < 2
    assert problems == [f"the config implies {6 * 65 * 2**16 + len(expected_tensors(big, experts=False)):,} tensors "
                        f"of 209 GiB, but the checkpoint holds {len(src)} of 10.7 MiB: config.json does not "
                        "describe these files (not compared tensor by tensor)"]
    few = TINY.replace(n_routed_experts=16)                     # twice the tensors: every one is still named
    assert sum(p.startswith("missing tensor") for p in validate(src, few, scan_scales=False)) == 6 * 8 * 7


def test_the_head_is_resident_where_the_numba_kernel_runs_its_product(tiny_ckpt):
    """load() reads the head into anonymous memory when fp32_linear runs the Numba kernel (or when asked),
    and maps it otherwise; the values and the logits are the same either way."""
    from refimpl.formats.weights import load
    mapped = load(tiny_ckpt, precision="mirror", kernels="numpy")
    assert isinstance(mapped.weights.head.base, np.memmap) or isinstance(mapped.weights.head, np.memmap)
    for kernels, resident in (("numba", None), ("numba,fp32_linear=numpy", True), ("numpy", True)):
        m = load(tiny_ckpt, precision="mirror", kernels=kernels, resident_head=resident)
        head = m.weights.head
        assert not isinstance(head, np.memmap) and not isinstance(head.base, np.memmap), kernels
        assert not head.flags.writeable and head.tobytes() == mapped.weights.head.tobytes()
        assert m.weights_id == mapped.weights_id
    assert isinstance(load(tiny_ckpt, kernels="numba,fp32_linear=numpy").weights.head.base, np.memmap)
    ids = np.arange(5)
    a = load(tiny_ckpt, precision="mirror", kernels="numba", resident_head=False).forward(ids)
    b = load(tiny_ckpt, precision="mirror", kernels="numba").forward(ids)
    assert np.array_equal(a, b)
