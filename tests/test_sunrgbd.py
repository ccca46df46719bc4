"""SUN RGB-D (Kinect v2): depth decoding, intrinsics, back-projection, the HHA-like encoding,
the subset and its counts, bad input, the rendered sample and the prepared HDF5 file."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cmkd.data import sunrgbd
from cmkd.data.h5 import PreparedSplit, read_attrs
from cmkd.data.samples import sunrgbd as sunrgbd_sample
from cmkd.errors import ChecksumError, ConfigError, DataFormatError
from cmkd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = sunrgbd.SCENE_CLASSES


# ----------------------------------------------------------------------------- helpers

def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def rotl3(mm: int) -> int:
    """Hand rotation, written independently of the library: 16-bit rotate left by 3."""
    bits = format(mm, "016b")
    return int(bits[3:] + bits[:3], 2)


def make_frame(base: Path, name: str, scene: str, hw=(6, 8), depth_mm: int = 2000, stem: str = "0000001") -> Path:
    """A minimal frame folder in SUN RGB-D's layout (flat colour, constant depth)."""
    d = base / name
    (d / "image").mkdir(parents=True)
    (d / "depth").mkdir()
    (d / "image" / f"{stem}.jpg").write_bytes(jpg_bytes(np.full(hw + (3,), 120, np.uint8)))
    raw = np.full(hw, rotl3(depth_mm), np.uint16)
    (d / "depth" / f"{stem}.png").write_bytes(png_bytes(raw))
    (d / "intrinsics.txt").write_text("10 0 3.5\n0 10 2.5\n0 0 1\n")
    (d / "scene.txt").write_text(scene)
    return d


def sample_cfg(**overrides):
    cfg = {
        "sample": {"frames_per_class": 10, "image_scale": 0.1, "seed": 3},
        "teacher_modality": "rgb", "student_modality": "depth", "extra_modalities": ["hha", "rgb_depth"],
        "image_size": 16, "other_scenes": "error", "split": [0.7, 0.1, 0.2], "split_seeds": [0, 1, 2],
    }
    cfg.update(overrides)
    return cfg


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sample_raw(tmp_path_factory) -> Path:
    """A downloaded (rendered) 10-class x 10-frame sample at 73 x 53 px, made once."""
    raw = tmp_path_factory.mktemp("sunrgbd") / "raw"
    sunrgbd.download(sample_cfg(), raw, progress=False)
    return raw


@pytest.fixture(scope="module")
def prepared(sample_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "sunrgbd.h5"
    sunrgbd.prepare(sample_cfg(), sample_raw, out, progress=False)
    return out


def copy_raw(sample_raw: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(sample_raw, dst)
    return dst


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary file was left behind"


# ----------------------------------------------------------------------------- depth decoding

def test_rotl3_helper_matches_the_documented_formula():
    assert rotl3(1234) == 9872 and rotl3(9000) == 6465 and rotl3(0b0110_0000_0000_0001) == 0b0000_0000_0000_1011


@pytest.mark.parametrize(
    "raw, metres",
    [
        (0, 0.0),           # no measurement
        (9872, 1.234),      # 1234 mm rotated left: plain shift, no wrap
        (24000, 3.0),       # 0x5DC0 -> 3000 mm
        (32768, 4.096),     # top bit wraps to bit 12: needs the 16-bit mask
        (6465, 8.0),        # 9000 mm (wrapped bits) -> clipped at 8 m
        (1, 8.0),           # 8192 mm -> clipped
        (0xFFFF, 8.0),
    ],
)
def test_decode_depth_known_values(raw, metres):
    out = sunrgbd.decode_depth(np.array([[raw]], np.uint16))
    assert out.dtype == np.float32
    assert out[0, 0] == pytest.approx(metres, abs=1e-6)


def test_decode_depth_array_and_roundtrip():
    rng = np.random.default_rng(0)
    mm = rng.integers(0, 8000, (5, 7))
    raw = np.array([[rotl3(int(v)) for v in row] for row in mm], np.uint16)
    np.testing.assert_allclose(sunrgbd.decode_depth(raw), mm / 1000.0, atol=1e-6)
    np.testing.assert_array_equal(sunrgbd.encode_depth(mm / 1000.0), raw)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32, np.uint32])
def test_decode_depth_wrong_dtype_names_the_file(dtype):
    with pytest.raises(DataFormatError, match=r"some/depth/0001\.png.*uint16"):
        sunrgbd.decode_depth(np.zeros((2, 2), dtype), "some/depth/0001.png")


