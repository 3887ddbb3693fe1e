"""Bad ranks fail at construction with a message naming the rank."""

import pytest

from tucker_serve.config import TuckerConfig

GOOD = dict(hidden_size=64, num_heads=8, r1=4, r2=32, r3=16, rt1=4, rt2=32, rt3=16)


def test_good_config_exposes_both_rank_triples():
    cfg = TuckerConfig(**GOOD)
    assert cfg.pre_ranks == (4, 32, 16) and cfg.post_ranks == (4, 32, 16)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"r1": 9}, "r1=9 exceeds its mode size num_heads=8"),
        ({"rt1": 0}, "rt1=0 must be a positive integer"),
        ({"r2": 65}, "r2=65 exceeds its mode size hidden_size=64"),
        ({"r3": 15}, "r3=15 must be even"),
        ({"rt3": 100}, "rt3=100 exceeds its mode size hidden_size=64"),
        ({"rt2": 2.5}, "rt2=2.5 must be a positive integer"),
        ({"r3": True}, "r3=True must be a positive integer"),
        ({"shared_latent": True, "rt3": 8}, "rt3=8 must equal r3=16"),
    ],
)
def test_bad_ranks_name_the_offender(change, message):
    with pytest.raises(ValueError, match=message):
        TuckerConfig(**{**GOOD, **change})


def test_odd_r3_is_fine_without_rope():
    assert TuckerConfig(**{**GOOD, "r3": 15, "rope": False}).r3 == 15
