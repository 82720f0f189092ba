"""Tests of refimpl.numerics: formats on named and on all codes, quantization, modes, small math."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refimpl import numerics as nx
from helpers import bf16_values, ulp_e2m1, ulp_e4m3

pytestmark = pytest.mark.filterwarnings("error")       # no overflow / invalid-value warnings anywhere

ALL_BYTES = np.arange(256, dtype=np.uint8)


def same_floats(a, b):
    """Equal values, equal signs of zero, NaN in the same places."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    assert np.array_equal(a[ok], b[ok])
    assert np.array_equal(np.signbit(a[ok]), np.signbit(b[ok]))


# ------------------------------------------------------------------------------------------------
# precision modes

def test_precisions_and_work_dtype():
    assert nx.PRECISIONS == ("float64", "float32", "mirror")
    assert nx.work_dtype("float64") is np.float64
    assert nx.work_dtype("float32") is np.float32
    assert nx.work_dtype("mirror") is np.float32
    for bad in ("bf16", "Mirror", "", None):
        with pytest.raises(ValueError):
            nx.check_precision(bad)
        with pytest.raises(ValueError):
            nx.work_dtype(bad)


def test_mode_steps_identity_outside_mirror():
    x = np.array([[1.0 + 2**-9, 3.3, -7.1] * 64], dtype=np.float32)   # [1, 192]
    for prec in ("float64", "float32"):
        assert nx.bf16(x, prec) is x
        assert nx.qdq_fp8(x, prec, block=64) is x
        assert nx.qdq_fp4(x, prec) is x
    assert np.array_equal(nx.bf16(x, "mirror"), nx.round_bf16(x))
    assert np.array_equal(nx.qdq_fp8(x, "mirror", block=64), nx.qdq_fp8_values(x, block=64))
    assert np.array_equal(nx.qdq_fp4(x, "mirror"), nx.qdq_fp4_values(x, block=32))
    x64 = np.array([1 + 2**-40], dtype=np.float64)
    once = nx.rounded_once(lambda v: v + 0, x64, prec="mirror")
    assert once.dtype == np.float32 and once[0] == 1.0                      # exact inside, rounded once to fp32
    assert nx.rounded_once(lambda v: v + 0, x64, prec="float64")[0] == 1 + 2**-40   # plain math outside mirror


def test_an_unknown_precision_is_refused_where_the_run_context_is_made():
    from refimpl.config import Config
    from refimpl.context import RunContext
    with pytest.raises(ValueError, match="unknown precision 'fp32'"):
        RunContext(Config.tiny(), "fp32")


# ------------------------------------------------------------------------------------------------
# bf16 / fp32

def test_round_bf16_hand_worked():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 2.0**-130,
                  np.inf, -np.inf, np.finfo(np.float32).max], dtype=np.float32)
    # ties (1 + 2^-8, 1 + 3·2^-8) go to the even mantissa; fp32 max rounds up to ∞ (as torch)
    want = [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -1.0, 2.0**-130, np.inf, -np.inf, np.inf]
    same_floats(nx.round_bf16(x), want)
    assert nx.round_bf16(x).dtype == np.float32
    assert np.isnan(nx.round_bf16(np.float32(np.nan)))


def test_round_bf16_float64_goes_through_float32():
    # direct f64 -> bf16 would round up (above the midpoint); f64 -> f32 drops 2^-30 and leaves a tie
    x = np.array([1 + 2**-8 + 2**-30], dtype=np.float64)
    assert nx.round_bf16(x)[0] == 1.0                                 # direct rounding would give 1 + 2^-7


def test_round_f32():
    assert nx.round_f32(np.array([1 + 2**-30])).dtype == np.float32
    assert nx.round_f32(np.array([1 + 2**-24 + 2**-40]))[0] == np.float32(1 + 2**-23)


# ------------------------------------------------------------------------------------------------
# the ml_dtypes codecs against independent references (numerics uses ml_dtypes where it is exact)

