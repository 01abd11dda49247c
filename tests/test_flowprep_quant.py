"""Quantization is denseflow's: clip to +-bound, 256 levels, exact inverse."""
import numpy as np
import pytest

from flowprep.quant import dequantize, quantize


@pytest.mark.parametrize("bound", [20.0, 5.0])
def test_round_trip_within_half_a_step(bound):
    v = np.random.default_rng(0).uniform(-bound, bound, size=(64, 48, 2)).astype(np.float32)
    q = quantize(v, bound)
    assert q.dtype == np.uint8
    assert np.abs(dequantize(q, bound) - v).max() <= bound / 255 + 1e-5


def test_clipping_and_fixed_points():
    v = np.array([-100.0, -20.0, 0.0, 20.0, 100.0], np.float32)
    q = quantize(v, 20.0)
    assert q.tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even, like cvRound
    assert dequantize(q, 20.0)[[0, -1]].tolist() == [-20.0, 20.0]


def test_codes_are_exact_inverse():
    q = np.arange(256, dtype=np.uint8)
    assert np.array_equal(quantize(dequantize(q, 20.0), 20.0), q)


def test_bad_bound():
    with pytest.raises(ValueError):
        quantize(np.zeros(3), 0)
