import numpy as np
import pytest

from cmkd.data.datasets import digits, synthetic
from cmkd.data.h5 import PreparedSplit, read_attrs
from cmkd.errors import ConfigError


@pytest.mark.parametrize("gamma,shared", [(0.0, 16), (0.25, 12), (0.5, 8), (1.0, 0)])
def test_ntdh_gamma_is_the_share_of_teacher_features_not_shared(gamma, shared):
    teacher, student, y = synthetic.ntdh_sklearn(n_samples=200, n_features=16, n_classes=3, gamma=gamma, seed=1)
    same = [np.array_equal(teacher[:, j], student[:, j]) for j in range(16)]
    assert sum(same) == shared and all(same[:shared])
    assert teacher.dtype == np.float32 and y.dtype == np.int64 and set(y) == {0, 1, 2}
    # The student modality is the same whatever the gap (NTDH keeps x^b fixed).
    _, student0, y0 = synthetic.ntdh_sklearn(n_samples=200, n_features=16, n_classes=3, gamma=0.0, seed=1)
    np.testing.assert_array_equal(student, student0)
    np.testing.assert_array_equal(y, y0)


def test_synthetic_prepare_writes_main_and_variants(tmp_path):
    cfg = {"generator": "ntdh", "gamma": 0.5, "gammas": [0.0, 1.0], "n_samples": 300, "n_features": 8,
           "n_classes": 3, "split": [0.6, 0.2, 0.2], "seed": 0}
    out = tmp_path / "s.h5"
    synthetic.prepare(cfg, tmp_path, out)
    attrs = read_attrs(out)
    assert attrs["variants"] == ["ntdh_gamma_0.00", "ntdh_gamma_1.00"]
    sizes = {s: len(PreparedSplit(out, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 180, "val": 60, "test": 60}
    g0 = PreparedSplit(out, "train", root="ntdh_gamma_0.00").load(["teacher", "student"])
    np.testing.assert_array_equal(g0["teacher"], g0["student"])


@pytest.mark.parametrize("bad,key", [({"gammas": []}, "data.synthetic.gammas"),
                                     ({"gammas": [1.5]}, "data.synthetic.gammas"),
                                     ({"generator": "nope"}, "data.synthetic.generator"),
                                     ({"split": [0.5, 0.5]}, "data.synthetic.split")])
def test_synthetic_validation_names_the_key(bad, key):
    cfg = {"generator": "ntdh", "gamma": 0.5, "gammas": [0.0], **bad}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        synthetic.validate(cfg, "data.synthetic")


def test_digits_m_follows_the_mnist_m_rule():
    gray = np.array([[[[0.0, 1.0], [0.5, 0.25]]]], dtype=np.float32)  # [1, 1, 2, 2]
    patch = np.stack([np.full((2, 2), v, np.float32) for v in (0.2, 0.6, 1.0)])[None]  # [1, 3, 2, 2]
    out = digits.make_digits_m(gray, patch, blend=1.0)
    expected = np.abs(patch - gray)  # |patch - digit| channel by channel, computed directly
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(digits.make_digits_m(gray, patch, blend=0.0), np.repeat(gray, 3, axis=1))


def test_digits_prepare(tmp_path):
    out = tmp_path / "d.h5"
    digits.prepare({"image_size": 16, "blend": 0.5, "noise_std": 0.1,
                    "split": [0.6, 0.2, 0.2], "seed": 0}, tmp_path, out)
    train = PreparedSplit(out, "train").load(["gray", "digits_m", "labels"])
    assert train["gray"].shape[1:] == (1, 16, 16) and train["digits_m"].shape[1:] == (3, 16, 16)
    total = sum(len(PreparedSplit(out, s)) for s in ("train", "val", "test"))
    assert total == 1797
    # Standardised with training statistics.
    assert abs(train["gray"].mean()) < 1e-3 and abs(train["gray"].std() - 1) < 1e-3
