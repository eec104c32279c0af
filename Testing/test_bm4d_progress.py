"""BM4D progress: real per-pass fractions, a heartbeat with the elapsed time while a pass runs
(never an invented fraction), short labels, cancel between passes; the two-pass run gives the
package's one-call result (up to its own run-to-run float32 rounding)."""

from __future__ import annotations

import numpy as np
import pytest

bm4d = pytest.importorskip("bm4d")

from dualnet import baselines, noise  # noqa: E402
from dualnet.errors import CancelledError  # noqa: E402
from dualnet.progress import CancelToken  # noqa: E402

#: ProgressPrinter (cli.py) shows the first 40 characters of a message.
LABEL_MAX = 40


@pytest.fixture(scope="module")
def noisy_crop(mri_crop):
    clean = mri_crop[14:26, 12:44, 12:44].copy()  # 12 x 32 x 32 through the brain, real T1
    return noise.add_noise(clean, "mri", 0.05, 7).astype(np.float32)


def _run(vol, **kw):
    calls = []
    out = baselines.denoise(vol, "bm4d", "mri", sigma=30.0, progress=lambda f, m: calls.append((f, m)),
                            options={"heartbeat_s": 0.02}, **kw)
    return out, calls


def test_fractions_are_real_monotonic_and_labels_fit(noisy_crop):
    out, calls = _run(noisy_crop)
    fractions = [f for f, _ in calls]
    assert out.shape == noisy_crop.shape and np.isfinite(out).all()
    assert fractions == sorted(fractions)
    assert len(set(calls)) > 2 and len(set(fractions)) > 2
    assert fractions[-1] == 1.0 and 1.0 not in fractions[:-1]
    assert all(len(m) <= LABEL_MAX for _, m in calls), [m for _, m in calls if len(m) > LABEL_MAX]
    # both passes announced, the second only after the first finished (a higher fraction)
    first = [f for f, m in calls if "BM4D 1/2" in m]
    second = [f for f, m in calls if "BM4D 2/2" in m]
    assert first and second and max(first) < min(second) < 1.0
    # heartbeats repeat the fraction of the work done, with the elapsed time (m:ss)
    beats = [(f, m) for f, m in calls if m.startswith("BM4D 1/2 hard thr. ")]
    assert beats and all(f == first[0] for f, _ in beats) and all(":" in m for _, m in beats)


def test_two_passes_equal_the_one_call_result(noisy_crop):
    z = (noisy_crop - noisy_crop.min()) / float(np.ptp(noisy_crop))
    s = 0.05
    ours = baselines._bm4d(z.astype(np.float64), s, (1.0, 1.0, 1.0), {}, None, None)
    ref = np.asarray(bm4d.bm4d(z.astype(np.float32), s, profile="np"), dtype=np.float64).reshape(z.shape)
    # bm4d's native code is multi-threaded: two identical calls differ by float32 rounding (~2e-7)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_hard_stage_is_one_pass(noisy_crop):
    calls = []
    baselines.denoise(noisy_crop[:8], "bm4d", "mri", sigma=30.0, progress=lambda f, m: calls.append((f, m)),
                      options={"stage": "hard", "heartbeat_s": 0.02})
    assert any("BM4D 1/1" in m for _, m in calls) and not any("2/2" in m for _, m in calls)


def test_cancel_during_the_first_pass_stops_before_the_second(noisy_crop):
    token = CancelToken()
    calls = []

    def progress(fraction, message):
        calls.append((fraction, message))
        if message.startswith("BM4D 1/2"):
            token.cancel()

    with pytest.raises(CancelledError):
        baselines.denoise(noisy_crop, "bm4d", "mri", sigma=30.0, progress=progress, cancel=token,
                          options={"heartbeat_s": 0.02})
    assert not any("2/2" in m for _, m in calls)  # the Wiener pass never started
    assert all(f < 1.0 for f, _ in calls)