def bf16_by_bits(x):
    """Reference RNE to bf16 on the float32 bits (independent of ml_dtypes): add 0x7FFF + lsb, cut."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1
    out = ((bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(np.asarray(x, np.float32)), np.float32(np.nan), out)


def test_round_bf16_against_bit_reference_on_edges_and_random_bits():
    edges = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,     # ties to even, just above/below
                      0x00008000, 0x00018000, 0x00000001, 0x807FFFFF,     # subnormal ties, smallest, -largest
                      0x7F7F8000, 0x7F7FFFFF, 0x7F7F7FFF,                 # overflow tie -> ∞, just below
                      0x7F800000, 0xFF800000, 0x80000000, 0x00000000], np.uint32)
    rng = np.random.default_rng(0)
    bits = np.concatenate([edges, rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        same_floats(nx.round_bf16(x), bf16_by_bits(x))
        same_floats(nx.round_bf16(x), x.astype(ml_dtypes.bfloat16).astype(np.float32))   # the ml_dtypes codec
    assert np.isnan(nx.round_bf16(np.array([np.nan, -np.nan], np.float32))).all()
    nans = np.array([0x7F800001, 0xFFFFFFFF, 0x7FC00000, 0xFF80FFFF], np.uint32).view(np.float32)   # any NaN
    assert np.isnan(nx.round_bf16(nans)).all()


def grid_round(x, values, codes):
    """Reference RNE onto a sorted non-negative grid (float64 math): nearest value, ties to the even
    code, saturating at the largest; sign restored (-0 for negative values that round to 0)."""
    a = np.minimum(np.abs(np.asarray(x, np.float64)), values[-1])
    hi = np.clip(np.searchsorted(values, a), 1, len(values) - 1)
    lo = hi - 1
    dlo, dhi = a - values[lo], values[hi] - a
    pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(codes[lo] % 2 == 0, lo, hi)))
    return np.copysign(values[pick], x), codes[pick]


def e4m3_reference_table():
    """Non-negative finite e4m3fn values from the bit fields (float64) and their codes 0..0x7E."""
    c = np.arange(0x7F)
    e, m = c >> 3, c & 7
    v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e - 7))
    return v, c


def e2m1_reference_table():
    v = np.array([0, .5, 1, 1.5, 2, 3, 4, 6])
    return v, np.arange(8)


def tie_neighbourhoods(values, dtype):
    """Every grid value and midpoint, and their float neighbours just below and above, in dtype."""
    mids = (values[1:] + values[:-1]) / 2
    pts = np.concatenate([values, mids, [values[-1] * 1.03, values[-1] * 1.5, values[-1] * 4]]).astype(dtype)
    around = np.concatenate([pts, np.nextafter(pts, dtype(np.inf)), np.nextafter(pts, dtype(0))])
    return np.concatenate([around, -around])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_e4m3_encode_equals_reference_at_every_tie_and_beyond_448(dtype):
    values, codes = e4m3_reference_table()
    x = tie_neighbourhoods(values, dtype)
    rng = np.random.default_rng(1)
    rand = rng.uniform(-480, 480, 50_000) * 2.0 ** rng.integers(-14, 1, 50_000)
    x = np.concatenate([x, np.array([449, 463.9, 464, 464.1, 479, 480, 1e4], dtype), rand.astype(dtype)])   # ml_dtypes alone: NaN from 464
    want_v, want_c = grid_round(x, values, codes)
    got = nx.encode_fp8_e4m3(x)
    assert np.array_equal(got & 0x7F, want_c)
    same_floats(nx.decode_fp8_e4m3(got), want_v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_e2m1_encode_equals_reference_at_every_tie(dtype):
    values, codes = e2m1_reference_table()
    rand = np.random.default_rng(2).uniform(-7, 7, 20_000).astype(dtype)
    x = np.concatenate([tie_neighbourhoods(values, dtype), rand])
    want_v, want_c = grid_round(x, values, codes)
    got = nx.encode_fp4_e2m1(x)
    assert np.array_equal(got & 0x7, want_c)
    same_floats(nx.decode_fp4_e2m1(got), want_v)


def test_decoders_equal_bit_field_formulas_on_every_code():
    values, _ = e4m3_reference_table()
    sign = np.where(ALL_BYTES >= 0x80, -1.0, 1.0)
    mag = np.concatenate([values, [np.nan]])[ALL_BYTES & 0x7F]
    same_floats(nx.decode_fp8_e4m3(ALL_BYTES), sign * mag)                     # 256 codes, ±0, 2 NaNs
    nib = np.arange(16, dtype=np.uint8)
    same_floats(nx.decode_fp4_e2m1(nib), np.where(nib >= 8, -1.0, 1.0) * e2m1_reference_table()[0][nib & 7])
    want = np.where(ALL_BYTES == 255, np.nan, np.ldexp(1.0, ALL_BYTES.astype(np.int64) - 127))
    same_floats(nx.decode_ue8m0(ALL_BYTES), want)


def test_e4m3_values_equal_the_ml_dtypes_cast_at_every_tie_and_on_random_bits():
    """e4m3_values (the bit-level RNE act_quant uses) against the clamp + ml_dtypes cast it replaces and the grid
    reference: every e4m3 value and midpoint with their float32 neighbours, both signs, past 448, float32
    subnormals, and random bit patterns over the whole finite float32 range."""
    values, codes = e4m3_reference_table()
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    rand = bits.view(np.float32)
    x = np.concatenate([tie_neighbourhoods(values, np.float32), rand[np.isfinite(rand)],
                        rand[np.isfinite(rand)][:50_000] * np.float32(2.0 ** -100),          # the subnormal range
                        np.array([0.0, -0.0, 2.0**-149, -2.0**-149, 448, 449, 464, -1e38, 3 * 2.0**-10], np.float32)])
    with np.errstate(under="ignore"):
        got = nx.e4m3_values(x)
    same_floats(got, np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    same_floats(got, grid_round(x, values, codes)[0].astype(np.float32))
    assert np.signbit(got).tolist() == np.signbit(x).tolist()                               # -0 stays -0


def test_e2m1_values_equal_the_ml_dtypes_cast_at_every_tie_and_on_random_bits():
    """e2m1_values (fp4_act_quant's step) as e4m3_values above: the clamp + ml_dtypes cast and the grid reference."""
    values, codes = e2m1_reference_table()
    rng = np.random.default_rng(6)
    rand = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([tie_neighbourhoods(values, np.float32), rand[np.isfinite(rand)],
                        rng.uniform(-7, 7, 50_000).astype(np.float32),
                        np.array([0.0, -0.0, 0.25, -0.25, 0.75, 5.0, -5.0, 2.0**-149, 1e38], np.float32)])
    got = nx.e2m1_values(x)
    same_floats(got, np.clip(x, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    same_floats(got, grid_round(x, values, codes)[0].astype(np.float32))
    assert np.signbit(got).tolist() == np.signbit(x).tolist()


def test_act_quant_casts_equal_reference_rounding():
    # the quantizers' own casts (after the clamp) round exactly as the reference, ties included
    values, codes = e4m3_reference_table()
    x = tie_neighbourhoods(values, np.float32)
    x = x[np.abs(x) <= 448].reshape(-1)
    x = np.concatenate([x, np.zeros((-len(x)) % 128, np.float32)])
    x[::128] = 448.0                                                  # amax 448 per block: scale 1
    q, s = nx.act_quant_fp8(x.reshape(-1, 128))
    assert np.all(s == 1)
    same_floats(q.reshape(-1), grid_round(x, values, codes)[0])
    v4, c4 = e2m1_reference_table()
    y = tie_neighbourhoods(v4, np.float32)
    y = y[np.abs(y) <= 6]
    y = np.concatenate([y, np.zeros((-len(y)) % 32, np.float32)])
    y[::32] = 6.0
    q4, s4 = nx.act_quant_fp4(y.reshape(-1, 32))
    assert np.all(s4 == 1)
    same_floats(q4.reshape(-1), grid_round(y, v4, c4)[0])


# ------------------------------------------------------------------------------------------------
# e4m3fn

def test_decode_fp8_e4m3_named_codes():
    codes = np.array([0x00, 0x01, 0x07, 0x08, 0x38, 0x40, 0x7E, 0x80, 0xFE, 0x7F, 0xFF], np.uint8)
    want = [0.0, 2.0**-9, 7 * 2.0**-9, 2.0**-6, 1.0, 2.0, 448.0, -0.0, -448.0, np.nan, np.nan]
    v = nx.decode_fp8_e4m3(codes)
    assert v.dtype == np.float32
    same_floats(v, want)
    assert np.signbit(v[7])                          # 0x80 is -0 in e4m3fn (NaN in FNUZ: docs/architecture.md §19.33)


def test_decode_fp8_e4m3_all_codes_match_ml_dtypes():
    same_floats(nx.decode_fp8_e4m3(ALL_BYTES),
                ALL_BYTES.view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    same_floats(nx.decode_fp8_e4m3(ALL_BYTES.view(ml_dtypes.float8_e4m3fn)),
                nx.decode_fp8_e4m3(ALL_BYTES))      # ml_dtypes arrays are reinterpreted, not converted
    assert np.isnan(nx.decode_fp8_e4m3(ALL_BYTES)).sum() == 2


def test_encode_fp8_e4m3_round_trips_every_code():
    codes = ALL_BYTES[(ALL_BYTES & 0x7F) != 0x7F]   # the 254 non-NaN codes, -0 included
    assert np.array_equal(nx.encode_fp8_e4m3(nx.decode_fp8_e4m3(codes)), codes)


def test_encode_fp8_e4m3_ties_and_saturation():
    # 1.0625 = 1 + 1/16: tie between 1 (mantissa 000) and 1.125 (001) -> 1; 1.1875: tie -> 1.25 (010)
    # 2^-10: tie between 0 and 2^-9 -> 0; 464: tie between 448 and (absent) 480 -> saturates to 448
    x = np.array([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 464.0, 500.0, 1e30, np.inf, -np.inf, -1e-9])
    want = [1.0, 1.25, 0.0, 2 * 2.0**-9, 448.0, 448.0, 448.0, 448.0, -448.0, -0.0]
    same_floats(nx.decode_fp8_e4m3(nx.encode_fp8_e4m3(x)), want)
    assert nx.encode_fp8_e4m3(np.float32(-1e-9)) == 0x80


def test_encode_fp8_e4m3_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        nx.encode_fp8_e4m3(np.array([1.0, np.nan]))


# ------------------------------------------------------------------------------------------------
# ue8m0

def test_decode_ue8m0_named_and_all_codes():
    same_floats(nx.decode_ue8m0(np.array([127, 128, 126, 0, 254, 255], np.uint8)),
                [1.0, 2.0, 0.5, 2.0**-127, 2.0**127, np.nan])
    same_floats(nx.decode_ue8m0(ALL_BYTES), ALL_BYTES.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    assert nx.decode_ue8m0(ALL_BYTES).dtype == np.float32


def test_encode_ue8m0_round_trip_and_rejects_non_powers_of_two():
    codes = ALL_BYTES[:255]
    assert np.array_equal(nx.encode_ue8m0(nx.decode_ue8m0(codes)), codes)
    assert nx.encode_ue8m0(np.float64(2.0**-22)) == 105
    for bad in (3.0, 0.75, 0.0, -1.0, -0.5, np.inf, np.nan, 2.0**128, 2.0**-128):
        with pytest.raises(ValueError):
            nx.encode_ue8m0(np.array([1.0, bad]))


# ------------------------------------------------------------------------------------------------
# e2m1 and packing

def test_decode_fp4_e2m1_named_and_all_codes():
    table = [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]
    nib = np.arange(16, dtype=np.uint8)
    same_floats(nx.decode_fp4_e2m1(nib), table)
    same_floats(nx.decode_fp4_e2m1(nib), nib.view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert nx.decode_fp4_e2m1(np.uint8(7)) == 6.0 and nx.decode_fp4_e2m1(np.uint8(0xF)) == -6.0
    with pytest.raises(ValueError):
        nx.decode_fp4_e2m1(np.array([16], np.uint8))


def test_encode_fp4_e2m1_hand_worked_rne():
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -5.0, -0.1, 0.2600])
    # ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -4.0, -0.0, 0.5]
    same_floats(nx.decode_fp4_e2m1(nx.encode_fp4_e2m1(x)), want)
    nib = np.arange(16, dtype=np.uint8)
    assert np.array_equal(nx.encode_fp4_e2m1(nx.decode_fp4_e2m1(nib)), nib)
    with pytest.raises(ValueError):
        nx.encode_fp4_e2m1(np.array([np.nan]))


def test_pack_fp4_hand_worked():
    nib = np.array([[0x1, 0x2, 0xF, 0x7, 0x8, 0xF]], np.uint8)
    packed = nx.pack_fp4(nib)
    assert packed.dtype == np.int8
    assert packed.view(np.uint8).tolist() == [[0x21, 0x7F, 0xF8]]    # element 2j in the low nibble
    assert np.array_equal(nx.unpack_fp4(packed), nib)
    with pytest.raises(ValueError):
        nx.pack_fp4(np.zeros((2, 3), np.uint8))


@settings(deadline=None, max_examples=50)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8),
                  elements=st.integers(0, 15)))
def test_pack_unpack_round_trip(nib):
    nib = np.concatenate([nib, nib], axis=-1)                         # even last dim
    packed = nx.pack_fp4(nib)
    assert packed.shape == (*nib.shape[:-1], nib.shape[-1] // 2)
    assert np.array_equal(nx.unpack_fp4(packed), nib)
    assert np.array_equal(nx.unpack_fp4(packed.view(np.uint8)), nib)


# ------------------------------------------------------------------------------------------------
# power-of-two scales

def test_pow2_scale_hand_worked():
    inv8, inv4 = np.float32(1 / 448), np.float32(1 / 6)
    amax = np.array([448, 449, 224, 224.001, 1e-4, 896], np.float32)
    assert nx.pow2_scale(amax, inv8).tolist() == [1.0, 2.0, 0.5, 1.0, 2.0**-22, 2.0]
    assert nx.pow2_scale(np.array([6, 6.001, 3, 6 * 2.0**-126], np.float32), inv4).tolist() == \
        [1.0, 2.0, 0.5, 2.0**-126]
    assert nx.pow2_scale(np.float32(448), inv8).dtype == np.float32
    with pytest.raises(ValueError):
        nx.pow2_scale(np.array([0.0], np.float32), inv8)


def test_pow2_scale_equals_ceil_log2_of_the_fp32_product():
    rng = np.random.default_rng(3)
    amax = (rng.uniform(0.5, 1, 10_000) * 2.0 ** rng.integers(-30, 30, 10_000)).astype(np.float32)
    prod = (amax * np.float32(1 / 448)).astype(np.float64)          # the fp32 product, exactly
    assert np.array_equal(nx.pow2_scale(amax, 1 / 448), np.exp2(np.ceil(np.log2(prod))))


# ------------------------------------------------------------------------------------------------
# weights

def test_dequant_fp8_weight_partial_block_uses_fixed_128():
    # 192 x 384 with a 2 x 3 grid: rows 96-127 belong to block-row 0 (docs/architecture.md §19.34)
    grid = np.array([[127, 128, 129], [130, 131, 132]], np.uint8)
    values = np.full((192, 384), 0x38, np.uint8)                      # e4m3 1.0 everywhere
    w = nx.dequant_fp8_weight(values, grid)
    assert w.shape == (192, 384) and w.dtype == np.float32
    assert np.all(w[:128, :128] == 1.0) and np.all(w[:128, 128:256] == 2.0) and np.all(w[:128, 256:] == 4.0)
    assert np.all(w[96:128] == w[0])                                  # a 96-row block would give w[96:] == w[128]
    assert np.all(w[128:, :128] == 8.0) and np.all(w[128:, 256:] == 32.0)
    w2 = nx.dequant_fp8_weight(values.view(ml_dtypes.float8_e4m3fn), grid.view(ml_dtypes.float8_e8m0fnu))
    assert np.array_equal(w, w2)


def test_dequant_fp8_weight_values_and_errors():
    values = np.array([[0x7E, 0x01, 0x80, 0xB8]], np.uint8)          # 448, 2^-9, -0, -1
    w = nx.dequant_fp8_weight(values, np.array([[125]], np.uint8))    # scale 2^-2
    same_floats(w, [[112.0, 2.0**-11, -0.0, -0.25]])
    values = np.zeros((192, 384), np.uint8)
    for bad_shape in [(3, 3), (2, 4), (1, 3), (2, 2)]:               # a grid with any other shape
        with pytest.raises(ValueError, match="shape"):
            nx.dequant_fp8_weight(values, np.full(bad_shape, 127, np.uint8))
    grid = np.full((2, 3), 127, np.uint8)
    grid[1, 2] = 0xFF
    with pytest.raises(ValueError, match=r"NaN.*block row 1, col 2"):
        nx.dequant_fp8_weight(values, grid)
    with pytest.raises(TypeError):
        nx.dequant_fp8_weight(values.astype(np.float32), grid)


def test_dequant_fp4_weight_hand_worked_and_errors():
    nib = np.zeros((2, 64), np.uint8)
    nib[0, :4] = [7, 0xF, 1, 0x8]                                     # 6, -6, 0.5, -0
    nib[1, 32:34] = [2, 3]                                            # 1, 1.5 in the second 1x32 block
    scale = np.array([[126, 127], [127, 130]], np.uint8)              # [[0.5, 1], [1, 8]]
    w = nx.dequant_fp4_weight(nx.pack_fp4(nib), scale)
    assert w.shape == (2, 64) and w.dtype == np.float32
    same_floats(w[0, :4], [3.0, -3.0, 0.25, -0.0])
    assert w[1, 32:34].tolist() == [8.0, 12.0] and w[1, :32].sum() == 0
    with pytest.raises(ValueError, match="shape"):
        nx.dequant_fp4_weight(nx.pack_fp4(nib), scale[:, :1])
    scale[1, 0] = 0xFF
    with pytest.raises(ValueError, match=r"NaN.*block row 1, col 0"):
        nx.dequant_fp4_weight(nx.pack_fp4(nib), scale)


# ------------------------------------------------------------------------------------------------
# activation quantization

def test_act_quant_fp8_hand_worked():
    x = np.zeros((2, 256), np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 448.0, 1.0625, -3.0                   # block (0, 0): amax 448 -> s = 1
    x[0, 128] = 1000.0                                                # block (0, 1): s = 4, 1000/4 = 250 -> 256
    q, s = nx.act_quant_fp8(x, block=128)
    assert q.dtype == np.float32 and s.dtype == np.float32 and s.shape == (2, 2)
    assert s.tolist() == [[1.0, 4.0], [2.0**-22, 2.0**-22]]           # all-zero blocks: 2^ceil(log2(1e-4/448))
    assert q[0, :3].tolist() == [448.0, 1.0, -3.0] and q[0, 128] == 256.0
    assert np.all(q[1] == 0)
    with pytest.raises(ValueError):
        nx.act_quant_fp8(x, block=96)
    with pytest.raises(TypeError):
        nx.act_quant_fp8(x.astype(np.float64))
    with pytest.raises(ValueError):
        nx.act_quant_fp8(np.full((1, 128), np.nan, np.float32))


@pytest.mark.parametrize("max_val", [448.0, 6.0])
def test_pow2_scale_never_below_amax_over_max(max_val):
    # fp32(1/448) and fp32(1/6) lie above 1/448 and 1/6, so the fp32 product never rounds down to a
    # power of two below amax/max: the official clamp to ±max only guards, it never fires
    inv = np.float32(1 / max_val)
    edge = (max_val * 2.0 ** np.arange(-100, 100)).astype(np.float32)
    amax = np.concatenate([edge, np.nextafter(edge, np.float32(np.inf)), np.nextafter(edge, np.float32(0))])
    s = nx.pow2_scale(amax, inv).astype(np.float64)
    assert np.all(amax <= max_val * s) and np.all(amax > max_val * s / 2)


def test_act_quant_fp4_hand_worked():
    x = np.zeros((1, 64), np.float32)
    x[0, :4] = [6.0, 5.0, -0.25, 2.5]                                 # s = 1: 6, 4 (tie), -0 (tie), 2 (tie)
    q, s = nx.act_quant_fp4(x)
    assert s.tolist() == [[1.0, 2.0**-126]]                          # zero block: floor 6·2^-126
    same_floats(q[0, :4], [6.0, 4.0, -0.0, 2.0])
    assert np.all(q[0, 32:] == 0)


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), lg=st.integers(-40, 40), block=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 4))
def test_act_quant_fp8_properties(seed, lg, block, rows):
    rng = np.random.default_rng(seed)
    x = bf16_values(rng, (rows, 2 * block), 2.0**lg)
    x[0, :block] *= rng.integers(0, 2)                                # sometimes an all-zero block
    q, s = nx.act_quant_fp8(x, block=block)
    f, _ = np.frexp(s)
    assert np.all(f == 0.5)                                           # exact powers of two
    assert np.all(np.abs(q) <= 448)
    sb = np.repeat(s, block, axis=-1).astype(np.float64)
    err = np.abs(q * sb - x)
    assert np.all(err <= sb * ulp_e4m3(x / sb) / 2)
    assert np.array_equal(nx.decode_fp8_e4m3(nx.encode_fp8_e4m3(q)), q)   # q is on the e4m3 grid
    y = nx.qdq_fp8_values(x, block=block)
    assert y.dtype == np.float32
    assert np.array_equal(nx.qdq_fp8_values(y, block=block), y)       # idempotent


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), lg=st.integers(-40, 40), rows=st.integers(1, 4))
def test_act_quant_fp4_properties(seed, lg, rows):
    rng = np.random.default_rng(seed)
    x = bf16_values(rng, (rows, 128), 2.0**lg)
    q, s = nx.act_quant_fp4(x)
    f, _ = np.frexp(s)
    assert np.all(f == 0.5)
    assert np.all(np.abs(q) <= 6)
    assert np.all(np.isin(np.abs(q), [0, .5, 1, 1.5, 2, 3, 4, 6]))
    sb = np.repeat(s, 32, axis=-1).astype(np.float64)
    assert np.all(np.abs(q * sb - x) <= sb * ulp_e2m1(x / sb) / 2)
    y = nx.qdq_fp4_values(x)
    assert np.array_equal(nx.qdq_fp4_values(y), y)                    # idempotent
    assert np.array_equal(nx.round_bf16(y), y)


