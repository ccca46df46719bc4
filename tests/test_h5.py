import numpy as np
import pytest

from cmkd.data.h5 import PreparedSplit, PreparedWriter, read_attrs
from cmkd.errors import DataFormatError

ATTRS = {"task": "classification", "class_names": ["a", "b"], "modalities": ["x", "y"],
         "teacher_modality": "x", "student_modality": "y", "ignore_index": None, "source_checksum": "t"}


def test_write_read_roundtrip_and_attrs(tmp_path):
    path = tmp_path / "d.h5"
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.arange(10) % 2
    with PreparedWriter(path, ATTRS, chunk_rows=4) as w:
        w.write("train", {"x": x, "labels": y})
        for start in range(0, 10, 3):
            w.append("val", {"x": x[start:start + 3], "labels": y[start:start + 3]})
    attrs = read_attrs(path)
    assert attrs["class_names"] == ["a", "b"] and attrs["ignore_index"] is None
    assert attrs["format_version"] == 1 and "code_version" in attrs
    train = PreparedSplit(path, "train")
    assert len(train) == 10 and train.chunk_rows == 4
    np.testing.assert_array_equal(train.load(["x"])["x"], x)
    val = PreparedSplit(path, "val")
    np.testing.assert_array_equal(val.load(["x", "labels"])["labels"], y)
    # Chunks in a permuted block order still cover every row exactly once.
    rows = np.concatenate([r for r, _ in train.iter_chunks(["x"], order=np.array([2, 0, 1]))])
    assert sorted(rows.tolist()) == list(range(10)) and rows[0] == 8


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(RuntimeError):
        with PreparedWriter(path, ATTRS) as w:
            w.write("train", {"x": np.zeros((4, 2))})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_length_mismatch_and_missing_group_are_named(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(ValueError, match="differ in length"):
        with PreparedWriter(path, ATTRS) as w:
            w.write("train", {"x": np.zeros((4, 2)), "labels": np.zeros(3)})
    with PreparedWriter(path, ATTRS) as w:
        w.write("train", {"x": np.zeros((4, 2)), "labels": np.zeros(4)})
    with pytest.raises(DataFormatError, match="d.h5.*'test'"):
        PreparedSplit(path, "test")
    with pytest.raises(DataFormatError, match="does not exist"):
        read_attrs(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(DataFormatError, match="junk.h5"):
        read_attrs(tmp_path / "junk.h5")
