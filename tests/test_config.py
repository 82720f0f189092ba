"""Config: presets, the HF rename table, official config files, and bad configs (issue: foundation)."""
import json
from pathlib import Path

import pytest

from refimpl.config import Config, ConfigError, from_hf_dict

DATA = Path(__file__).parent / "data"   # official_*config.json: DeepSeek-V4-Flash's files, unchanged


def _write(tmp_path, obj, name="config.json"):
    (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def test_official_hf_config_is_flash(tmp_path):
    raw = json.loads((DATA / "official_config.json").read_text())
    assert Config.from_checkpoint(_write(tmp_path, raw)) == Config.flash()


def test_official_inference_config_is_flash(tmp_path):
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "config.json").write_text((DATA / "official_inference_config.json").read_text())
    assert Config.from_checkpoint(tmp_path) == Config.flash()


@pytest.mark.parametrize("preset", ["flash", "pro", "tiny"])
def test_hf_dict_round_trip(preset):
    cfg = Config.preset(preset)
    assert Config(**from_hf_dict(cfg.to_hf_dict())) == cfg


def test_flash_values_of_the_spec():
    c = Config.flash()
    assert (c.dim, c.n_layers, c.n_heads, c.head_dim, c.rope_head_dim) == (4096, 43, 64, 512, 64)
    assert len(c.compress_ratios) == 44 and c.compress_ratios[:4] == (0, 0, 4, 128) and c.compress_ratios[42:] == (4, 0)
    assert (c.compress_rope_theta, c.rope_theta, c.rope_factor, c.original_seq_len) == (160000, 10000, 16, 65536)
    assert (c.index_topk, c.n_routed_experts, c.n_activated_experts, c.route_scale) == (512, 256, 6, 1.5)


def test_predicates_follow_the_official_rules():
    c = Config.flash()
    assert [c.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert not c.is_hash_layer(c.mtp_layer)
    assert [c.uses_indexer(i) for i in (0, 2, 3, 42, 43)] == [False, True, False, True, False]
    assert [c.rope_base(i) for i in (0, 1, 2, 3, 43)] == [10000, 10000, 160000, 160000, 10000]
    assert [c.rope_original_seq_len(i) for i in (0, 2, 43)] == [0, 65536, 0]


def test_tiny_keeps_every_structural_feature():
    t = Config.tiny()
    kinds = {r for r in t.compress_ratios[:t.n_layers]}
    assert kinds == {0, 4, 16} and t.compress_ratios[t.n_layers] == 0
    assert t.n_hash_layers >= 1 and t.hc_mult == 4 and t.n_activated_experts >= 2 and t.n_mtp_layers == 1
    assert (t.head_dim - t.rope_head_dim) % 64 == 0


def _flash_raw():
    return json.loads((DATA / "official_config.json").read_text())


@pytest.mark.parametrize("mutate, words", [
    (lambda r: r.pop("compress_rope_theta"), "missing keys ['compress_rope_theta']"),
    (lambda r: r.update(rope_thta=1), "unknown keys ['rope_thta']"),
    (lambda r: r.update(num_key_value_heads=8), "num_key_value_heads"),
    (lambda r: r.update(scoring_func="softmax"), "score_func"),
    (lambda r: r.update(compress_ratios=[0, 4]), "compress_ratios has 2 entries"),
    (lambda r: r.update(hidden_size="4096"), "wrong type"),
    (lambda r: r.update(head_dim=500), "multiple of 64"),
    (lambda r: r["quantization_config"].update(weight_block_size=[64, 64]), "quantization_config"),
])
def test_bad_configs_are_clear_errors(tmp_path, mutate, words):
    raw = _flash_raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=None) as e:
        Config.from_checkpoint(_write(tmp_path, raw))
    assert words in str(e.value) and "config.json" in str(e.value)


def test_inference_config_without_compress_rope_theta_is_refused(tmp_path):
    """docs/architecture.md §19.2: the ModelArgs default (40000) must never apply silently."""
    raw = json.loads((DATA / "official_inference_config.json").read_text())
    del raw["compress_rope_theta"]
    with pytest.raises(ConfigError, match="compress_rope_theta"):
        Config.from_checkpoint(_write(tmp_path, raw))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Config.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.preset("huge")


def test_max_seq_len_is_a_load_option(tmp_path):
    cfg = Config.from_checkpoint(_write(tmp_path, _flash_raw()), max_seq_len=1 << 20)
    assert cfg.max_seq_len == 1 << 20 and cfg.replace(max_seq_len=4096) == Config.flash()
