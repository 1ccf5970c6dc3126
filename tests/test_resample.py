"""In-plane resampling (mixsup.resample): windows of the output computed from the inputs they need."""
import numpy as np
from scipy import ndimage

from mixsup.resample import anti_aliasing_sigma, output_window, resample_inplane, resample_inplane_window


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


def test_anti_aliasing_averages_the_noise_a_linear_sample_keeps():
    """0.7 mm pixel noise brought to 1.6 mm: a linear sample keeps most of it, a smoothed one its local mean."""
    noise = np.random.default_rng(3).normal(size=(2, 256, 256)).astype(np.float32)
    plain = resample_inplane(noise, (112, 112))
    smoothed = resample_inplane(noise, (112, 112), anti_aliasing=True)
    assert smoothed.std() < 0.6 * plain.std()
    assert plain.std() > 0.6  # a linear sample between pixels only partly averages them
    flat = np.full((1, 256, 200), 40.0, np.float32)
    np.testing.assert_allclose(resample_inplane(flat, (112, 90), anti_aliasing=True), 40.0, rtol=1e-6)


def test_anti_aliasing_smooths_only_the_axes_that_shrink():
    assert anti_aliasing_sigma((2.0, 0.5)) == (0.5, 0.0)
    image = np.random.default_rng(4).normal(size=(1, 30, 40)).astype(np.float32)
    for out_hw in ((60, 80), (30, 40)):  # growing or unchanged: nothing to smooth
        smoothed = resample_inplane(image, out_hw, anti_aliasing=True)
        np.testing.assert_array_equal(smoothed, resample_inplane(image, out_hw))
    # rows shrink, columns grow: the same as smoothing the rows alone by hand, then sampling
    by_hand = resample_inplane(ndimage.gaussian_filter(image[0], (0.5, 0.0), mode="nearest")[None], (15, 80))
    np.testing.assert_allclose(resample_inplane(image, (15, 80), anti_aliasing=True), by_hand, atol=1e-6)
