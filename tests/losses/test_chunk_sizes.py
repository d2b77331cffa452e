"""The `chunk_size="auto"` rule (`tfp_seg.losses.chunk_sizes`); the chunked loss itself is
tested in test_chunked_loss.py."""

import pytest

from tfp_seg.losses import chunk_sizes


def test_auto_chunk_size_rule():
    auto = chunk_sizes.auto_chunk_size
    x = 128 * 128  # values of one 2-class sample of a 128 x 128 image (its logit difference)
    assert auto(20, True, 19 * x) == 20  # up to 20 samples: all at once
    assert auto(50, True, x) == 50  # 50 * 16384 <= 2**20 values per image
    assert auto(100, True, x) == 4  # 1.6M values: even divisors of 100 with S * X <= 2**16
    assert auto(100, False, x) == 4
    assert auto(512, True, 64 * 64) == 16  # 512 * 4096 > 2**20; 16 * 4096 = 2**16
    assert auto(99, False, x) == 3  # odd M without antithetic pairs
    assert auto(22, True, 4 * x) == 2  # nothing that small: the smallest admissible chunk
    assert auto(23, False, 4 * x) == 1
    assert auto(1000, True, None) == 1000  # spatial size unknown until run time: no chunks
    for m, elements in ((100, x), (64, 4096), (40, 3 * x), (30, 7)):
        s = auto(m, True, elements)
        assert m % s == 0 and s % 2 == 0


def test_check_chunk_size():
    check = chunk_sizes.check_chunk_size
    assert check(None, 20, True) is None
    assert check("auto", 20, True) == "auto"
    assert check(4, 20, True) == 4
    with pytest.raises(ValueError, match="divide"):
        check(3, 20, False)
    with pytest.raises(ValueError, match="even"):
        check(5, 20, True)
    with pytest.raises(ValueError, match="chunk_size"):
        check("fast", 20, True)
    with pytest.raises(ValueError, match="positive int"):
        check(0, 20, True)
