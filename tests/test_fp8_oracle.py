"""round_to_cache against an fp8 oracle built here from the bit layouts alone: every e4m3fn / e5m2 value
from its sign, exponent and mantissa fields, nearest with ties to even, saturating at the largest finite
value. Checked on every finite bfloat16 and float16 number and on 6.3M float32 numbers around every
rounding midpoint."""

import numpy as np
import pytest
import torch

from tucker_serve.ops.paged import FP8_CACHE_DTYPES, round_to_cache

# name: (exponent bits, mantissa bits, bias, whether the top exponent holds inf/NaN rather than numbers)
LAYOUTS = {torch.float8_e4m3fn: (4, 3, 7, False), torch.float8_e5m2: (5, 2, 15, True)}


def fp8_values(dtype) -> np.ndarray:
    """The value of each of the 256 codes (NaN where the code is not a number)."""
    e_bits, m_bits, bias, ieee = LAYOUTS[dtype]
    values = np.empty(256)
    for code in range(256):
        sign, e, m = code >> 7, (code >> m_bits) & ((1 << e_bits) - 1), code & ((1 << m_bits) - 1)
        top = e == (1 << e_bits) - 1
        if (ieee and top) or (not ieee and top and m == (1 << m_bits) - 1):
            values[code] = np.inf if ieee and m == 0 else np.nan
            continue
        magnitude = (m / 2**m_bits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2**m_bits) * 2.0 ** (e - bias)
        values[code] = -magnitude if sign else magnitude
    return values


def oracle(x: np.ndarray, dtype) -> np.ndarray:
    """Nearest representable value, ties to the even code, saturating; x finite, float64."""
    values = fp8_values(dtype)
    codes = np.flatnonzero(np.isfinite(values[:128]))  # the non-negative finite codes, ascending with value
    grid = values[codes]
    a = np.abs(x)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(codes[lo] % 2 == 0, lo, hi)))
    out = np.where(a >= grid[-1], grid[-1], grid[pick])
    return np.copysign(out, x)


def test_the_oracle_tables_match_the_formats_landmarks():
    e4m3, e5m2 = fp8_values(torch.float8_e4m3fn), fp8_values(torch.float8_e5m2)
    assert np.isfinite(e4m3).sum() == 254 and np.nanmax(e4m3) == 448 and e4m3[1] == 2.0**-9
    assert np.isfinite(e5m2).sum() == 248 and e5m2[0x7b] == 57344 and e5m2[0x7c] == np.inf and e5m2[1] == 2.0**-16
    assert oracle(np.array([0.5 * (1 + 1.125), 1e6, -1e6, 2.0**-11]), torch.float8_e4m3fn).tolist() == [
        1.0, 448.0, -448.0, 0.0]  # a tie goes to the even code; beyond the range saturates; tiny -> 0


def sweep_inputs() -> list[torch.Tensor]:
    every16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    bf16, f16 = every16.view(torch.bfloat16), every16.view(torch.float16)
    high = torch.arange(2**20, dtype=torch.int64) << 12
    low = torch.tensor([0, 1, 0x7FF, 0x800, 0x801, 0xFFF], dtype=torch.int64)  # around every fp8 midpoint
    f32 = (high[:, None] | low[None, :]).flatten().to(torch.int32).view(torch.float32)  # (6,291,456,)
    return [t[torch.isfinite(t)] for t in (bf16, f16, f32)]


@pytest.mark.parametrize("name", sorted(FP8_CACHE_DTYPES))
def test_round_to_cache_agrees_with_the_oracle_on_a_dense_sweep(name):
    dtype = FP8_CACHE_DTYPES[name]
    for x in sweep_inputs():
        got = round_to_cache(x, dtype).double().numpy()
        want = oracle(x.double().numpy(), dtype)
        wrong = np.flatnonzero(got != want)
        assert wrong.size == 0, (x.dtype, wrong.size, x[wrong[:5]].tolist(), got[wrong[:5]], want[wrong[:5]])
