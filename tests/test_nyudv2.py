"""NYU-Depth-V2: label maps, the v7.3 reader on generated files (layout, alignment, bad input),
splits, download from local files with checksums, and the feature methods on the sample."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from cmkd.data.datasets import nyudv2
from cmkd.data.datasets.nyudv2_classes import CLASSES_13, CLASSES_40, MAP_40_TO_13, MAP_894_TO_40, raw_to_train_ids
from cmkd.data.h5 import PreparedSplit, read_attrs
from cmkd.data.registry import available_datasets, dataset_module
from cmkd.data.samples import nyudv2 as nyudv2_sample
from cmkd.errors import ChecksumError, ConfigError, DataFormatError

CFG = {"classes": 40, "image_size": [480, 640], "val_fraction": 0.5, "split_seed": 0,
       "teacher_modality": "rgb", "student_modality": "depth"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ label maps


def test_label_maps():
    assert MAP_894_TO_40.shape == (894,) and set(MAP_894_TO_40.tolist()) == set(range(1, 41))
    # raw ids of `names` (1-based) whose 40-class is known: wall, floor, ceiling, cabinet, chair,
    # table, door, window, picture, blinds, sofa, books, counter, refrigerator
    known = {21: "wall", 11: "floor", 4: "ceiling", 3: "cabinet", 5: "chair", 19: "table", 28: "door", 59: "window",
             64: "picture", 80: "blinds", 83: "sofa", 85: "books", 7: "counter", 17: "refrigerator"}
    for raw, name in known.items():
        assert CLASSES_40[MAP_894_TO_40[raw - 1] - 1] == name
    # map40to13.m, transcribed by name
    to13 = {"wall": "wall", "floor": "floor", "cabinet": "furniture", "bed": "bed", "chair": "chair", "sofa": "sofa",
            "table": "table", "door": "wall", "window": "window", "bookshelf": "furniture", "picture": "picture",
            "counter": "furniture", "blinds": "window", "desk": "table", "shelves": "furniture", "curtain": "window",
            "dresser": "furniture", "pillow": "objects", "mirror": "objects", "floor_mat": "floor",
            "clothes": "objects",
            "ceiling": "ceiling", "books": "books", "refrigerator": "furniture", "television": "tv",
            "night_stand": "furniture",
            "otherfurniture": "furniture"}
    for i, name in enumerate(CLASSES_40):
        assert CLASSES_13[MAP_40_TO_13[i] - 1] == to13.get(name, "objects"), name
    lut13, lut40 = raw_to_train_ids(13), raw_to_train_ids(40)
    assert lut13[0] == lut40[0] == -1 and lut13.shape == (895,)
    assert (CLASSES_13[lut13[21]] == "wall" and CLASSES_40[lut40[157]] == "bed"
            and CLASSES_40[lut40[172]] == "television")


def test_registry():
    names = available_datasets()
    assert "nyudv2" in names and "nyudv2-sample" in names and names == sorted(names)
    assert dataset_module("nyudv2") is nyudv2
    # the sample generates the raw files and prepares them with the reader's own prepare
    assert dataset_module("nyudv2-sample") is nyudv2_sample


def test_the_reader_refuses_sample_settings():
    with pytest.raises(ConfigError) as err:
        nyudv2.validate({**CFG, "sample": {}}, "data.nyudv2")
    assert err.value.key == "data.nyudv2.sample" and "nyudv2-sample" in err.value.problem


# ---------------------------------------------------------------------- generated v7.3 files


def write_mat73(path, rgb, depth, labels, drop=(), depth_shape=None):
    """A labeled file written from MATLAB-order arrays (H x W x 3 x N etc.): HDF5 holds the
    column-major array, i.e. every axis reversed (numpy's .T)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        arrays = {"images": rgb.T, "depths": depth.T if depth_shape is None else np.zeros(depth_shape, np.float32),
                  "labels": labels.T}
        for name, a in arrays.items():
            if name not in drop:
                f[name] = a


