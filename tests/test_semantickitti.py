"""SemanticKITTI readers, the procedural sample and `prepare`, on files written by the tests."""

from __future__ import annotations

import dataclasses
import errno
import math
import shutil
import zipfile
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cmkd.data.datasets import semantickitti as sk
from cmkd.data.h5 import PreparedSplit, PreparedWriter, read_attrs
from cmkd.data.registry import dataset_module
from cmkd.data.samples import semantickitti as kitti_sample
from cmkd.errors import ConfigError, DataFormatError
from cmkd.training.data import load_split

TINY = {
    "seed": 3,
    "sequences": [{"sequence": 0, "frames": 2, "image_size": [1241, 376]},
                  {"sequence": 8, "frames": 1, "image_size": [1226, 370]}],
    "image_scale": 0.2,
    "lidar_width": 256,
    "split": {"train": [0], "val": [8]},
    "crop": {"train": [32, 96], "val": [32, 96]},
    "workers": 1,
}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("sample") / "raw"
    kitti_sample.download(TINY, raw, progress=False)
    return raw


@pytest.fixture
def sample_copy(sample, tmp_path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(sample, raw)
    return raw


def seq_dir(raw: Path, seq: str = "00") -> Path:
    return raw / "dataset" / "sequences" / seq


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def shm_created(monkeypatch) -> list[str]:
    """Names of the shared-memory segments `prepare` creates (in the main process)."""
    names: list[str] = []

    class Recorded(SharedMemory):
        def __init__(self, name=None, create=False, size=0):
            super().__init__(name, create, size)
            if create:
                names.append(self.name)

    monkeypatch.setattr(sk, "SharedMemory", Recorded)
    return names


def left_in_dev_shm(names: list[str]) -> list[str]:
    return [name for name in names if Path("/dev/shm", name).exists()]


def h5_content(path: Path) -> dict:
    """Every attribute, and every dataset's dtype, shape, chunks and bytes."""
    with h5py.File(path, "r") as f:
        content = {"attrs": {key: f.attrs[key] for key in f.attrs}}
        f.visititems(lambda name, obj: content.__setitem__(name, (obj.dtype, obj.shape, obj.chunks, obj[()].tobytes()))
                     if isinstance(obj, h5py.Dataset) else None)
    return content


# --------------------------------------------------------------------------- readers

def test_read_scan_and_labels_split_bits(tmp_path):
    pts = np.array([[1.0, 2.0, 3.0, 0.5], [-4.0, 5.5, -0.25, 0.0]], np.float32)
    pts.tofile(tmp_path / "a.bin")
    raw = np.array([40 | (0 << 16), 252 | (7 << 16)], np.uint32)
    raw.tofile(tmp_path / "a.label")
    assert (sk.read_scan(tmp_path / "a.bin") == pts).all()
    assert sk.read_scan(tmp_path / "a.bin").dtype == np.float32
    sem, inst = sk.read_labels(tmp_path / "a.label", 2)
    assert sem.tolist() == [40, 252] and inst.tolist() == [0, 7]
    assert sem.dtype == inst.dtype == np.uint16
    assert sk.map_labels(sem).tolist() == [8, 0]  # road -> 9 - 1, moving-car -> car 1 - 1


def test_learning_map_tables_are_consistent():
    assert len(sk.CLASS_NAMES) == 19 and sk.CLASS_NAMES[0] == "car" and sk.CLASS_NAMES[-1] == "traffic-sign"
    assert set(sk.LEARNING_MAP) == set(sk.LABELS)
    for train_id, raw_id in sk.LEARNING_MAP_INV.items():
        assert sk.LEARNING_MAP[raw_id] == train_id
    raw = np.array(sorted(sk.LEARNING_MAP), np.uint16)
    mapped = sk.map_labels(raw)
    assert mapped.tolist() == [sk.LEARNING_MAP[int(r)] - 1 for r in raw]
    assert mapped.min() == -1 and mapped.max() == 18


@pytest.mark.parametrize("nbytes", [15, 17, 33])
def test_truncated_scan_names_file(tmp_path, nbytes):
    (tmp_path / "t.bin").write_bytes(b"\0" * nbytes)
    with pytest.raises(DataFormatError, match=r"t\.bin.*multiple of 16") as err:
        sk.read_scan(tmp_path / "t.bin")
    assert isinstance(err.value, ValueError)


def test_nan_coordinates_name_file(tmp_path):
    pts = np.zeros((5, 4), np.float32)
    pts[3, 1] = np.nan
    pts.tofile(tmp_path / "n.bin")
    with pytest.raises(DataFormatError, match=r"n\.bin.*NaN or infinite coordinates.*row 3"):
        sk.read_scan(tmp_path / "n.bin")
    pts[3, 1] = 0.0
    pts[2, 3] = np.inf
    pts.tofile(tmp_path / "r.bin")
    with pytest.raises(DataFormatError, match=r"r\.bin.*infinite remission.*row 2"):
        sk.read_scan(tmp_path / "r.bin")


def test_label_count_mismatch_and_unknown_ids(tmp_path):
    np.array([40, 48, 50], np.uint32).tofile(tmp_path / "l.label")
    with pytest.raises(DataFormatError, match=r"l\.label.*3 labels but the scan has 4 points"):
        sk.read_labels(tmp_path / "l.label", 4)
    sem, _ = sk.read_labels(tmp_path / "l.label")
    with pytest.raises(DataFormatError, match=r"l\.label.*\[7, 300\].*not in learning_map"):
        sk.map_labels(np.array([40, 7, 300, 7], np.uint16), tmp_path / "l.label")
    assert sk.map_labels(sem).tolist() == [8, 10, 12]


def test_read_calib_and_missing_keys(tmp_path):
    good = ("P0: " + " ".join(["0"] * 12) + "\nP2: " + " ".join(str(i) for i in range(12)) +
            "\nTr: " + " ".join(str(i / 10) for i in range(12)) + "\n")
    (tmp_path / "calib.txt").write_text(good)
    calib = sk.read_calib(tmp_path / "calib.txt")
    assert calib["P2"].shape == (3, 4) and calib["P2"][2, 3] == 11.0
    assert calib["Tr"].shape == (4, 4) and calib["Tr"][1, 0] == 0.4 and calib["Tr"][3].tolist() == [0, 0, 0, 1]
    for key in ("P2", "Tr"):
        text = "\n".join(line for line in good.splitlines() if not line.startswith(key))
        (tmp_path / f"no{key}.txt").write_text(text)
        with pytest.raises(DataFormatError, match=rf"no{key}\.txt: has no {key} entry"):
            sk.read_calib(tmp_path / f"no{key}.txt")
    (tmp_path / "short.txt").write_text(good.replace("Tr: 0.0 ", "Tr: "))
    with pytest.raises(DataFormatError, match=r"short\.txt: Tr has 11 numbers"):
        sk.read_calib(tmp_path / "short.txt")


def test_missing_image_names_it(tmp_path):
    with pytest.raises(DataFormatError, match=r"000005\.png.*does not exist"):
        sk.read_image(tmp_path / "000005.png")


# --------------------------------------------------------------------------- the sample

def test_sample_has_the_exact_semantickitti_layout(sample):
    for seq, size in (("00", (1241, 376)), ("08", (1226, 370))):
        d = seq_dir(sample, seq)
        frames = {"00": 2, "08": 1}[seq]
        names = [f"{i:06d}" for i in range(frames)]
        assert sorted(p.name for p in (d / "velodyne").iterdir()) == [n + ".bin" for n in names]
        assert sorted(p.name for p in (d / "labels").iterdir()) == [n + ".label" for n in names]
        assert sorted(p.name for p in (d / "image_2").iterdir()) == [n + ".png" for n in names]
        assert len((d / "poses.txt").read_text().splitlines()) == frames
        for name in names:
            scan = sk.read_scan(d / "velodyne" / f"{name}.bin")
            raw = np.fromfile(d / "labels" / f"{name}.label", np.uint32)
            assert len(raw) == len(scan) > 5000
            sem, inst = sk.read_labels(d / "labels" / f"{name}.label", len(scan))
            assert (sem == (raw & 0xFFFF)).all() and (inst == (raw >> 16)).all()
            assert set(np.unique(sem)) <= set(sk.LEARNING_MAP)
            assert inst[np.isin(sem, [40, 48, 50])].max() == 0      # stuff has no instance
            assert inst[np.isin(sem, [10, 252, 80])].min() > 0     # things do
            r = np.linalg.norm(scan[:, :3], axis=1)
            assert r.min() > 1.9 and r.max() < 80.1
            assert ((scan[:, 3] >= 0) & (scan[:, 3] <= 1)).all()
            with Image.open(d / "image_2" / f"{name}.png") as img:
                assert img.mode == "RGB"
                assert img.size == (round(size[0] * 0.2), round(size[1] * 0.2))
        calib = sk.read_calib(d / "calib.txt")
        expected = np.diag([0.2, 0.2, 1.0]) @ np.array(kitti_sample.KITTI_CALIB[size]["P2"]).reshape(3, 4)
        np.testing.assert_allclose(calib["P2"], expected, rtol=1e-11)
    # The line format of KITTI's calib.txt: "KEY: 12 numbers".
    lines = (seq_dir(sample) / "calib.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["P0", "P1", "P2", "P3", "Tr"]
    assert all(len(line.split(":")[1].split()) == 12 for line in lines)


def test_sample_lidar_and_camera_agree_on_labels():
    """The LiDAR and camera are ray-cast separately; projecting the LiDAR points with
    cmkd.data.geometry must land them on camera pixels that saw the same surface."""
    rng = np.random.default_rng(0)
    street = kitti_sample.Street(rng, -90.0, 100.0, "natural")
    P2, Tr, size = kitti_sample.scaled_calib((1241, 376), 0.25)
    pose = kitti_sample._pose(0.0, -2.0, 0.0)
    sun = np.array([0.3, 0.3, 0.9]) / np.linalg.norm([0.3, 0.3, 0.9])
    out = kitti_sample.render_frame(street, 0, pose, kitti_sample.lidar_directions(64, 512), P2, Tr, size,
                                    rng, sun, range_noise=0.0, pixel_noise=0.0)
    from cmkd.data.geometry import lidar_image

    raw = (out["labels"] & 0xFFFF).astype(np.int16)
    _, label_map, valid = lidar_image(out["points"], P2, Tr, size[0], size[1], labels=raw)
    agree = (label_map[valid] == out["camera_labels"][valid].astype(np.int16)).mean()
    assert valid.sum() > 1000
    assert agree > 0.95


def test_sample_is_deterministic(tmp_path):
    cfg = {**TINY, "sequences": [{"sequence": 8, "frames": 1, "image_size": [1226, 370]}],
           "split": {"train": [8], "val": [8]}}
    a, b = tmp_path / "a", tmp_path / "b"
    kitti_sample.download(cfg, a, progress=False)
    kitti_sample.download(cfg, b, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 7  # SOURCES.json, calib, poses, times, one scan, label, image
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    kitti_sample.download({**cfg, "seed": 4}, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / files[-1]).read_bytes() != (a / files[-1]).read_bytes()


# --------------------------------------------------------------------------- prepare

def reference_row(raw: Path, seq: str, frame: int, crop: tuple[int, int]) -> dict[str, np.ndarray]:
    """A centre-cropped row computed with plain loops from the files (independent of prepare)."""
    d = seq_dir(raw, seq)
    name = f"{frame:06d}"
    pts = np.fromfile(d / "velodyne" / f"{name}.bin", np.float32).reshape(-1, 4)
    sem = np.fromfile(d / "labels" / f"{name}.label", np.uint32) & 0xFFFF
    calib = {}
    for line in (d / "calib.txt").read_text().splitlines():
        key, _, rest = line.partition(":")
        calib[key] = np.array(rest.split(), float).reshape(3, 4)
    M = calib["P2"] @ np.vstack([calib["Tr"], [0, 0, 0, 1]])
    img = np.asarray(Image.open(d / "image_2" / f"{name}.png").convert("RGB"))
    H, W = img.shape[:2]
    ch, cw = crop
    top, left = (H - ch) // 2, (W - cw) // 2
    best = np.full((ch, cw), np.inf)
    labels = np.full((ch, cw), -1, np.int16)
    rng = np.zeros((ch, cw))
    for (x, y, z, _), s in zip(pts, sem):
        X = M @ np.array([x, y, z, 1.0], float)
        if X[2] <= 0:
            continue
        u, v = X[0] / X[2], X[1] / X[2]
        if not (0 <= u < W and 0 <= v < H):
            continue
        r, c = math.floor(v) - top, math.floor(u) - left
        if 0 <= r < ch and 0 <= c < cw and X[2] < best[r, c]:
            best[r, c] = X[2]
            labels[r, c] = sk.LEARNING_MAP[int(s)] - 1
            rng[r, c] = math.sqrt(float(x) ** 2 + float(y) ** 2 + float(z) ** 2)
    return {"labels": labels, "valid": np.isfinite(best), "range": rng, "rgb": img[top:top + ch, left:left + cw]}


def test_prepare_writes_the_expected_hdf5(sample, tmp_path):
    out = tmp_path / "prepared" / "semantickitti-sample.h5"
    dataset_module("semantickitti-sample").prepare(TINY, sample, out, progress=False)
    attrs = read_attrs(out)
    assert attrs["task"] == "segmentation" and attrs["class_names"] == sk.CLASS_NAMES
    assert attrs["modalities"] == ["rgb", "lidar"]
    assert (attrs["teacher_modality"], attrs["student_modality"]) == ("rgb", "lidar")
    assert attrs["ignore_index"] == -1 and attrs["lidar_channels"] == ["range", "x", "y", "z", "intensity"]
    assert len(attrs["source_checksum"]) == 64
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == ["train", "val"]
        assert f["train/lidar"].chunks is not None
    for split, n in (("train", 2), ("val", 1)):
        part = PreparedSplit(out, split)
        assert len(part) == n
        assert part.shapes["rgb"] == (n, 3, 32, 96) and part.shapes["lidar"] == (n, 5, 32, 96)
        assert part.dtypes["rgb"] == np.uint8 and part.dtypes["lidar"] == np.float32
        assert part.shapes["labels"] == (n, 32, 96) and part.dtypes["labels"] == np.int8
        data = part.load(["labels", "lidar", "valid", "scan"])
        assert data["labels"].min() >= -1 and data["labels"].max() <= 18
        assert ((data["labels"] >= 0) <= (data["valid"] == 1)).all()  # a label needs a point
        assert (data["lidar"][:, :, data["valid"][0] == 0][0] == 0).all() if n == 1 else True
    assert PreparedSplit(out, "val").load(["scan"])["scan"].tolist() == [8_000_000]
    assert PreparedSplit(out, "train").load(["scan"])["scan"].tolist() == [0, 1]

    # The validation row against the plain-loop reference (centre crop, no randomness).
    ref = reference_row(sample, "08", 0, (32, 96))
    row = PreparedSplit(out, "val").load(["labels", "valid", "lidar", "rgb"])
    assert (row["valid"][0] == ref["valid"]).all() and ref["valid"].sum() > 50
    assert (row["labels"][0] == ref["labels"]).all()
    mean, std = sk.LIDAR_MEAN[0], sk.LIDAR_STD[0]
    np.testing.assert_allclose(row["lidar"][0, 0][ref["valid"]], (ref["range"][ref["valid"]] - mean) / std,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(row["rgb"][0], ref["rgb"].transpose(2, 0, 1))  # the camera pixels
    # Loaded for training, they are float32 (x / 255 - mean) / std, in memory and streamed.
    assert attrs["normalise"] == {"rgb": {"scale": 255.0, "mean": list(sk.RGB_MEAN), "std": list(sk.RGB_STD)}}
    rgb = (ref["rgb"] / 255.0 - np.array(sk.RGB_MEAN)) / np.array(sk.RGB_STD)
    for in_memory in (True, False):
        batch = next(load_split(out, "val", attrs, in_memory=in_memory).batches(4))
        assert batch["teacher_input"].dtype == torch.float32
        np.testing.assert_allclose(batch["teacher_input"][0].numpy(), rgb.transpose(2, 0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_bytes", [4 << 20, 1], ids=["rows_per_chunk", "one_row_per_chunk"])
def test_prepare_in_parallel_gives_the_same_file_content(sample, tmp_path, monkeypatch, shm_created, chunk_bytes):
    """Workers write rows into shared memory and the main process writes HDF5 from there: the
    file is byte for byte the in-process one (one row per chunk: written straight from the
    shared memory), and no segment is left."""
    monkeypatch.setattr(sk, "_CHUNK_BYTES", chunk_bytes)
    cfg = {**TINY, "range_image": True, "range_size": [16, 64]}
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    kitti_sample.prepare(cfg, sample, one, progress=False)
    assert shm_created == []
    kitti_sample.prepare({**cfg, "workers": 2}, sample, two, progress=False)
    assert shm_created and left_in_dev_shm(shm_created) == []
    a, b = h5_content(one), h5_content(two)
    assert a == b
    assert {"train/rgb", "train/range_labels", "val/scan"} <= a.keys()
    assert (a["train/rgb"][2][0] == 1) == (chunk_bytes == 1)  # rows per HDF5 chunk


def test_prepare_without_shared_memory_sends_rows_through_the_pipe(sample, tmp_path, monkeypatch, caplog):
    def no_room(count, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sk, "_Slots", no_room)
    kitti_sample.prepare(TINY, sample, tmp_path / "one.h5", progress=False)
    kitti_sample.prepare({**TINY, "workers": 2}, sample, tmp_path / "pipe.h5", progress=False)
    assert h5_content(tmp_path / "one.h5") == h5_content(tmp_path / "pipe.h5")
    assert "no shared memory" in caplog.text


def test_worker_fills_its_slot_or_returns_a_row_that_does_not_fit(sample, tmp_path, monkeypatch):
    settings = {"train": sk.settings_for(TINY, kitti_sample.KEY, "train")}
    record = sk.list_scans([sample], ["00"])[1]
    expected = sk.process_scan(record, settings["train"])
    monkeypatch.setattr(sk, "_WORKER_SETTINGS", settings)
    monkeypatch.setattr(sk, "_WORKER_SLOTS", {})
    fits, small = sk._Slots(1, sk._layout(settings["train"])[1]), sk._Slots(1, 4096)
    try:
        result = sk._work(("train", record, fits.names[0]))
        assert isinstance(result, sk._InSlot)
        rows = [sk._views(fits.maps[0], result.fields), sk._work(("train", record, small.names[0]))]
        for row in rows:
            assert row.keys() == expected.keys()
            for name, a in row.items():
                assert a.dtype == expected[name].dtype and (a == expected[name]).all(), name
        missing = dataclasses.replace(record, scan=tmp_path / "missing.bin")
        failure = sk._work(("train", missing, fits.names[0]))
        assert failure == sk._Failure(DataFormatError, str(missing.scan), "scan file does not exist")
    finally:
        for shm in sk._WORKER_SLOTS.values():
            shm.close()
        fits.close()
        small.close()


def test_rows_outlive_a_closed_pool_and_no_shared_memory_is_left(sample, shm_created):
    settings = {split: sk.settings_for(TINY, kitti_sample.KEY, split) for split in ("train", "val")}
    jobs = ([("train", r) for r in sk.list_scans([sample], ["00"])]
            + [("val", r) for r in sk.list_scans([sample], ["08"])])
    expected = [{name: a.copy() for name, a in row.items()} for row in sk.iter_prepared(jobs, settings, workers=1)]
    rows = sk.iter_prepared(jobs, settings, workers=2)
    first = next(rows)
    rows.close()  # as on an error or Ctrl-C while the caller writes
    assert shm_created and left_in_dev_shm(shm_created) == []
    for name, a in first.items():  # still mapped: the row keeps its memory
        np.testing.assert_array_equal(a, expected[0][name])


def test_interrupted_prepare_leaves_no_file_and_no_shared_memory(sample, tmp_path, monkeypatch, shm_created):
    def interrupt(self, split, arrays, root=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(sk, "_CHUNK_BYTES", 1)  # every row written at once, from the shared memory
    monkeypatch.setattr(PreparedWriter, "append", interrupt)
    with pytest.raises(KeyboardInterrupt):
        kitti_sample.prepare({**TINY, "workers": 2}, sample, tmp_path / "out" / "x.h5", progress=False)
    assert shm_created and left_in_dev_shm(shm_created) == []
    assert leftovers(tmp_path / "out") == []


def test_prepare_options_range_image_and_open3d(sample, tmp_path):
    cfg = {**TINY, "range_image": True, "range_size": [64, 256], "normals": True, "voxel_size": 0.2,
           "outlier_removal": {"neighbors": 8, "std_ratio": 3.0}, "dtype": "float16"}
    out = tmp_path / "opts.h5"
    kitti_sample.prepare(cfg, sample, out, progress=False)
    part = PreparedSplit(out, "train")
    assert part.shapes["lidar"] == (2, 8, 32, 96) and part.dtypes["lidar"] == np.float16
    assert part.shapes["range"] == (2, 5, 64, 256) and part.shapes["range_labels"] == (2, 64, 256)
    data = part.load(["lidar", "valid", "range_labels"])
    normals = data["lidar"][:, 5:].astype(np.float32)
    norm = np.linalg.norm(normals, axis=1)[data["valid"] == 1]
    np.testing.assert_allclose(norm, 1.0, atol=2e-3)
    assert (data["range_labels"] >= 0).mean() > 0.3
    assert read_attrs(out)["lidar_channels"][-3:] == ["nx", "ny", "nz"]


def test_voxel_downsample_keeps_first_point_per_voxel():
    xyz = np.array([[0.1, 0.1, 0.1], [0.2, 0.2, 0.2], [1.5, 0.0, 0.0], [0.3, 0.9, 0.1], [-0.1, 0.0, 0.0]])
    assert sk.voxel_downsample_index(xyz, 1.0).tolist() == [0, 2, 4]


@pytest.mark.parametrize("problem", ["truncated", "count", "no_P2", "no_Tr", "no_image", "unknown_id", "nan",
                                     "image_half", "image_double"])
def test_prepare_bad_input_names_file_and_writes_nothing(sample_copy, tmp_path, problem, shm_created):
    d = seq_dir(sample_copy, "00")
    scan, label = d / "velodyne" / "000001.bin", d / "labels" / "000001.label"
    if problem == "truncated":
        scan.write_bytes(scan.read_bytes()[:-5])
        culprit, match = scan, "multiple of 16"
    elif problem == "count":
        label.write_bytes(label.read_bytes()[:-8])
        culprit, match = label, "labels but the scan has"
    elif problem in ("no_P2", "no_Tr"):
        key = problem[3:]
        calib = d / "calib.txt"
        calib.write_text("\n".join(line for line in calib.read_text().splitlines() if not line.startswith(key + ":")))
        culprit, match = calib, f"has no {key} entry"
    elif problem == "no_image":
        (d / "image_2" / "000001.png").unlink()
        culprit, match = d / "image_2" / "000001.png", "image missing for scan"
    elif problem == "unknown_id":
        raw = np.fromfile(label, np.uint32)
        raw[10] = 5 | (3 << 16)
        raw.tofile(label)
        culprit, match = label, r"\[5\] are not in learning_map"
    elif problem.startswith("image_"):  # resized, still larger than the crop; calib.txt unchanged
        image = d / "image_2" / "000001.png"
        with Image.open(image) as img:
            factor = 0.5 if problem == "image_half" else 2.0
            img.resize((int(img.width * factor), int(img.height * factor))).save(image)
        culprit, match = image, "is for an image of about"
    else:
        pts = np.fromfile(scan, np.float32)
        pts[4 * 7 + 2] = np.nan
        pts.tofile(scan)
        culprit, match = scan, "NaN"
    out_dir = tmp_path / "prepared"
    out_dir.mkdir()
    for workers in (1, 2):
        with pytest.raises(DataFormatError, match=match) as err:
            kitti_sample.prepare({**TINY, "workers": workers}, sample_copy, out_dir / "x.h5", progress=False)
        assert str(culprit) in str(err.value)
        assert isinstance(err.value, ValueError)
        assert leftovers(out_dir) == []
        assert left_in_dev_shm(shm_created) == []
    assert bool(shm_created) == (problem != "no_image")  # found missing before any scan is read


def test_real_dataset_from_a_folder_or_a_zip(sample, tmp_path):
    """`semantickitti` with an extracted folder (recorded, not copied) and with a zip archive."""
    cfg = {"sources": [{"path": str(sample)}], "split": {"train": [0], "val": [8]},
           "crop": {"train": [32, 96], "val": [32, 96]}, "workers": 1}
    module = dataset_module("semantickitti")
    module.download(cfg, tmp_path / "raw", progress=False)
    assert leftovers(tmp_path / "raw") == ["SOURCES.json"]
    module.prepare(cfg, tmp_path / "raw", tmp_path / "a.h5", progress=False)

    archive = tmp_path / "kitti.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted((sample / "dataset").rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(sample))
    cfg_zip = {**cfg, "sources": [{"path": str(archive)}]}
    module.download(cfg_zip, tmp_path / "raw_zip", progress=False)
    module.prepare(cfg_zip, tmp_path / "raw_zip", tmp_path / "b.h5", progress=False)
    for split in ("train", "val"):
        a = PreparedSplit(tmp_path / "a.h5", split).load(["lidar", "labels"])
        b = PreparedSplit(tmp_path / "b.h5", split).load(["lidar", "labels"])
        assert (a["lidar"] == b["lidar"]).all() and (a["labels"] == b["labels"]).all()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.semantickitti\.sources"):
        sk.download({}, tmp_path / "raw", progress=False)
    with pytest.raises(ConfigError, match=r"data\.semantickitti-sample\.crop"):
        kitti_sample.validate({**TINY, "crop": {"train": [80, 96], "val": [32, 96]}})
    with pytest.raises(ConfigError, match=r"split\.val.*not in data\.semantickitti-sample\.sequences"):
        kitti_sample.validate({**TINY, "split": {"train": [0], "val": [3]}})
    with pytest.raises(ConfigError, match=r"sequences\[0\]\.image_size"):
        kitti_sample.validate({**TINY, "sequences": [{"sequence": 0, "frames": 1, "image_size": [640, 480]}]})
    with pytest.raises(ConfigError, match=r"sequences\[1\]\.sequence.*listed twice"):
        kitti_sample.validate({**TINY, "sequences": [{"sequence": 0, "frames": 1}, {"sequence": "00", "frames": 1}]})
    with pytest.raises(ConfigError, match=r"\.split\.train"):
        sk.validate({"split": {"train": [], "val": [8]}, "crop": {"val": [8, 8]}}, "data.semantickitti")
    with pytest.raises(ConfigError, match=r"\.crop\.val"):
        sk.validate({"split": {"train": [0], "val": [8]}, "crop": {"val": [8]}}, "data.semantickitti")