def test_read_depth_png_rejects_8bit_and_rgb(tmp_path):
    for name, arr in [("gray8.png", np.zeros((4, 4), np.uint8)), ("rgb.png", np.zeros((4, 4, 3), np.uint8))]:
        with pytest.raises(DataFormatError, match=name):
            sunrgbd.read_depth_png(png_bytes(arr), tmp_path / name)
    with pytest.raises(DataFormatError, match="not a PNG"):
        sunrgbd.read_depth_png(b"garbage" * 10, tmp_path / "x.png")
    good = sunrgbd.read_depth_png(png_bytes(np.full((3, 3), rotl3(2500), np.uint16)), tmp_path / "ok.png")
    np.testing.assert_allclose(good, 2.5)


# ----------------------------------------------------------------------------- intrinsics

@pytest.mark.parametrize("text", ["529.5 0 365\n0 529.5 265\n0 0 1\n", "529.5 0 365 0 529.5 265 0 0 1",
                                  "529.5 0 0\n0 529.5 0\n365 265 1\n"])
def test_read_intrinsics_formats(tmp_path, text):
    p = tmp_path / "intrinsics.txt"
    p.write_text(text)
    np.testing.assert_array_equal(sunrgbd.read_intrinsics(p), [[529.5, 0, 365], [0, 529.5, 265], [0, 0, 1]])


@pytest.mark.parametrize("text, problem", [("1 2 3", "9 numbers"), ("a b c d e f g h i", "9 numbers"),
                                           ("-5 0 1 0 5 1 0 0 1", "positive"), ("5 0 1 0 5 1 1 1 1", "camera matrix")])
def test_read_intrinsics_errors_name_the_file(tmp_path, text, problem):
    p = tmp_path / "frame" / "intrinsics.txt"
    p.parent.mkdir()
    p.write_text(text)
    with pytest.raises(DataFormatError, match=problem) as err:
        sunrgbd.read_intrinsics(p)
    assert str(p) in str(err.value)
    with pytest.raises(DataFormatError, match="missing"):
        sunrgbd.read_intrinsics(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- geometry

def test_backproject_known_pixel():
    k = np.array([[500.0, 0, 3.5], [0, 400.0, 2.0], [0, 0, 1]])
    depth = np.zeros((4, 8))
    depth[1, 6] = 2.5
    pts = sunrgbd.backproject(depth, k)
    # By hand: X = (6 - 3.5) * 2.5 / 500, Y = (1 - 2) * 2.5 / 400, Z = 2.5.
    np.testing.assert_allclose(pts[1, 6], [0.0125, -0.00625, 2.5])
    assert np.all(pts[0] == 0)


def test_backproject_matches_open3d():
    import open3d as o3d

    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 6.0, (12, 16)).astype(np.float32)
    k = np.array([[20.0, 0, 7.3], [0, 18.0, 5.1], [0, 0, 1]])
    intr = o3d.camera.PinholeCameraIntrinsic(16, 12, k[0, 0], k[1, 1], k[0, 2], k[1, 2])
    cloud = o3d.geometry.PointCloud.create_from_depth_image(o3d.geometry.Image(depth), intr, depth_scale=1.0,
                                                            depth_trunc=100.0)
    np.testing.assert_allclose(sunrgbd.backproject(depth, k).reshape(-1, 3), np.asarray(cloud.points),
                               rtol=1e-5, atol=1e-6)


def test_renderer_depth_backprojects_onto_the_floor():
    """Renderer and back-projection agree: a floor seen from 1.5 m comes back at height 0."""
    rng = np.random.default_rng(0)
    b = sunrgbd_sample.RoomBuilder(rng, sunrgbd_sample._unit_templates())
    b.part("box", (0.0, 5.0, 0.0), (0, -0.1, 0), (40.0, 0.1, 40.0), np.full(3, 0.5))
    k = np.array([[40.0, 0, 31.5], [0, 40.0, 23.5], [0, 0, 1]])
    eye, forward = np.array([0.3, 1.5, 0.0]), np.array([0.2, -0.6, 1.0])
    _, depth = sunrgbd_sample.render(b, eye, forward, np.array([0.0, 3.0, 5.0]), k, (48, 64), rng)
    valid = depth > 0
    assert valid.mean() > 0.5
    cam = sunrgbd.backproject(depth, k)[valid]
    world = eye + cam @ sunrgbd_sample.camera_rotation(forward, 0.0)
    np.testing.assert_allclose(world[:, 1], 0.0, atol=1e-4)