def hand_made(tmp_path, n=3, h=12, w=16, seed=0, train=(1, 3), test=(2,), **kw):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(h, w, 3, n), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.0, size=(h, w, n)).astype(np.float32)
    labels = rng.integers(0, 895, size=(h, w, n)).astype(np.uint16)
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    write_mat73(raw / nyudv2.LABELED, rgb, depth, labels, **kw)
    savemat(raw / nyudv2.SPLITS,
            {"trainNdxs": np.array(train, float)[:, None], "testNdxs": np.array(test, float)[:, None]})
    return raw, rgb, depth, labels


def test_reader_aligns_matlab_order_arrays(tmp_path):
    raw, rgb, depth, labels = hand_made(tmp_path)
    cfg = {**CFG, "image_size": [12, 16]}
    nyudv2.prepare(cfg, raw, tmp_path / "x.h5", progress=False)
    attrs = read_attrs(tmp_path / "x.h5")
    assert attrs["task"] == "segmentation" and attrs["ignore_index"] == -1 and attrs["class_names"] == list(CLASSES_40)
    assert attrs["split_counts"] == {"train": 1, "val": 1, "test": 1} and attrs["source_image_size"] == [12, 16]
    lut = raw_to_train_ids(40)
    seen = []
    for split in ("train", "val", "test"):
        got = PreparedSplit(tmp_path / "x.h5", split).load(["rgb", "depth", "labels", "frame"])
        for row, frame in enumerate(got["frame"]):
            i = frame - 1
            seen.append(int(frame))
            np.testing.assert_array_equal(got["rgb"][row], rgb[:, :, :, i].transpose(2, 0, 1))
            np.testing.assert_array_equal(got["depth"][row, 0], depth[:, :, i])
            np.testing.assert_array_equal(got["labels"][row], lut[labels[:, :, i]])
    assert sorted(seen[:2]) == [1, 3] and seen[2] == 2  # train + val from trainNdxs, test from testNdxs
    # normalise statistics are those of the training frame, depth in metres
    train_frame = PreparedSplit(tmp_path / "x.h5", "train").load(["frame"])["frame"][0] - 1
    assert attrs["normalise"]["depth"]["mean"][0] == pytest.approx(float(depth[:, :, train_frame].mean()), rel=1e-6)
    assert attrs["normalise"]["rgb"]["scale"] == 255.0


def test_reverse_direction_and_13_classes(tmp_path):
    raw, _, depth, labels = hand_made(tmp_path, n=4, h=20, w=36, train=(1, 2, 4), test=(3,))
    cfg = {**CFG, "classes": 13, "image_size": [10, 12], "teacher_modality": "depth", "student_modality": "rgb"}
    nyudv2.prepare(cfg, raw, tmp_path / "x.h5", progress=False)
    attrs = read_attrs(tmp_path / "x.h5")
    assert (attrs["teacher_modality"],
            attrs["student_modality"]) == ("depth", "rgb") and len(attrs["class_names"]) == 13
    got = PreparedSplit(tmp_path / "x.h5", "test").load(["depth", "labels"])
    rows, cols = np.arange(10) * 20 // 10, np.arange(12) * 36 // 12
    np.testing.assert_array_equal(got["depth"][0, 0], depth[:, :, 2][np.ix_(rows, cols)])
    np.testing.assert_array_equal(got["labels"][0], raw_to_train_ids(13)[labels[:, :, 2]][np.ix_(rows, cols)])


def test_validation_carve_is_seeded_and_disjoint():
    train = np.arange(795)
    a_train, a_val = nyudv2.carve_validation(train, 0.1, 0)
    b_train, b_val = nyudv2.carve_validation(train, 0.1, 0)
    assert np.array_equal(a_val, b_val) and len(a_val) == 80 and len(a_train) == 715
    assert not set(a_val) & set(a_train) and set(a_val) | set(a_train) == set(train)
    assert not np.array_equal(nyudv2.carve_validation(train, 0.1, 1)[1], a_val)