# ------------------------------------------------------------------------------------------------
# Hadamard

def sylvester(n):
    """Natural-order ±1 Hadamard matrix, as scipy.linalg.hadamard(n)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_sylvester_helper_hand_worked():
    assert sylvester(4).tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 128])
def test_hadamard_matches_sylvester_matrix(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, 2, n))
    want = x @ sylvester(n) / np.sqrt(n)
    y = nx.hadamard(x, prec="float32")
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-13)
    y32 = nx.hadamard(x.astype(np.float32), prec="float32")
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, want, rtol=0, atol=1e-5)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), lg=st.integers(0, 8))
def test_hadamard_orthogonal(seed, lg):
    x = np.random.default_rng(seed).standard_normal((5, 2**lg))
    y = nx.hadamard(x, prec="float32")
    np.testing.assert_allclose(nx.hadamard(y, prec="float32"), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)
    one = x[0].copy()                                            # one row alone: the same values, its input untouched
    np.testing.assert_array_equal(nx.hadamard(one, prec="float32"), y[0])
    np.testing.assert_array_equal(one, x[0])


def test_hadamard_rejects_bad_input():
    with pytest.raises(ValueError):
        nx.hadamard(np.ones((2, 12)), prec="float32")
    with pytest.raises(TypeError):
        nx.hadamard(np.ones((2, 4), np.int64), prec="float32")


# ------------------------------------------------------------------------------------------------
# small math

def test_softmax():
    x = np.array([[1000.0, 1000.0, -np.inf], [0.0, np.log(3.0), -np.inf]], np.float32)
    p = nx.softmax(x, axis=-1, prec="float32")
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(nx.softmax(x.T, axis=0, prec="float32"), p.T, rtol=0)
    with pytest.raises(ValueError):
        nx.softmax(np.array([[0.0, 1.0], [-np.inf, -np.inf]]), axis=-1, prec="float32")


def test_sigmoid_silu_extremes():
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0], np.float32)
    s = nx.sigmoid(x, prec="float32")
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, [0.0, 9.357623e-14, 0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(nx.silu(x, prec="float32"), x * s, rtol=0)
    assert nx.silu(np.float64(-1000.0), prec="float32") == 0.0


def test_softplus_threshold():
    x = np.array([-100.0, 0.0, 20.0, np.nextafter(20.0, 21.0), 50.0, 1e30])
    y = nx.softplus(x, prec="float32")
    assert y[0] == np.log1p(np.exp(-100.0)) and y[1] == np.log(2.0)
    assert y[2] == np.log1p(np.exp(20.0)) and y[2] != 20.0           # threshold is strict: x > 20
    assert y[3] == x[3] and y[4] == 50.0 and y[5] == 1e30
    assert nx.softplus(x.astype(np.float32), prec="float32").dtype == np.float32


def test_top_k_ties_lower_index_wins():
    x = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert nx.top_k(x, 3).tolist() == [1, 2, 4]                      # the three 3.0s, in index order
    assert nx.top_k(x, 4).tolist() == [1, 2, 4, 3]
    assert nx.top_k(x, 0).tolist() == []
    assert nx.top_k(x, 3).dtype == np.int64
    m = np.array([[0.5, 0.5], [0.5, 0.7], [0.5, 0.7]])
    assert nx.top_k(m, 2, axis=0).tolist() == [[0, 1], [1, 2]]
    assert nx.top_k(np.array([1, 5, 5, -3], np.int32), 2).tolist() == [1, 2]
    assert nx.top_k(np.array([1.0, np.nan, 2.0]), 1).tolist() == [1]  # NaN is the largest, as torch.topk
    with pytest.raises(ValueError):
        nx.top_k(x, 6)


@settings(deadline=None, max_examples=30)
@given(hnp.arrays(np.float32, st.integers(1, 20), elements=st.sampled_from([0.0, 1.0, 2.0, -1.0])),
       st.data())
def test_top_k_matches_sorted_reference(x, data):
    k = data.draw(st.integers(0, x.size))
    ref = sorted(range(x.size), key=lambda i: (-x[i], i))[:k]         # descending value, then index
    assert nx.top_k(x, k).tolist() == ref


# ------------------------------------------------------------------------------------------------
# one official operation: in mirror, exact (float64) inside and rounded once to fp32

def f32(x):
    return np.asarray(x, np.float64).astype(np.float32)


def test_reductions_are_exact_then_rounded_once():
    """reduce_sum / reduce_mean in mirror: the correctly rounded sum (math.fsum) for these inputs,
    where float32 summation loses the small terms; the other modes sum in their dtype."""
    import math
    x = np.array([[1.0, 2.0**-24, 2.0**-24, 2.0**-24, 2.0**-24, 2.0**-8, 3.0, -3.0]], np.float32)
    want = f32(math.fsum(x[0].astype(np.float64)))
    assert nx.reduce_sum(x, -1, "mirror").tolist() == [want] and want == np.float32(1 + 2.0**-8 + 2.0**-22)
    seq = np.float32(0)
    for v in x[0]:
        seq = np.float32(seq + v)                                     # float32, one term after another
    assert seq != want
    assert nx.reduce_sum(x, -1, "mirror", keepdims=True).shape == (1, 1)
    assert nx.reduce_mean(x, -1, "mirror").tolist() == [f32(math.fsum(x[0].astype(np.float64)) / 8)]
    assert nx.reduce_sum(x, -1, "float32").dtype == np.float32
    assert nx.reduce_sum(x.astype(np.float64), -1, "float64").tolist() == [math.fsum(x[0].astype(np.float64))]
    rng = np.random.default_rng(1)
    y = rng.standard_normal((200, 64)).astype(np.float32) * 10.0 ** rng.uniform(-4, 4, (200, 64)).astype(np.float32)
    exact = np.array([math.fsum(r) for r in y.astype(np.float64)])
    assert np.array_equal(nx.reduce_sum(y, -1, "mirror"), f32(exact))


def test_elementary_functions_are_correctly_rounded_in_mirror():
    """exp, rsqrt, power, sigmoid, softplus, silu, softmax: in mirror the float64 value rounded once
    (math module references); NumPy's float32 versions differ on some of these inputs."""
    import math
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(4000) * 6).astype(np.float32)
    xd = [float(v) for v in x]
    refs = {
        "exp": ([math.exp(v) for v in xd], lambda p: nx.exp(x, p)),
        "rsqrt": ([1 / math.sqrt(abs(v)) for v in xd], lambda p: nx.rsqrt(np.abs(x), p)),
        "sigmoid": ([1 / (1 + math.exp(-v)) for v in xd], lambda p: nx.sigmoid(x, p)),
        "softplus": ([v if v > 20 else math.log1p(math.exp(v)) for v in xd], lambda p: nx.softplus(x, p)),
        "silu": ([v / (1 + math.exp(-v)) for v in xd], lambda p: nx.silu(x, p)),
        "power": ([10000.0 ** (abs(v) / 8) for v in xd], lambda p: nx.power(10000.0, np.abs(x) / np.float32(8), p)),
    }
    for name, (ref, fn) in refs.items():
        if name == "power":
            ref = [10000.0 ** float(e) for e in np.abs(x) / np.float32(8)]
        got = fn("mirror")
        assert got.dtype == np.float32, name
        assert np.array_equal(got, f32(ref)), name
        plain = fn("float32")
        assert plain.dtype == np.float32 and np.allclose(plain, got, rtol=3e-6, atol=0), name
        assert not np.array_equal(plain, got), name                  # float32 math rounds more than once
    s = (rng.standard_normal((300, 6)) * 3).astype(np.float32)
    e = [[math.exp(v - max(r)) for v in r] for r in s.astype(np.float64).tolist()]
    want = f32([[v / math.fsum(r) for v in r] for r in e])
    assert np.array_equal(nx.softmax(s, -1, "mirror"), want)
    assert not np.array_equal(nx.softmax(s, -1, prec="float32"), want)
    assert nx.softmax(s, -1, "float64").dtype == np.float32          # no mode step outside mirror: x's dtype


def test_hadamard_in_mirror_is_exact_then_rounded_once():
    rng = np.random.default_rng(3)
    x = bf16_values(rng, (64, 128))
    want = f32(x.astype(np.float64) @ sylvester(128) / np.sqrt(128))
    assert np.array_equal(nx.hadamard(x, "mirror"), want)
    assert not np.array_equal(nx.hadamard(x, prec="float32"), want)                  # float32 butterflies and scale