def test_scale_intrinsics_keeps_the_ray_of_a_pixel_centre():
    k = np.array([[529.5, 0, 365.0], [0, 529.5, 265.0], [0, 0, 1]])
    small = sunrgbd.scale_intrinsics(k, (530, 730), (53, 73))
    # Source pixel u has its centre at u + 0.5 in continuous coords; 10x smaller: (u + 0.5)/10 - 0.5.
    u = 100.0
    u_small = (u + 0.5) / 10 - 0.5
    assert (u_small - small[0, 2]) / small[0, 0] == pytest.approx((u - k[0, 2]) / k[0, 0])


def test_resize_nearest_picks_source_pixels():
    img = np.arange(24).reshape(4, 6)
    np.testing.assert_array_equal(sunrgbd.resize_nearest(img, (2, 3)), [[7, 9, 11], [19, 21, 23]])
    np.testing.assert_array_equal(sunrgbd.resize_nearest(img, (8, 12))[::2, ::2], img)


def test_hha_on_a_wall_and_a_floor():
    k = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
    v = np.arange(24, dtype=np.float64)[:, None] * np.ones((1, 32))
    # A fronto-parallel wall 3 m away.
    wall = np.full((24, 32), 3.0)
    hha = sunrgbd.hha_encode(wall, k)
    np.testing.assert_allclose(hha[0], 1 / 3.0, rtol=1e-5)
    np.testing.assert_allclose(hha[1], (23 - v) * 3.0 / 30.0, atol=1e-5)  # Y = (v - cy) z / fy
    np.testing.assert_allclose(hha[2][2:-2, 2:-2], 90.0, atol=0.5)
    # A floor 1.2 m below a level camera: rows below the horizon see z = 1.2 fy / (v - cy),
    # measured up to the Kinect's 8 m.
    z = 1.2 * 30.0 / np.maximum(v - 11.5, 1e-9)
    floor = np.where((v > 11.5) & (z <= 8.0), z, 0.0)
    hha = sunrgbd.hha_encode(floor, k)
    seen = floor > 0
    np.testing.assert_allclose(hha[2][seen], 0.0, atol=1.0)  # normal = up
    np.testing.assert_allclose(hha[1][seen], 0.0, atol=1e-5)  # every point at the lowest height
    assert np.all(hha[:, ~seen] == 0)


# ----------------------------------------------------------------------------- subset and counts

def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "SUNRGBD"
    kin, ali = root / "kv2" / "kinect2data", root / "kv2" / "align_kv2"
    make_frame(kin, "000001_a_rgbf000001-resize", "office")
    make_frame(kin, "000002_b_rgbf000002-resize", "corridor")   # another scene type
    make_frame(kin, "000003_c_rgbf000003-resize", "office")
    make_frame(ali, "2014-12-18_11-34-09_1", "kitchen", stem="0000337")
    make_frame(ali, "2014-12-18_11-34-10_1", "living_room")
    make_frame(root / "kv1" / "NYUdata", "NYU0001", "office")   # other sensor: never read
    return root


def test_index_frames_selects_kv2_ten_classes(tmp_path):
    root = fake_tree(tmp_path)
    frames, skipped = sunrgbd.index_frames(sunrgbd.find_root(tmp_path))
    assert [f.scene for f in frames] == ["office", "office", "kitchen"]  # kv2_dirs order, then sorted
    assert skipped == {"corridor": 1, "living_room": 1}
    assert frames[2].depth == root / "kv2/align_kv2/2014-12-18_11-34-09_1/depth/0000337.png"
    only = sunrgbd.index_frames(root, kv2_dirs=["kinect2data"])[0]
    assert len(only) == 2
    with pytest.raises(DataFormatError, match=r"corridor"):
        sunrgbd.index_frames(root, other_scenes="error")


