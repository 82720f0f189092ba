"""Config: presets, the HF rename table, official config files, and bad configs (issue: foundation)."""
import json
from pathlib import Path

import pytest

from refimpl.formats.config_file import read_config
from refimpl.config import Config, ConfigError, from_hf_dict

DATA = Path(__file__).parent / "data"   # official_*config.json: DeepSeek-V4-Flash's files, unchanged


def _write(tmp_path, obj, name="config.json"):
    (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def test_official_hf_config_is_flash(tmp_path):
    raw = json.loads((DATA / "official_config.json").read_text())
    assert read_config(_write(tmp_path, raw)) == Config.flash()


def test_official_inference_config_is_flash(tmp_path):
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "config.json").write_text((DATA / "official_inference_config.json").read_text())
    assert read_config(tmp_path) == Config.flash()


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
        read_config(_write(tmp_path, raw))
    assert words in str(e.value) and "config.json" in str(e.value)


def test_inference_config_without_compress_rope_theta_is_refused(tmp_path):
    """docs/architecture.md §19.2: the ModelArgs default (40000) must never apply silently."""
    raw = json.loads((DATA / "official_inference_config.json").read_text())
    del raw["compress_rope_theta"]
    with pytest.raises(ConfigError, match="compress_rope_theta"):
        read_config(_write(tmp_path, raw))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.preset("huge")


def test_max_seq_len_is_a_load_option(tmp_path):
    cfg = read_config(_write(tmp_path, _flash_raw()), max_seq_len=1 << 20)
    assert cfg.max_seq_len == 1 << 20 and cfg.replace(max_seq_len=4096) == Config.flash()


# ---------------------------------------------------------------- field domains

@pytest.mark.parametrize("mutate, words", [
    (lambda r: r.update(rms_norm_eps=-1), "norm_eps = -1.0: must be > 0 and <= 1 (key 'rms_norm_eps')"),
    (lambda r: r["rope_scaling"].update(factor=0), "rope_factor = 0.0: must be >= 1 and <= 1e+06 (key 'rope_scaling.factor')"),
    (lambda r: r.update(rope_theta=-10000), "rope_theta = -10000.0: must be > 1"),
    (lambda r: r.update(compress_rope_theta=1), "compress_rope_theta = 1.0: must be > 1"),
    (lambda r: r.update(sliding_window=100_000_000), "window_size = 100000000: must be between 1 and 8192"),
    (lambda r: r.update(hc_sinkhorn_iters=100_000_000), "hc_sinkhorn_iters = 100000000: must be between 1 and 1000"),
    (lambda r: r.update(hc_eps=-1e-6), "hc_eps = -1e-06: must be > 0"),
    (lambda r: r.update(routed_scaling_factor=0), "route_scale = 0.0: must be > 0 and <= 10000 (key 'routed_scaling_factor')"),
    (lambda r: r.update(swiglu_limit=-10), "swiglu_limit = -10.0: must be >= 0"),
    (lambda r: r["rope_scaling"].update(beta_slow=0), "beta_slow = 0: must be between 1"),
    (lambda r: r["rope_scaling"].update(beta_fast=0), "beta_fast = 0: must be between 1"),
    (lambda r: r.update(eos_token_id=129280), "eos_token_id = 129280 is outside the vocabulary"),
    (lambda r: r.update(index_topk=0), "index_topk = 0: must be between 1"),
    (lambda r: r.update(compress_ratios=[128 << 8] * 44), "each must be 0, 4 (CSA) or an even ratio > 4 (HCA) up to 4096"),
    (lambda r: r.update(vocab_size=1 << 30), "vocab_size = 1073741824: must be between 1 and 16777216"),
    (lambda r: r.update(routed_scaling_factor=1e308), "route_scale = 1e+308: must be > 0 and <= 10000"),
    (lambda r: r.update(rope_theta=1e300), "rope_theta = 1e+300: must be > 1 and <= 1e+09"),
    (lambda r: r.update(swiglu_limit=1e300), "swiglu_limit = 1e+300: must be >= 0 and <= 10000"),
])
def test_field_domains_are_checked_naming_the_field(tmp_path, mutate, words):
    """rms_norm_eps -1 / rope factor 0 gave all-NaN logits, a negative rope_theta 'math domain error',
    sliding_window 1e8 allocated 47 GiB, hc_sinkhorn_iters 1e8 hung: each is now refused on reading."""
    raw = _flash_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        read_config(_write(tmp_path, raw))
    assert words in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("text, words", [('NaN', "NaN is not a JSON number (JSON numbers are finite)"),
                                         ('-Infinity', "-Infinity is not a JSON number"),
                                         ('1e999', "number 1e999 is too large for a float")])