@pytest.mark.parametrize("kind,match", [
    ("no_labels", r"missing dataset\(s\) \['labels'\]"),
    ("depth_shape", r"depths must be \[N, W, H\]"),
    ("not_hdf5", "not a MATLAB v7.3"),
    ("label_range", "label ids must lie in 0..894"),
])
def test_bad_labeled_file_names_it_and_writes_nothing(tmp_path, kind, match):
    if kind == "no_labels":
        raw, *_ = hand_made(tmp_path, drop=("labels",))
    elif kind == "depth_shape":
        raw, *_ = hand_made(tmp_path, depth_shape=(3, 12, 16))
    else:
        raw, rgb, depth, labels = hand_made(tmp_path)
        if kind == "not_hdf5":
            (raw / nyudv2.LABELED).write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
        else:
            labels[0, 0, 0] = 900
            write_mat73(raw / nyudv2.LABELED, rgb, depth, labels)
    out = tmp_path / "out" / "x.h5"
    with pytest.raises(DataFormatError, match=match) as err:
        nyudv2.prepare({**CFG, "image_size": [12, 16]}, raw, out, progress=False)
    assert err.value.path.name == nyudv2.LABELED
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temporary file left either


@pytest.mark.parametrize("splits,match", [
    ({"trainNdxs": [[1], [2]]}, r"missing variable\(s\) \['testNdxs'\]"),
    ({"trainNdxs": [[1], [2]], "testNdxs": [[2]]}, "share 1 frame"),
    ({"trainNdxs": [[0], [1]], "testNdxs": [[2]]}, "1-based frame numbers in 1..3"),
    ({"trainNdxs": [[1], [1.5]], "testNdxs": [[2]]}, "integer frame numbers"),
])
def test_bad_splits(tmp_path, splits, match):
    path = tmp_path / "splits.mat"
    savemat(path, {k: np.array(v, float) for k, v in splits.items()})
    with pytest.raises(DataFormatError, match=match) as err:
        nyudv2.read_splits(path, 3)
    assert err.value.path == path


def test_config_errors_name_the_key():
    bad = [({"classes": 20}, "classes"), ({"image_size": [4, 8]}, "image_size"),
           ({"val_fraction": 1.0}, "val_fraction"),
           ({"student_modality": "rgb"}, "student_modality"), ({"teacher_modality": "hha"}, "teacher_modality")]
    for change, key in bad:
        with pytest.raises(ConfigError) as err:
            nyudv2_sample.validate({**CFG, "sample": {}, **change}, "data.nyudv2")
        assert err.value.key == f"data.nyudv2.{key}"
    with pytest.raises(ConfigError) as err:
        nyudv2.validate(dict(CFG), "data.nyudv2")
    assert err.value.key == "data.nyudv2.labeled"
    with pytest.raises(ConfigError) as err:
        nyudv2_sample.validate({**CFG, "sample": {"frames": 5, "train_frames": 5}}, "data.x")
    assert err.value.key == "data.x.sample.train_frames"


# ---------------------------------------------------------------------------- the sample


@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("nyu") / "raw"
    nyudv2_sample.download({**CFG, "sample": {"frames": 6, "train_frames": 4, "seed": 0, "render_scale": 8}}, raw,
                           progress=False)
    return raw


def test_sample_has_the_exact_layout(sample_raw):
    path = sample_raw / nyudv2.LABELED
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file" and h5py.is_hdf5(path)
    with h5py.File(path, "r") as f:
        assert f["images"].shape == (6, 3, 640, 480) and f["images"].dtype == np.uint8
        assert f["depths"].shape == f["labels"].shape == f["rawDepths"].shape == (6, 640, 480)
        assert f["depths"].dtype == np.float32 and f["labels"].dtype == np.uint16
        assert f["images"].attrs["MATLAB_class"] == b"uint8" and f["depths"].attrs["MATLAB_class"] == b"single"
        labels = f["labels"][0].T  # [480, 640]
        depth = f["depths"][0].T
    assert (labels[:8] == 0).all() and (labels[:, -8:] == 0).all() and (labels[8:-8, 8:-8] > 0).all()
    assert set(np.unique(labels)) - {0} <= set(range(1, 895))
    assert 0.05 <= depth.min() and depth.max() < 12  # metres inside a room
    splits = loadmat(sample_raw / nyudv2.SPLITS)
    assert splits["trainNdxs"].shape == (4, 1) and splits["testNdxs"].shape == (2, 1)
    assert sorted(np.concatenate([splits["trainNdxs"], splits["testNdxs"]]).ravel().tolist()) == list(range(1, 7))
    source = json.loads((sample_raw / nyudv2.SOURCE).read_text())
    assert source["generated"] == "cmkd.data.nyudv2_sample" and len(source["labeled"]["sha256"]) == 64