def test_counts_are_reported_and_differences_warned(tmp_path, caplog):
    frames, _ = sunrgbd.index_frames(fake_tree(tmp_path))
    with caplog.at_level(logging.INFO, logger="cmkd.data.sunrgbd"):
        counts = sunrgbd.report_counts(frames, {**{c: 0 for c in CLASSES}, "office": 2, "kitchen": 1})
    assert counts == {**{c: 0 for c in CLASSES}, "office": 2, "kitchen": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cmkd.data.sunrgbd"):
        sunrgbd.report_counts(frames, sunrgbd.PAPER_COUNTS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (len(warnings) == 1 and "office: found 2, expected 418" in warnings[0]
            and "3 found, 2105 expected" in warnings[0])


def test_paper_counts_and_default_expectation():
    assert sum(sunrgbd.PAPER_COUNTS.values()) == 2105 and list(sunrgbd.PAPER_COUNTS) == list(CLASSES)
    assert sunrgbd.expected_counts({"sources": [{"url": "x"}]}) == sunrgbd.PAPER_COUNTS
    assert set(sunrgbd.expected_counts(sample_cfg()).values()) == {10}


@pytest.mark.parametrize("text", ["", "K!tchen", "office\nkitchen", "\x00\x01"])
def test_malformed_scene_label_names_the_file(tmp_path, text):
    root = tmp_path / "SUNRGBD"
    d = make_frame(root / "kv2" / "kinect2data", "f1", "office")
    (d / "scene.txt").write_text(text)
    with pytest.raises(DataFormatError, match="unknown scene label") as err:
        sunrgbd.index_frames(root)
    assert str(d / "scene.txt") in str(err.value)


def test_missing_depth_and_missing_scene_name_the_file(tmp_path):
    root = tmp_path / "SUNRGBD"
    d = make_frame(root / "kv2" / "kinect2data", "f1", "office")
    (d / "depth" / "0000001.png").unlink()
    with pytest.raises(DataFormatError, match="no depth image") as err:
        sunrgbd.index_frames(root)
    assert str(d / "image" / "0000001.jpg") in str(err.value)
    shutil.rmtree(d)
    d = make_frame(root / "kv2" / "kinect2data", "f2", "office")
    (d / "scene.txt").unlink()
    with pytest.raises(DataFormatError, match="f2/scene.txt: scene label file is missing"):
        sunrgbd.index_frames(root, other_scenes="error")
    assert sunrgbd.index_frames(root)[1] == {"<no scene.txt>": 1}  # real data: skipped, counted


# ----------------------------------------------------------------------------- the rendered sample

def test_sample_writes_sun_rgbd_layout_and_reads_back(tmp_path):
    root = sunrgbd_sample.generate(tmp_path, frames_per_class=3, image_scale=0.1, seed=7, progress=False,
                                   classes=("bedroom", "kitchen"))
    assert root == tmp_path / "SUNRGBD"
    folders = sorted(p.relative_to(root).as_posix() for p in root.glob("kv2/*/*"))
    assert len(folders) == 6
    assert sum(f.startswith("kv2/align_kv2/") for f in folders) == 2  # every third frame of a class
    for folder in root.glob("kv2/*/*"):
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        stem = Path(files[0]).stem if files[0].startswith("depth/") else None
        assert files == [f"depth/{stem}.png", f"depth_bfx/{stem}.png", f"image/{stem}.jpg",
                         "intrinsics.txt", "scene.txt"]
        with Image.open(folder / "depth" / f"{stem}.png") as img:
            assert img.mode == "I;16" and img.size == (73, 53)
        with Image.open(folder / "image" / f"{stem}.jpg") as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (73, 53)
        k = sunrgbd.read_intrinsics(folder / "intrinsics.txt")
        np.testing.assert_allclose(k, sunrgbd.scale_intrinsics(sunrgbd_sample.KINECT2_K,
                                                               (530, 730), (53, 73)), atol=1e-6)
        depth = sunrgbd.read_depth_png((folder / "depth" / f"{stem}.png").read_bytes(), folder)
        clean = sunrgbd.read_depth_png((folder / "depth_bfx" / f"{stem}.png").read_bytes(), folder)
        assert (clean > 0.3).all() and 0 < (depth == 0).mean() < 0.2  # Kinect-like holes in depth/ only
        assert np.abs(depth - clean)[depth > 0].max() < 0.2
    frames, _ = sunrgbd.index_frames(root, other_scenes="error")
    assert sorted(f.scene for f in frames) == ["bedroom"] * 3 + ["kitchen"] * 3


def test_sample_is_deterministic_per_seed(tmp_path):
    a = sunrgbd_sample.generate(tmp_path / "a", frames_per_class=2, image_scale=0.08, seed=1, progress=False,
                                classes=("office",))
    b = sunrgbd_sample.generate(tmp_path / "b", frames_per_class=2, image_scale=0.08, seed=1, progress=False,
                                classes=("office",))
    c = sunrgbd_sample.generate(tmp_path / "c", frames_per_class=2, image_scale=0.08, seed=2, progress=False,
                                classes=("office",))
    assert tree_digest(a) == tree_digest(b) != tree_digest(c)


def test_sample_classes_differ_in_layout():
    """Each class furnishes its room differently: the renders of the same seed differ, and each
    layout places furniture (more triangles than the 6-box shell)."""
    templates = sunrgbd_sample._unit_templates()
    sizes = {}
    for i, c in enumerate(CLASSES):
        b, *_ = sunrgbd_sample.build_room(c, np.random.default_rng([0, i, 0]), templates)
        sizes[c] = len(b.mesh()[1])
    assert all(n > 6 * 12 for n in sizes.values())


def test_sample_download_writes_manifest_and_source(sample_raw):
    manifest = json.loads((sample_raw / sunrgbd.MANIFEST).read_text())
    source = json.loads((sample_raw / sunrgbd.SOURCE).read_text())
    assert source["root"] == "SUNRGBD" and source["params"]["frames_per_class"] == 10
    root = sample_raw / "SUNRGBD"
    assert len([k for k in manifest if k.endswith("scene.txt")]) == 100
    some = next(k for k in manifest if k.endswith(".jpg"))
    assert manifest[some] == hashlib.sha256((root / some).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- prepare

def test_prepared_layout_and_attrs(prepared):
    attrs = read_attrs(prepared)
    assert attrs["task"] == "classification" and attrs["class_names"] == list(CLASSES)
    assert attrs["modalities"] == ["rgb", "depth", "hha", "rgb_depth"]
    assert (attrs["teacher_modality"], attrs["student_modality"]) == ("rgb", "depth")
    assert attrs["ignore_index"] is None and attrs["source_checksum"].startswith("sha256:")
    assert attrs["seed_roots"] == ["split_0", "split_1", "split_2"] and attrs["split_seeds"] == [0, 1, 2]
    assert attrs["channel_splits"]["rgb_depth"] == [3, 1]
    assert attrs["class_counts"] == {c: 10 for c in CLASSES}
    with h5py.File(prepared, "r") as f:
        assert sorted(f) == ["meta", "split_0", "split_1", "split_2"]
        for k in range(3):
            assert sorted(f[f"split_{k}"]) == ["test", "train", "val"]
            for split in ("train", "val", "test"):
                g = f[f"split_{k}/{split}"]
                assert sorted(g) == ["depth", "frame_index", "hha", "labels", "rgb", "rgb_depth"]
                n = len(g["labels"])
                assert g["rgb"].shape == (n, 3, 16, 16) and g["depth"].shape == (n, 1, 16, 16)
                assert g["hha"].shape == (n, 3, 16, 16) and g["rgb_depth"].shape == (n, 4, 16, 16)
                assert g["rgb"].dtype == np.float32 and g["labels"].dtype == np.int64


def test_prepared_splits_are_stratified_70_10_20_per_seed(prepared):
    parts_by_seed = []
    for k in range(3):
        parts = {}
        for split, per_class in (("train", 7), ("val", 1), ("test", 2)):
            data = PreparedSplit(prepared, split, root=f"split_{k}").load(["labels", "frame_index"])
            assert np.bincount(data["labels"], minlength=10).tolist() == [per_class] * 10
            parts[split] = data["frame_index"]
        everything = np.concatenate(list(parts.values()))
        assert sorted(everything.tolist()) == list(range(100))  # a partition of all frames
        parts_by_seed.append(parts)
    assert not np.array_equal(parts_by_seed[0]["test"], parts_by_seed[1]["test"])


def test_prepared_rows_trace_back_to_their_frames(prepared, sample_raw):
    with h5py.File(prepared, "r") as f:
        relpaths = [p.decode() for p in f["meta/frames/relpath"][()]]
    data = PreparedSplit(prepared, "val", root="split_1").load(["labels", "frame_index", "depth"])
    attrs = read_attrs(prepared)
    stats = attrs["normalization"]["split_1"]["depth"]
    root = sample_raw / "SUNRGBD"
    for label, idx, depth in zip(data["labels"], data["frame_index"], data["depth"]):
        frame = root / relpaths[idx]
        assert (frame / "scene.txt").read_text() == CLASSES[label]
        # The stored depth is the frame's decoded depth, resized (nearest), / 8 m, standardised.
        png = next((frame / "depth").glob("*.png"))
        metres = sunrgbd.resize_nearest(sunrgbd.read_depth_png(png.read_bytes(), png), (16, 16))
        expected = (metres / 8.0 - stats["mean"][0]) / stats["std"][0]
        np.testing.assert_allclose(depth[0], expected, rtol=1e-5, atol=1e-5)


def test_prepared_standardisation_and_fused_modality(prepared):
    for k in range(3):
        train = PreparedSplit(prepared, "train", root=f"split_{k}").load(["rgb", "depth", "hha", "rgb_depth"])
        for name in ("rgb", "depth", "hha"):
            x = train[name].astype(np.float64)
            np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
            np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, atol=1e-4)
        np.testing.assert_array_equal(train["rgb_depth"], np.concatenate([train["rgb"], train["depth"]], axis=1))


def test_prepare_is_deterministic(prepared, sample_raw, tmp_path):
    again = tmp_path / "again.h5"
    sunrgbd.prepare(sample_cfg(), sample_raw, again, progress=False)
    for k in range(3):
        a = PreparedSplit(prepared, "test", root=f"split_{k}").load(["rgb", "hha", "labels"])
        b = PreparedSplit(again, "test", root=f"split_{k}").load(["rgb", "hha", "labels"])
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert read_attrs(again)["source_checksum"] == read_attrs(prepared)["source_checksum"]


def test_prepare_mm_variant_writes_fused_teacher_modality(sample_raw, tmp_path):
    out = tmp_path / "mm.h5"
    sunrgbd.prepare(sample_cfg(teacher_modality="rgb_depth", extra_modalities=[], split_seeds=[4]), sample_raw,
                    out, progress=False)
    attrs = read_attrs(out)
    assert attrs["modalities"] == ["rgb_depth", "depth"] and attrs["teacher_modality"] == "rgb_depth"
    split = PreparedSplit(out, "train", root="split_0")
    assert split.names == ["depth", "frame_index", "labels", "rgb_depth"]
    assert split.shapes["rgb_depth"][1:] == (4, 16, 16)


# ----------------------------------------------------------------------------- bad input in prepare

def _first_frame(raw: Path) -> Path:
    return sorted((raw / "SUNRGBD" / "kv2" / "kinect2data").iterdir())[0]


def test_prepare_wrong_depth_dtype_names_the_file(sample_raw, tmp_path):
    raw = copy_raw(sample_raw, tmp_path)
    png = next((_first_frame(raw) / "depth").glob("*.png"))
    png.write_bytes(png_bytes(np.zeros((53, 73), np.uint8)))
    (raw / sunrgbd.MANIFEST).unlink()  # else the manifest catches the changed file first
    out = tmp_path / "out" / "x.h5"
    out.parent.mkdir()
    with pytest.raises(DataFormatError, match="16-bit") as err:
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert str(png) in str(err.value)
    assert_nothing_written(out)


def test_prepare_corrupt_image_names_the_file(sample_raw, tmp_path):
    raw = copy_raw(sample_raw, tmp_path)
    jpg = next((_first_frame(raw) / "image").glob("*.jpg"))
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # truncated
    (raw / sunrgbd.MANIFEST).unlink()  # without a manifest the decoder itself must catch it
    out = tmp_path / "out" / "x.h5"
    out.parent.mkdir()
    with pytest.raises(DataFormatError, match="corrupt or unreadable image") as err:
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert str(jpg) in str(err.value)
    assert_nothing_written(out)


def test_prepare_checksum_mismatch_names_the_file(sample_raw, tmp_path):
    raw = copy_raw(sample_raw, tmp_path)
    intr = _first_frame(raw) / "intrinsics.txt"
    intr.write_text(intr.read_text().replace("0.000000", "0.0", 1))  # same matrix, other bytes
    out = tmp_path / "out" / "x.h5"
    out.parent.mkdir()
    with pytest.raises(ChecksumError, match="differs from the download manifest") as err:
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert str(intr) in str(err.value)
    assert_nothing_written(out)
    shutil.copy(_first_frame(sample_raw) / "intrinsics.txt", intr)
    scene = sorted((raw / "SUNRGBD" / "kv2" / "align_kv2").iterdir())[0] / "scene.txt"
    scene.write_text(scene.read_text() + "\n")  # the label parses the same; the bytes differ
    with pytest.raises(ChecksumError, match="scene.txt"):
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert_nothing_written(out)


def test_prepare_missing_depth_and_unknown_scene(sample_raw, tmp_path):
    raw = copy_raw(sample_raw, tmp_path)
    frame = _first_frame(raw)
    jpg = next((frame / "image").glob("*.jpg"))
    shutil.rmtree(frame / "depth")
    out = tmp_path / "out" / "x.h5"
    out.parent.mkdir()
    with pytest.raises(DataFormatError, match="no depth image") as err:
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert str(jpg) in str(err.value)
    shutil.copytree(_first_frame(sample_raw) / "depth", frame / "depth")
    (raw / sunrgbd.MANIFEST).unlink()  # else the manifest catches the changed label first
    (frame / "scene.txt").write_text("spaceship")  # well-formed, but the sample holds only the ten classes
    with pytest.raises(DataFormatError, match="unknown scene label 'spaceship'"):
        sunrgbd.prepare(sample_cfg(), raw, out, progress=False)
    assert_nothing_written(out)


def test_prepare_registers_depth_of_another_size(sample_raw, tmp_path, caplog):
    raw = copy_raw(sample_raw, tmp_path)
    (raw / sunrgbd.MANIFEST).unlink()
    png = next((_first_frame(raw) / "depth").glob("*.png"))
    small = sunrgbd.encode_depth(np.full((20, 30), 2.0))
    png.write_bytes(png_bytes(small))
    out = tmp_path / "x.h5"
    with caplog.at_level(logging.INFO, logger="cmkd.data.sunrgbd"):
        sunrgbd.prepare(sample_cfg(split_seeds=[0]), raw, out, progress=False)
    assert any("differed in size" in r.getMessage() for r in caplog.records)
    assert out.exists()


def test_prepare_without_tree_or_with_too_few_frames(tmp_path):
    with pytest.raises(DataFormatError, match="no SUN RGB-D tree"):
        sunrgbd.prepare(sample_cfg(), tmp_path, tmp_path / "x.h5", progress=False)
    fake_tree(tmp_path)
    with pytest.raises(DataFormatError, match="too few kv2 frames"):
        sunrgbd.prepare({**sample_cfg(), "other_scenes": "skip"}, tmp_path, tmp_path / "x.h5", progress=False)
    assert_nothing_written(tmp_path / "x.h5")


def test_download_checksum_mismatch_names_the_archive(tmp_path):
    pytest.importorskip("cmkd.data.download", reason="cmkd.data.download lands with the SemanticKITTI work")
    archive = tmp_path / "SUNRGBD.zip"
    import zipfile

    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SUNRGBD/kv2/kinect2data/f1/scene.txt", "office")
    cfg = {"sources": [{"path": str(archive), "sha256": "0" * 64}], "teacher_modality": "rgb",
           "student_modality": "depth"}
    with pytest.raises(ChecksumError) as err:
        sunrgbd.download(cfg, tmp_path / "raw", progress=False)
    assert "SUNRGBD.zip" in str(err.value)
    assert not (tmp_path / "raw" / sunrgbd.MANIFEST).exists()


def test_download_from_archive_or_folder_then_prepare(tmp_path):
    download = pytest.importorskip("cmkd.data.download", reason="cmkd.data.download lands with the SemanticKITTI work")
    src = tmp_path / "src"
    sunrgbd_sample.generate(src, frames_per_class=10, image_scale=0.08, seed=5, progress=False)
    archive = Path(shutil.make_archive(str(tmp_path / "SUNRGBD"), "zip", src))
    base = {k: v for k, v in sample_cfg(split_seeds=[0], extra_modalities=[]).items() if k != "sample"}
    checksums = []
    for name, source in (("zip", {"path": str(archive), "sha256": download.sha256_file(archive)}),
                         ("dir", {"path": str(src)})):
        cfg = {**base, "sources": [source]}
        sunrgbd.download(cfg, tmp_path / f"raw_{name}", progress=False)
        sunrgbd.prepare(cfg, tmp_path / f"raw_{name}", tmp_path / f"{name}.h5", progress=False)
        checksums.append(read_attrs(tmp_path / f"{name}.h5")["source_checksum"])
    assert not (tmp_path / "raw_dir" / "SUNRGBD").exists()  # an extracted folder is read in place
    assert checksums[0] == checksums[1]


# ----------------------------------------------------------------------------- config

def test_params_entries_validate_and_build():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    names = [n for n in params["data"] if n.startswith("sunrgbd")]
    assert sorted(names) == ["sunrgbd", "sunrgbd-mm", "sunrgbd-mm-rgb", "sunrgbd-sample", "sunrgbd-sample-mm",
                             "sunrgbd-sample-mm-rgb"]
    from cmkd.data.registry import dataset_module

    for name in names:
        cfg = params["data"][name]
        dataset_module(name).validate(cfg, f"data.{name}")
        size = cfg["image_size"]
        channels = {m: sum(sunrgbd.BASE_CHANNELS[p] for p in sunrgbd.modality_parts(m))
                    for m in sunrgbd.written_modalities(cfg)}
        for role in ("teacher", "student"):
            in_shape = (channels[cfg[f"{role}_modality"]], size, size)
            if "sample" in name:
                model = build_model(params["models"][name][role], in_shape, 10)
                assert model(torch.zeros((2,) + in_shape)).shape == (2, 10)
            else:
                with torch.device("meta"):  # full-size networks: check they build, allocate nothing
                    build_model(params["models"][name][role], in_shape, 10)
        train = params["train"][name]["teacher"]
        if "sample" not in name:
            assert (train["epochs"], train["batch_size"], train["lr"], train["optimizer"],
                    train["augment"]) == (300, 128, 1e-4, "adam", "flip_rot90")


@pytest.mark.parametrize("key, value, match", [
    ("teacher_modality", "lidar", "teacher_modality"),
    ("extra_modalities", ["rgb_rgb"], r"extra_modalities\[0\]"),
    ("split", [0.7, 0.3], "split"),
    ("split_seeds", [1, 1], "split_seeds"),
    ("other_scenes", "keep", "other_scenes"),
    ("depth_dir", "depth_raw", "depth_dir"),
    ("kv2_dirs", ["kv1"], "kv2_dirs"),
    ("image_size", 4, "image_size"),
    ("sample", {"frames_per_class": 3}, r"sample\.frames_per_class"),
    ("sample", {"speed": 3}, r"sample\.speed"),
])
def test_validate_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=rf"data\.x\.{match}"):
        sunrgbd.validate({**sample_cfg(), key: value}, "data.x")


def test_validate_real_dataset_needs_sources():
    cfg = {k: v for k, v in sample_cfg().items() if k != "sample"}
    with pytest.raises(ConfigError, match=r"data\.sunrgbd\.sources"):
        sunrgbd.validate(cfg, "data.sunrgbd")
    sunrgbd.validate({**cfg, "sources": [{"path": "/data/SUNRGBD.zip"}]}, "data.sunrgbd")


# ----------------------------------------------------------------------------- the fusion teacher

def test_fusion_resnet18_adds_branch_features():
    torch.manual_seed(0)
    model = build_model({"arch": "fusion_resnet18", "split": [3, 1], "width": 8, "small_input": True}, (4, 16, 16), 10)
    model.eval()
    x = torch.randn(5, 4, 16, 16)
    with torch.no_grad():
        by_hand = model.branches[0].features(x[:, :3]) + model.branches[1].features(x[:, 3:])
        np.testing.assert_allclose(model.features(x), by_hand, atol=1e-6)
        np.testing.assert_allclose(model(x), model.head(by_hand), atol=1e-6)
        pooled = model.feature_maps(x).mean(dim=(2, 3))
        np.testing.assert_allclose(pooled, by_hand, atol=1e-5)
    assert model.branches[0].stem[0].in_channels == 3 and model.branches[1].stem[0].in_channels == 1
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter is used (DDP-safe)"


def test_fusion_resnet18_config_errors():
    with pytest.raises(ConfigError, match="split"):
        build_model({"arch": "fusion_resnet18", "split": [3, 2]}, (4, 16, 16), 10)
    with pytest.raises(ConfigError, match="split"):
        build_model({"arch": "fusion_resnet18"}, (4, 16, 16), 10)


@pytest.mark.slow
def test_default_sample_params_download_and_prepare(tmp_path):
    """The shipped sample entries, as `dvc repro` runs them: render, prepare, check the layout."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("sunrgbd-sample", "sunrgbd-sample-mm"):
        cfg = params["data"][name]
        sunrgbd.validate(cfg, f"data.{name}")
        sunrgbd.download(cfg, tmp_path / name / "raw", progress=False)
        out = tmp_path / name / "prepared.h5"
        sunrgbd.prepare(cfg, tmp_path / name / "raw", out, progress=False)
        attrs = read_attrs(out)
        assert (attrs["teacher_modality"] == cfg["teacher_modality"]
                and attrs["seed_roots"] == [f"split_{k}" for k in range(5)])
        for k in range(5):
            sizes = [len(PreparedSplit(out, s, root=f"split_{k}")) for s in ("train", "val", "test")]
            assert sizes == [105, 15, 30]
