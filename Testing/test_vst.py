"""Variance-stabilising transforms: std ~ constant across intensities, unbiased inverses."""

from __future__ import annotations

import numpy as np
import pytest

from dualnet import noise, vst
from dualnet.errors import InputError

N = 200_000


@pytest.mark.parametrize("snr", [0.0, 0.5, 1.0, 2.0, 4.0, 10.0, 50.0])
def test_rician_vst_stabilises_and_inverts_unbiased(snr):
    s = 20.0
    a = snr * s
    m = noise.add_rician(np.full(N, a), s, 11)
    f = vst.rician_forward(m, s)
    assert f.std() == pytest.approx(1.0, abs=0.07)
    est = float(vst.rician_inverse(f.mean(), s))
    assert abs(est - a) < 0.1 * s  # unbiased down to zero signal
    # the naive estimate (mean magnitude) is biased at low SNR
    if snr <= 1.0:
        assert abs(m.mean() - a) > 0.2 * s


def test_rician_vst_shape_scalar_and_errors():
    x = np.linspace(0, 500, 24).reshape(2, 3, 4)
    y = vst.rician_forward(x, 10.0)
    assert y.shape == x.shape and np.all(np.diff(y.ravel()) > 0)  # monotone
    assert np.ndim(vst.rician_inverse(3.0, 10.0)) == 0
    # far above the table the inverse is still consistent at high SNR
    big = noise.add_rician(np.full(N, 2000.0), 10.0, 1)
    assert float(vst.rician_inverse(vst.rician_forward(big, 10.0).mean(), 10.0)) == pytest.approx(2000.0, abs=0.5)
    with pytest.raises(InputError):
        vst.rician_forward(x, 0.0)
    # moment bias correction: E[M^2] - 2 s^2 = A^2
    m = noise.add_rician(np.full(N, 30.0), 20.0, 2)
    assert float(vst.rician_bias_correct(np.sqrt(np.mean(m.astype(np.float64) ** 2)), 20.0)) == pytest.approx(30.0, rel=0.03)


@pytest.mark.parametrize("gain,sigma", [(0.8, 8.0), (2.0, 1.0)])
@pytest.mark.parametrize("u", [3.0, 10.0, 30.0, 100.0, 1000.0])
def test_gat_stabilises_and_exact_unbiased_inverse(gain, sigma, u):
    rng = np.random.default_rng(5)
    y = gain * rng.poisson(u / gain, N) + sigma * rng.standard_normal(N)
    f = vst.gat_forward(y, gain, sigma)
    assert f.std() == pytest.approx(1.0, abs=0.05)
    est = float(vst.gat_inverse_exact_unbiased(f.mean(), gain, sigma))
    assert abs(est - u) < max(0.02 * u, 0.1 * gain)


def test_gat_exact_inverse_beats_algebraic_at_low_counts():
    gain, sigma, u = 1.0, 0.5, 2.0
    rng = np.random.default_rng(3)
    y = gain * rng.poisson(u / gain, N) + sigma * rng.standard_normal(N)
    d = vst.gat_forward(y, gain, sigma).mean()
    exact = float(vst.gat_inverse_exact_unbiased(d, gain, sigma))
    algebraic = float(vst.gat_inverse_algebraic(d, gain, sigma))
    assert abs(exact - u) < 0.1 and abs(algebraic - u) > 0.2
    # below the GAT of a zero count the inverse is 0, never a blow-up
    low = vst.gat_inverse_exact_unbiased(np.array([0.0, 0.5, 1.0]), gain, sigma)
    assert np.all(low == 0)
    with pytest.raises(InputError):
        vst.gat_forward(y, 0.0, 1.0)


@pytest.mark.parametrize("looks", [1.0, 4.0, 10.0])
def test_log_transform_constant_std_and_unbiased(looks):
    expected_std = vst.log_noise_std(looks)
    for u in (2.0, 20.0, 200.0):
        y = noise.add_speckle(np.full(N, u), looks, 9)
        f = vst.log_forward(y, looks)
        assert f.std() == pytest.approx(expected_std, rel=0.03)
        assert float(vst.log_inverse(f.mean(), looks)) == pytest.approx(u, rel=0.01)
        # without the psi(L) - ln L correction the estimate would be low
        assert np.exp(np.log(y).mean()) < u * (1 - 0.02)
    assert vst.log_bias(looks) < 0