def test_sample_is_deterministic(tmp_path):
    nyudv2_sample.generate(tmp_path, frames=4, train_frames=2, seed=3, render_scale=8)
    a = h5py.File(tmp_path / nyudv2.LABELED, "r")["labels"][()]
    (tmp_path / "b").mkdir()
    nyudv2_sample.generate(tmp_path / "b", frames=4, train_frames=2, seed=3, render_scale=8)
    assert np.array_equal(a, h5py.File(tmp_path / "b" / nyudv2.LABELED, "r")["labels"][()])


def test_download_from_local_paths_checks_sha256(tmp_path, sample_raw):
    from cmkd.data.download import sha256_file

    labeled, splits = sample_raw / nyudv2.LABELED, sample_raw / nyudv2.SPLITS
    cfg = {**CFG, "labeled": {"path": str(labeled), "sha256": sha256_file(labeled)}, "splits": {"path": str(splits)}}
    nyudv2.download(cfg, tmp_path / "ok", progress=False)
    assert sha256_file(tmp_path / "ok" / nyudv2.LABELED) == sha256_file(labeled)
    assert json.loads((tmp_path / "ok" / nyudv2.SOURCE).read_text())["splits"]["sha256"] == sha256_file(splits)
    bad = {**cfg, "labeled": {"path": str(labeled), "sha256": "0" * 64}}
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        nyudv2.download(bad, tmp_path / "bad", progress=False)
    assert err.value.path == labeled
    assert not (tmp_path / "bad" / nyudv2.LABELED).exists()
    # a file that is not the labeled .mat is refused at download time, naming it
    not_mat = tmp_path / "x.mat"
    not_mat.write_bytes(b"\0" * 1000)
    with pytest.raises(DataFormatError, match="not a MATLAB v7.3") as err:
        nyudv2.download({**cfg, "labeled": {"path": str(not_mat)}}, tmp_path / "bad2", progress=False)
    assert err.value.path.name == nyudv2.LABELED


def test_feature_methods_train_on_the_prepared_sample(tmp_path, sample_raw):
    from cmkd.methods import build_distiller
    from cmkd.models import build_model
    from cmkd.training.config import TrainConfig
    from cmkd.training.data import load_split
    from cmkd.training.loop import fit

    out = tmp_path / "nyu.h5"
    nyudv2.prepare({**CFG, "classes": 13, "image_size": [24, 32]}, sample_raw, out, progress=False)
    attrs = read_attrs(out)
    train, val = load_split(out, "train", attrs), load_split(out, "val", attrs)
    batch = next(train.batches(4))
    assert batch["student_input"].shape == (2, 1, 24, 32) and batch["student_input"].dtype == torch.float32
    assert batch["teacher_input"].shape == (2, 3, 24, 32) and int(batch["target"].min()) == -1
    for method in ("fitnet", "at", "rkd", "crd"):
        torch.manual_seed(0)
        teacher = build_model({"arch": "seg_resnet", "width": 4}, (3, 24, 32), 13)
        student = build_model({"arch": "seg_resnet", "width": 4}, (1, 24, 32), 13)
        d = build_distiller({"method": method}, student, teacher, 13)
        result = fit(d, train, val, TrainConfig(epochs=1, batch_size=2, device="cpu"), task="segmentation",
                     num_classes=13, progress=False)
        assert math.isfinite(result.history[0]["train/loss"]) and 0.0 <= result.best_val["miou"] <= 1.0, method
