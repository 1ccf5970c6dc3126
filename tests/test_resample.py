"""In-plane resampling (mixsup.resample): windows of the output computed from the inputs they need."""
import numpy as np

from mixsup.resample import output_window, resample_inplane, resample_inplane_window


def test_a_window_equals_the_same_window_of_the_whole_output():
    rng = np.random.default_rng(1)
    for _ in range(200):
        (height, width), (out_h, out_w) = rng.integers(1, 60, 2), rng.integers(1, 90, 2)
        volume = rng.normal(size=(2, height, width)).astype(np.float32)
        r0, c0 = rng.integers(0, out_h), rng.integers(0, out_w)
        rows, columns = slice(r0, rng.integers(r0 + 1, out_h + 1)), slice(c0, rng.integers(c0 + 1, out_w + 1))
        whole = resample_inplane(volume, (out_h, out_w))[..., rows, columns]
        np.testing.assert_allclose(resample_inplane_window(volume, (out_h, out_w), rows, columns), whole, atol=1e-6)


def test_an_input_region_influences_only_its_output_window():
    rng = np.random.default_rng(2)
    for _ in range(300):
        size_in, size_out = (int(n) for n in rng.integers(1, 80, 2))
        start = int(rng.integers(0, size_in))
        source = slice(start, int(rng.integers(start + 1, size_in + 1)))
        impulse = np.zeros((1, size_in, 1), np.float32)
        impulse[0, source] = 1.0
        reached = np.flatnonzero(resample_inplane(impulse, (size_out, 1))[0, :, 0])
        window = output_window(size_in, size_out, source)
        # (Downsampling may skip a narrow region altogether: then nothing is reached.)
        assert np.all((reached >= window.start) & (reached < window.stop))
