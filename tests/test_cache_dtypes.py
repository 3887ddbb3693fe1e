"""The cache-dtype table: each row's bytes and rounding agree with torch and with what vLLM allocates."""

import pytest
import torch

from tucker_serve.cache_dtypes import CACHE_DTYPES, lookup, resolve, rounding_dtypes, served_names


@pytest.mark.parametrize("name", sorted(CACHE_DTYPES))
def test_each_row_agrees_with_its_torch_dtype(name):
    row = CACHE_DTYPES[name]
    assert row.name == name and row.torch_dtype.itemsize == row.bytes
    assert row.rounds == (row.bytes == 1)  # only fp8 is narrower than every weights dtype


def test_fp8_rows_round_to_their_element_type():
    assert rounding_dtypes() == {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                                 "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("spelling,name", [("bf16", "bfloat16"), ("torch.float16", "float16"), ("half", "float16"),
                                           (torch.float32, "float32"), ("float8_e5m2", "fp8_e5m2")])
def test_other_spellings_find_their_row(spelling, name):
    assert lookup(spelling) is CACHE_DTYPES[name]


def test_auto_follows_the_model_dtype():
    assert resolve("auto", torch.bfloat16) == "bfloat16" and resolve("auto", "float32") == "float32"
    assert resolve("fp8", torch.bfloat16) == "fp8"


def test_served_names_are_vllm_cache_dtypes_and_vllm_allocates_our_bytes():
    pytest.importorskip("vllm")
    from typing import get_args

    from vllm.config.cache import CacheDType
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE, get_dtype_size

    assert served_names() == ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2")
    assert set(served_names()) <= set(get_args(CacheDType))
    for name in served_names()[1:]:
        assert get_dtype_size(STR_DTYPE_TO_TORCH_DTYPE[name]) == CACHE_DTYPES[name].bytes, name