def test_non_finite_numbers_in_config_json_are_named(tmp_path, text, words):
    """NaN / Infinity were reported as 'wrong type: nan (expected float)' (issue 25)."""
    raw = json.dumps(_flash_raw()).replace('"routed_scaling_factor": 1.5', f'"routed_scaling_factor": {text}')
    assert text in raw
    (tmp_path / "config.json").write_text(raw)
    with pytest.raises(ConfigError, match=None) as e:
        read_config(tmp_path)
    assert f"config.json: {words}" in str(e.value)


@pytest.mark.parametrize("value, words", [(float("nan"), "is nan, not a finite number"),
                                          (float("inf"), "is inf, not a finite number"),
                                          (10 ** 400, "is an integer too large for a float")])
def test_non_finite_numbers_in_a_python_dict_are_named(value, words):
    raw = _flash_raw()
    raw["routed_scaling_factor"] = value
    with pytest.raises(ConfigError, match=f"key for 'route_scale' {words}"):
        from_hf_dict(raw)


def test_duplicate_keys_in_config_json_are_refused(tmp_path):
    """json keeps the last of two equal keys; the config reader refuses them (issue 25)."""
    text = json.dumps(_flash_raw()).replace('"num_hidden_layers": 43', '"num_hidden_layers": 43, "num_hidden_layers": 4')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json: duplicate key 'num_hidden_layers' in a JSON object"):
        read_config(tmp_path)


@pytest.mark.parametrize("field, value", [("window_size", 2.5), ("n_layers", True), ("dim", "4096"),
                                          ("norm_eps", float("nan")), ("rope_factor", float("inf")),
                                          ("route_scale", None), ("compress_ratios", [0, 0, 4, 16, 4, 16, 0]),
                                          ("max_seq_len", 4096.0)])
def test_python_built_configs_are_type_checked(field, value):
    """Config(...) in Python gets the same checks as a file: no float where an int belongs, no bool as 1."""
    with pytest.raises(ConfigError, match=rf"^{field} = .*must be") as e:
        Config.tiny().replace(**{field: value})
    assert e.value.field == field


def test_every_int_field_has_a_range_admitting_the_releases():
    """Each bound admits Flash and Pro; one past it is refused with the field named."""
    import dataclasses
    from refimpl.config import FIELD_RANGES
    ints = {f.name for f in dataclasses.fields(Config) if f.type == "int"}
    assert set(FIELD_RANGES) == ints
    for cfg in (Config.flash(), Config.pro(), Config.tiny()):
        for name, (lo, hi) in FIELD_RANGES.items():
            assert lo <= getattr(cfg, name) <= hi, name
    for name, (lo, hi) in FIELD_RANGES.items():
        with pytest.raises(ConfigError, match=rf"\b{name}\b") as e:
            Config.tiny().replace(**{name: hi + 1})
        assert e.value.field is not None


def test_every_real_field_has_a_range_admitting_the_releases():
    """Each float field is bounded on both sides (1e308 overflowed in the model, issue 25); the releases pass."""
    import dataclasses
    from refimpl.config import REAL_RANGES
    assert set(REAL_RANGES) == {f.name for f in dataclasses.fields(Config) if f.type == "float"}
    for cfg in (Config.flash(), Config.pro(), Config.tiny()):
        for name, (lo, _, hi) in REAL_RANGES.items():
            assert lo <= getattr(cfg, name) <= hi, name
    for name, (lo, _, hi) in REAL_RANGES.items():
        with pytest.raises(ConfigError, match=rf"^{name} = .*<= ") as e:
            Config.tiny().replace(**{name: hi * 2})
        assert e.value.field == name
