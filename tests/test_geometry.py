"""cmkd.data.geometry against values computed by hand (or by plain loops) in the tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmkd.data.geometry import lidar_image, nearest_per_pixel, project_to_image, range_projection

# A calibration whose products are exact in binary floating point, so the image border can be
# tested at exactly u = W - 0.5 and u = W. Tr is the usual velodyne -> camera axis swap plus a
# translation; P2 = K [I | t] with t = 0.
FX = FY = 64.0
CX, CY = 50.0, 25.0
TR = np.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
P2 = np.array([[FX, 0.0, CX, 0.0], [0.0, FY, CY, 0.0], [0.0, 0.0, 1.0, 0.0]])


def by_hand(x: float, y: float, z: float) -> tuple[float, float, float]:
    """Camera x = -y, camera y = -z, depth = x; u = (FX * xc + CX * d) / d."""
    xc, yc, d = -y, -z, x
    return (FX * xc + CX * d) / d, (FY * yc + CY * d) / d, d


def test_projection_matches_hand_values_and_borders():
    points = np.array([
        [16.0, 0.0, 0.0, 0.1],       # centre: u = 50, v = 25
        [16.0, -12.375, 0.0, 0.2],   # u = 99.5  -> kept
        [16.0, -12.5, 0.0, 0.3],     # u = 100 = W -> dropped
        [16.0, 12.5, 0.0, 0.4],      # u = 0 -> kept
        [16.0, 12.5000001, 0.0, 0.5],  # u just below 0 -> dropped
        [16.0, 0.0, -6.1875, 0.6],   # v = 49.75 -> kept
        [16.0, 0.0, -6.25, 0.7],     # v = 50 = H -> dropped
        [-16.0, 0.0, 0.0, 0.8],      # behind the camera -> dropped
        [0.0, 1.0, 1.0, 0.9],        # depth 0 -> dropped
        [4.0, 1.0, 1.0, 1.0],        # u = 34, v = 9
    ])
    width, height = 100, 50
    uv, depth, index = project_to_image(points, P2, TR, width, height)
    expected = [i for i, p in enumerate(points)
                if p[0] > 0 and 0 <= by_hand(*p[:3])[0] < width and 0 <= by_hand(*p[:3])[1] < height]
    assert expected == [0, 1, 3, 5, 9]
    assert index.tolist() == expected
    for row, i in enumerate(index):
        u, v, d = by_hand(*points[i, :3])
        assert uv[row].tolist() == [u, v]
        assert depth[row] == d
    assert uv[1, 0] == 99.5 and uv[2, 0] == 0.0 and uv[3, 1] == 49.75
    assert uv[4].tolist() == [34.0, 9.0]


def test_projection_with_a_different_image_size_keeps_fewer_points():
    ys = np.linspace(-12.4, 12.4, 50)
    points = np.column_stack([np.full_like(ys, 16.0), ys, np.zeros_like(ys), np.zeros_like(ys)])
    _, _, big = project_to_image(points, P2, TR, 100, 50)
    uv_small, _, small = project_to_image(points, P2, TR, 80, 40)
    u = 50.0 - 4.0 * ys  # by hand
    assert big.tolist() == np.flatnonzero((u >= 0) & (u < 100)).tolist()
    assert small.tolist() == np.flatnonzero((u >= 0) & (u < 80)).tolist()
    assert len(small) < len(big)
    assert (uv_small[:, 0] < 80).all()


def test_projection_with_kitti_calibration_and_translation():
    # KITTI sequence 00's calibration; reference computed point by point with explicit sums.
    from cmkd.data.samples.semantickitti import KITTI_CALIB

    P = np.array(KITTI_CALIB[(1241, 376)]["P2"]).reshape(3, 4)
    T = np.vstack([np.array(KITTI_CALIB[(1241, 376)]["Tr"]).reshape(3, 4), [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    points = np.column_stack([rng.uniform(-30, 60, 400), rng.uniform(-30, 30, 400), rng.uniform(-3, 3, 400),
                              rng.random(400)])
    uv, depth, index = project_to_image(points, P, T, 1241, 376)
    ref = []
    for i, (x, y, z, _) in enumerate(points):
        cam = [sum(T[r][c] * v for c, v in enumerate((x, y, z, 1.0))) for r in range(3)] + [1.0]
        img = [sum(P[r][c] * cam[c] for c in range(4)) for r in range(3)]
        if img[2] > 0 and 0 <= img[0] / img[2] < 1241 and 0 <= img[1] / img[2] < 376:
            ref.append((i, img[0] / img[2], img[1] / img[2], img[2]))
    assert index.tolist() == [r[0] for r in ref]
    np.testing.assert_allclose(uv, [[r[1], r[2]] for r in ref], rtol=0, atol=1e-9)
    np.testing.assert_allclose(depth, [r[3] for r in ref], rtol=0, atol=1e-12)
    assert 20 < len(ref) < 400  # some in view, some not


def test_nearest_per_pixel_takes_smallest_distance_and_first_on_ties():
    pixel = np.array([3, 1, 3, 3, 1, 7])
    dist = np.array([5.0, 2.0, 1.0, 1.0, 9.0, 4.0])
    win = nearest_per_pixel(pixel, dist)
    assert sorted(win.tolist()) == [1, 2, 5]


def test_range_projection_positions_and_nearest_wins():
    H, W = 64, 1024
    pts = np.array([
        [10.0, 0.0, 0.0, 0.0],    # ahead, elevation 0
        [5.0, 0.0, 0.0, 0.0],     # same pixel, nearer: wins
        [0.0, 10.0, 0.0, 0.0],    # left
        [0.0, -10.0, 0.0, 0.0],   # right
        [-10.0, 0.01, 0.0, 0.0],  # behind (just left of the seam)
        [10.0, 0.0, 10.0, 0.0],   # 45 degrees up: above the FOV, clamped to row 0
        [10.0, 0.0, -10.0 * math.tan(math.radians(24.9)), 0.0],  # near the bottom of the FOV
        [0.0, 0.0, 0.0, 0.0],     # range 0: dropped
    ])

    def pixel(x, y, z):
        r = math.sqrt(x * x + y * y + z * z)
        yaw, pitch = -math.atan2(y, x), math.asin(z / r)
        col = math.floor(0.5 * (yaw / math.pi + 1.0) * W)
        row = math.floor((1.0 - (pitch + math.radians(25.0)) / math.radians(28.0)) * H)
        return min(max(row, 0), H - 1), min(max(col, 0), W - 1)

    rng_img, idx = range_projection(pts)
    assert rng_img.shape == (H, W) and idx.shape == (H, W)
    expected = {}
    for i, p in enumerate(pts[:-1]):
        rc = pixel(*p[:3])
        r = float(np.linalg.norm(p[:3]))
        if rc not in expected or r < expected[rc][1]:
            expected[rc] = (i, r)
    assert pixel(10, 0, 0) == (6, 512) and pixel(0, 10, 0)[1] == 256 and pixel(0, -10, 0)[1] == 768
    assert pixel(10, 0, 10)[0] == 0 and pixel(-10, 0.01, 0)[1] == 0
    filled = {tuple(rc) for rc in np.argwhere(idx >= 0)}
    assert filled == set(expected)
    for rc, (i, r) in expected.items():
        assert idx[rc] == i
        assert rng_img[rc] == pytest.approx(r, rel=1e-6)
    assert idx[6, 512] == 1 and rng_img[6, 512] == pytest.approx(5.0)
    assert (rng_img[idx < 0] == -1).all()


def test_lidar_image_nearest_point_label_and_channels():
    width, height = 100, 50
    pts = np.array([
        [16.0, 0.0, 0.0, 0.25],    # pixel (25, 50), depth 16
        [8.0, 0.0, 0.0, 0.75],     # same pixel (25, 50), depth 8: nearer, wins
        [16.0, -4.0, 0.0, 0.5],    # u = 66 -> pixel (25, 66)
        [-5.0, 0.0, 0.0, 0.9],     # behind
    ])
    labels = np.array([3, 7, 11, 2], np.int16)
    image, label_map, valid = lidar_image(pts, P2, TR, width, height, labels=labels)
    assert image.shape == (5, height, width) and label_map.shape == (height, width)
    assert sorted(map(tuple, np.argwhere(valid))) == [(25, 50), (25, 66)]
    assert label_map[25, 50] == 7 and label_map[25, 66] == 11
    assert (label_map[~valid] == -1).all() and (image[:, ~valid] == 0).all()
    np.testing.assert_allclose(image[:, 25, 50], [8.0, 8.0, 0.0, 0.0, 0.75])
    np.testing.assert_allclose(image[:, 25, 66], [math.hypot(16, 4), 16.0, -4.0, 0.0, 0.5], rtol=1e-6)

    # A crop window shifts pixels by (top, left) and drops points outside it.
    cropped, cropped_labels, cropped_valid = lidar_image(pts, P2, TR, width, height, labels=labels,
                                                         box=(20, 45, 10, 10))
    assert cropped.shape == (5, 10, 10)
    assert sorted(map(tuple, np.argwhere(cropped_valid))) == [(5, 5)]
    assert cropped_labels[5, 5] == 7

    # Extra per-point channels follow the winning point.
    extra = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
    with_extra, _, _ = lidar_image(pts, P2, TR, width, height, extra=extra)
    assert with_extra.shape == (8, height, width)
    assert with_extra[5:, 25, 50].tolist() == [0.0, 1.0, 0.0]

    # A float16 image holds the float32 values rounded once, zeros elsewhere.
    half, _, _ = lidar_image(pts, P2, TR, width, height, extra=extra, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, with_extra.astype(np.float16))

    # `out` fills given arrays (any contents before) with exactly the same values.
    out = (np.full((8, 10, 10), 7, np.float16), np.full((10, 10), 9, np.int8), np.full((10, 10), 5, np.uint8))
    filled = lidar_image(pts, P2, TR, width, height, labels=labels, extra=extra, box=(20, 45, 10, 10),
                         dtype=np.float16, out=out)
    assert all(a is b for a, b in zip(filled, out))
    expected = lidar_image(pts, P2, TR, width, height, labels=labels, extra=extra, box=(20, 45, 10, 10),
                           dtype=np.float16)
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(got, want)


def test_lidar_image_matches_a_plain_loop_reference():
    # Many random points, several per pixel: the reference paints far-to-near in a loop.
    rng = np.random.default_rng(1)
    n = 3000
    pts = np.column_stack([rng.uniform(-5, 40, n), rng.uniform(-20, 20, n), rng.uniform(-3, 3, n), rng.random(n)])
    pts[:500, :3] = pts[500:1000, :3] * 1.5  # same rays, farther: must lose
    labels = rng.integers(-1, 19, n).astype(np.int16)
    width, height = 40, 20
    _, label_map, valid = lidar_image(pts, P2 / [[4], [4], [1]], TR, width, height, labels=labels)
    ref = np.full((height, width), -1, np.int16)
    best = np.full((height, width), np.inf)
    Pn = P2 / [[4], [4], [1]]
    for (x, y, z, _), lab in zip(pts, labels):
        xc, yc, d = -y, -z, x
        if d <= 0:
            continue
        u, v = (Pn[0, 0] * xc + Pn[0, 2] * d) / d, (Pn[1, 1] * yc + Pn[1, 2] * d) / d
        if 0 <= u < width and 0 <= v < height:
            r, c = int(math.floor(v)), int(math.floor(u))
            if d < best[r, c]:
                best[r, c], ref[r, c] = d, lab
    assert (valid == np.isfinite(best)).all()
    assert (label_map == ref).all()
    assert valid.sum() > 100
