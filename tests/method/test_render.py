import numpy as np
import pytest

from clipforget.toyworld.render import CLASSES, DOMAINS, render_image


def test_render_is_a_pure_function_of_its_seed():
    a = render_image("star", "sketch", 7, 3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_image("star", "sketch", 7, 3))
    assert not np.array_equal(a, render_image("star", "sketch", 8, 3))
    assert not np.array_equal(a, render_image("star", "sketch", 7, 4))


def test_domains_look_different():
    # sketches are gray strokes on paper; cartoons are saturated; photos and paintings fill the frame
    sat = {}
    for d in DOMAINS:
        imgs = np.stack([render_image(c, d, 3, i) for c in CLASSES for i in range(3)]).astype(float)
        sat[d] = (imgs.max(-1) - imgs.min(-1)).mean()
    assert sat["sketch"] < 10 < sat["cartoon"]


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown toy class"):
        render_image("dragon", "sketch", 0, 0)
    with pytest.raises(ValueError, match="unknown toy domain"):
        render_image("star", "pastel", 0, 0)
