"""`semantickitti-sample`: a procedural street scene in SemanticKITTI's exact file layout.

Nothing is downloaded: `download` builds a street (road with lane markings, sidewalks,
parking lots, terrain, buildings, fences, trees, bushes, poles with traffic signs, parked
and moving cars, a truck, a bus, people, bicycles, a bicyclist, bins) out of meshes, each tagged
with a raw SemanticKITTI label id, and ray-casts it with Open3D's `RaycastingScene`:

* a 64-beam LiDAR (elevations +2 to -24.8 degrees like the HDL-64E, `lidar_width` azimuth
  steps over 360 degrees, 80 m range) gives `velodyne/*.bin` (x, y, z, remission) and
  `labels/*.label` (semantic id | instance id << 16) from the geometry id each ray hits;
* a pinhole camera with KITTI's calibration (P2, Tr of the sequences with that image size,
  scaled by `image_scale`) gives `image_2/*.png`: the hit surface's colour times a Lambert
  term from its normal plus ambient light, a shadow ray towards the sun, sky where nothing
  is hit, and sensor noise.

Sequences have their own image size (e.g. 00 at 1241x376, 08 at 1226x370) and scene; frames
follow a trajectory along the street. Everything is deterministic for a seed. `prepare` is
the real SemanticKITTI reader path (cmkd.data.datasets.semantickitti.prepare) run on these files.

Colours: `palette: natural` (default) gives plausible surface colours (grey road and
sidewalk, green vegetation, random car paint, ...) with per-object jitter, so the camera has
to use shape and context as on real images; `palette: label` paints every surface with its
class colour from semantic-kitti.yaml: the camera's trace of the class, which params.yaml's sample
uses (with natural colours its camera teacher stayed below the LiDAR student; issue 26).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from cmkd.data.registry import register_dataset
from cmkd.utils.atomic import atomic_dir, write_json
from cmkd.data.datasets import semantickitti
from cmkd.data.download import fetch
from cmkd.errors import ConfigError

KEY = "data.semantickitti-sample"

# KITTI odometry calibrations (left colour camera P2 and velodyne -> camera Tr), by image size.
KITTI_CALIB: dict[tuple[int, int], dict[str, list[float]]] = {
    (1241, 376): {  # sequences 00-02
        "P2": [718.856, 0.0, 607.1928, 45.38225, 0.0, 718.856, 185.2157, -0.1130887, 0.0, 0.0, 1.0, 0.003779761],
        "Tr": [4.276802e-04, -9.999672e-01, -8.084492e-03, -1.198460e-02,
               -7.210627e-03, 8.081198e-03, -9.999413e-01, -5.403985e-02,
               9.999739e-01, 4.859486e-04, -7.206934e-03, -2.921969e-01],
    },
    (1242, 375): {  # sequence 03
        "P2": [721.5377, 0.0, 609.5593, 44.85728, 0.0, 721.5377, 172.854, 0.2163791, 0.0, 0.0, 1.0, 0.002745884],
        "Tr": [2.347737e-04, -9.999442e-01, -1.056348e-02, -2.796817e-03,
               1.044941e-02, 1.056535e-02, -9.998896e-01, -7.510879e-02,
               9.999454e-01, 1.243654e-04, 1.045130e-02, -2.721328e-01],
    },
    (1226, 370): {  # sequences 04-12
        "P2": [707.0912, 0.0, 601.8873, 46.88783, 0.0, 707.0912, 183.1104, 0.1178601, 0.0, 0.0, 1.0, 0.006203223],
        "Tr": [-1.857739e-03, -9.999660e-01, -8.039975e-03, -4.784030e-03,
               -6.481466e-03, 8.051860e-03, -9.999466e-01, -7.337429e-02,
               9.999773e-01, -1.805529e-03, -6.496204e-03, -3.339968e-01],
    },
}

SENSOR_HEIGHT = 1.73
MAX_RANGE = 80.0
MIN_RANGE = 2.0
BEAM_ELEVATIONS = (2.0, -24.8)

# Surface reflectivity (remission) per raw label; unknown labels use 0.3.
REFLECTIVITY = {40: 0.22, 60: 0.75, 44: 0.25, 48: 0.32, 49: 0.3, 50: 0.3, 51: 0.35, 52: 0.3, 70: 0.45,
                71: 0.35, 72: 0.42, 80: 0.4, 81: 0.92, 10: 0.15, 252: 0.15, 18: 0.2, 13: 0.2, 30: 0.3,
                254: 0.3, 11: 0.25, 31: 0.3, 253: 0.3, 15: 0.2, 99: 0.3}

# "natural" colours (RGB in [0, 1]); a list means one is drawn per object.
NATURAL_COLOURS: dict[int, Any] = {
    40: (0.33, 0.33, 0.35), 60: (0.88, 0.88, 0.84), 44: (0.42, 0.40, 0.40), 48: (0.60, 0.58, 0.56),
    49: (0.55, 0.50, 0.42), 50: [(0.76, 0.70, 0.60), (0.60, 0.33, 0.26), (0.55, 0.55, 0.58), (0.85, 0.84, 0.80)],
    51: (0.50, 0.45, 0.38), 52: (0.50, 0.50, 0.55), 70: [(0.20, 0.45, 0.15), (0.25, 0.40, 0.12), (0.15, 0.35, 0.18)],
    71: (0.35, 0.25, 0.15), 72: (0.45, 0.50, 0.25), 80: (0.45, 0.45, 0.48), 81: [(0.80, 0.10, 0.10), (0.10, 0.25, 0.75)],
    10: [(0.7, 0.1, 0.1), (0.1, 0.2, 0.6), (0.08, 0.08, 0.08), (0.9, 0.9, 0.9), (0.6, 0.6, 0.62), (0.1, 0.35, 0.2)],
    18: [(0.9, 0.9, 0.88), (0.9, 0.5, 0.1)], 13: (0.9, 0.75, 0.1),
    30: [(0.2, 0.2, 0.5), (0.5, 0.1, 0.1), (0.1, 0.1, 0.1), (0.6, 0.55, 0.4)],
    11: (0.12, 0.12, 0.14), 31: [(0.9, 0.4, 0.1), (0.1, 0.5, 0.8)], 15: (0.3, 0.05, 0.05), 99: (0.2, 0.35, 0.2),
}
NATURAL_COLOURS[252] = NATURAL_COLOURS[10]
NATURAL_COLOURS[254] = NATURAL_COLOURS[30]
NATURAL_COLOURS[253] = NATURAL_COLOURS[31]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "sequences": [{"sequence": 0, "frames": 24, "image_size": [1241, 376]},
                  {"sequence": 8, "frames": 8, "image_size": [1226, 370]}],
    "image_scale": 0.25,
    "lidar_beams": 64,
    "lidar_width": 1024,
    "frame_spacing": 1.5,
    "palette": "natural",
    "range_noise": 0.01,
    "pixel_noise": 0.02,
}


# --------------------------------------------------------------------------- meshes

@dataclass
class Mesh:
    label: int           # raw SemanticKITTI id
    instance: int        # 0 for "stuff"
    colour: np.ndarray   # RGB in [0, 1]
    vertices: np.ndarray  # float32 [V, 3]
    triangles: np.ndarray  # uint32 [T, 3]


_BOX_TRIANGLES = np.array([
    [0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4],
    [1, 2, 6], [1, 6, 5], [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7],
], np.uint32)


def box(cx: float, cy: float, z0: float, length: float, width: float, height: float, yaw: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A box standing on z0, centred at (cx, cy), `length` along its heading `yaw`."""
    hx, hy = length / 2, width / 2
    corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    c, s = np.cos(yaw), np.sin(yaw)
    xy = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
    bottom = np.column_stack([xy, np.full(4, z0)])
    top = np.column_stack([xy, np.full(4, z0 + height)])
    return np.vstack([bottom, top]).astype(np.float32), _BOX_TRIANGLES


@functools.lru_cache(maxsize=None)
def _unit_mesh(kind: str) -> tuple[np.ndarray, np.ndarray]:
    import open3d as o3d

    if kind == "cylinder":  # radius 1, height 1, base at z = 0
        m = o3d.geometry.TriangleMesh.create_cylinder(radius=1.0, height=1.0, resolution=12, split=1)
        v = np.asarray(m.vertices) + [0.0, 0.0, 0.5]
    else:  # sphere of radius 1 at the origin
        m = o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=8)
        v = np.asarray(m.vertices)
    return v.astype(np.float32), np.asarray(m.triangles, np.uint32)


def cylinder(x: float, y: float, z0: float, radius: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    v, t = _unit_mesh("cylinder")
    return (v * [radius, radius, height] + [x, y, z0]).astype(np.float32), t


def ellipsoid(x: float, y: float, z: float, rx: float, ry: float, rz: float) -> tuple[np.ndarray, np.ndarray]:
    v, t = _unit_mesh("sphere")
    return (v * [rx, ry, rz] + [x, y, z]).astype(np.float32), t


# --------------------------------------------------------------------------- the street

class Street:
    """A street along +x: road y in [-4, 4] (ego in the right lane at y = -2), sidewalks out to
    +-7, then terrain / parking lots, then fences and buildings from |y| = 12."""

    def __init__(self, rng: np.random.Generator, x_min: float, x_max: float, palette: str):
        self.rng = rng
        self.palette = palette
        self.meshes: list[Mesh] = []
        self.next_instance = 1
        self._build(x_min, x_max)
        self._plan_dynamic(x_min, x_max)

    # -- helpers
    def colour(self, label: int) -> np.ndarray:
        if self.palette == "label":
            b, g, r = semantickitti.COLOR_MAP_BGR[label]
            return np.array([r, g, b], np.float64) / 255.0
        choice = NATURAL_COLOURS.get(label, (0.5, 0.5, 0.5))
        if isinstance(choice, list):
            choice = choice[self.rng.integers(len(choice))]
        jitter = self.rng.normal(0.0, 0.04, 3)
        return np.clip(np.asarray(choice) + jitter, 0.0, 1.0)

    def add(self, label: int, geometry: tuple[np.ndarray, np.ndarray], thing: bool = False,
            instance: int | None = None, colour: np.ndarray | None = None, into: list[Mesh] | None = None) -> int:
        if thing and instance is None:
            instance = self.next_instance
            self.next_instance += 1
        (into if into is not None else self.meshes).append(
            Mesh(label, instance or 0, self.colour(label) if colour is None else colour, *geometry))
        return instance or 0

    def car(self, x: float, y: float, yaw: float, label: int = 10, into: list[Mesh] | None = None,
            instance: int | None = None, colour: np.ndarray | None = None,
            size: tuple[float, float] | None = None) -> int:
        colour = self.colour(label) if colour is None else colour
        length, width = size if size is not None else (self.rng.uniform(3.9, 4.7), self.rng.uniform(1.7, 1.9))
        inst = self.add(label, box(x, y, 0.25, length, width, 0.75, yaw), thing=True, instance=instance,
                        colour=colour, into=into)
        c, s = np.cos(yaw), np.sin(yaw)
        self.add(label, box(x - 0.2 * c, y - 0.2 * s, 1.0, length * 0.55, width * 0.9, 0.5, yaw),
                 instance=inst, colour=colour * 0.7, into=into)  # cabin, darker glass
        for dx in (-0.32, 0.32):  # wheels, as dark boxes
            self.add(label, box(x + dx * length * c, y + dx * length * s, 0.0, 0.7, width + 0.05, 0.3, yaw),
                     instance=inst, colour=np.array([0.05, 0.05, 0.05]), into=into)
        return inst

    def person(self, x: float, y: float, label: int = 30, into: list[Mesh] | None = None,
               instance: int | None = None, colour: np.ndarray | None = None) -> int:
        colour = self.colour(label) if colour is None else colour
        inst = self.add(label, box(x, y, 0.0, 0.3, 0.45, 0.85), thing=True, instance=instance,
                        colour=np.array([0.15, 0.15, 0.2]), into=into)  # legs
        self.add(label, box(x, y, 0.85, 0.3, 0.5, 0.6), instance=inst, colour=colour, into=into)
        self.add(label, ellipsoid(x, y, 1.6, 0.12, 0.12, 0.14), instance=inst,
                 colour=np.array([0.85, 0.65, 0.5]), into=into)
        return inst

    def tree(self, x: float, y: float) -> None:
        h = self.rng.uniform(2.0, 3.5)
        self.add(71, cylinder(x, y, 0.0, self.rng.uniform(0.12, 0.25), h), thing=True)
        r = self.rng.uniform(1.4, 2.6)
        self.add(70, ellipsoid(x, y, h + 0.7 * r, r, r, 0.9 * r))

    # -- static layout
    def _build(self, x0: float, x1: float) -> None:
        rng = self.rng
        length = x1 - x0
        cx = (x0 + x1) / 2
        self.add(40, box(cx, 0.0, -0.3, length, 8.0, 0.3))
        for x in np.arange(x0, x1, 9.0):  # dashed centre line
            self.add(60, box(x + 1.5, 0.0, 0.0, 3.0, 0.15, 0.01))
        for side in (-1, 1):
            self.add(48, box(cx, side * 5.5, -0.3, length, 3.0, 0.45))
            x = x0
            while x < x1:  # the strip between sidewalk and buildings: terrain or a parking lot
                seg = rng.uniform(12.0, 30.0)
                kind = rng.choice(["terrain", "terrain", "parking", "other-ground"])
                label = {"terrain": 72, "parking": 44, "other-ground": 49}[kind]
                self.add(label, box(x + seg / 2, side * 9.5, -0.3, seg, 5.0, 0.33 if label == 72 else 0.31))
                if label == 72:
                    for tx in np.arange(x + 3.0, x + seg - 2.0, rng.uniform(5.0, 9.0)):
                        self.tree(tx, side * rng.uniform(8.5, 10.5))
                elif label == 44:
                    for px in np.arange(x + 3.0, x + seg - 3.0, 5.5):
                        if rng.random() < 0.7:
                            self.car(px, side * 9.5 + rng.normal(0, 0.2), np.pi / 2 + rng.normal(0, 0.05))
                x += seg
            x = x0
            while x < x1:  # buildings with gaps closed by fences and bushes
                seg = rng.uniform(8.0, 25.0)
                if rng.random() < 0.75:
                    depth, height = rng.uniform(8.0, 15.0), rng.uniform(5.0, 18.0)
                    self.add(50, box(x + seg / 2, side * (12.5 + depth / 2), 0.0, seg - 0.5, depth, height), thing=False)
                    if rng.random() < 0.5:
                        self.add(70, box(x + seg / 2, side * 12.3, 0.0, seg * 0.6, 0.6, rng.uniform(0.6, 1.2)))
                else:
                    self.add(51, box(x + seg / 2, side * 12.2, 0.0, seg, 0.08, rng.uniform(1.0, 1.8)))
                    if rng.random() < 0.5:
                        self.add(52, box(x + seg / 2, side * 14.0, 0.0, 3.0, 2.0, 2.5))  # a shed
                x += seg
            for x in np.arange(x0 + rng.uniform(0, 10), x1, rng.uniform(12.0, 20.0)):  # poles, signs
                self.add(80, cylinder(x, side * 4.4, 0.15, 0.08, rng.uniform(4.0, 7.0)), thing=True)
                if rng.random() < 0.5:
                    self.add(81, box(x, side * 4.4, 2.2, 0.05, 0.7, 0.7, 0.0), thing=True)
            for x in np.arange(x0 + rng.uniform(0, 15), x1, rng.uniform(15.0, 30.0)):  # bystanders, bins, bikes
                what = rng.integers(3)
                y = side * rng.uniform(5.0, 6.6)
                if what == 0:
                    self.person(x, y)
                elif what == 1:
                    self.add(99, box(x, y, 0.15, 0.6, 0.6, 1.0), thing=True)
                else:
                    self.add(11, box(x, y, 0.15, 1.7, 0.08, 0.95), thing=True)
        for x in np.arange(x0 + rng.uniform(0, 8), x1, rng.uniform(7.0, 12.0)):  # cars parked at the left curb
            if rng.random() < 0.6:
                self.car(x, 3.1, rng.normal(0, 0.03))
        for label, dims in ((18, (7.5, 2.5, 3.2)), (13, (12.0, 2.6, 3.1)), (15, (2.0, 0.7, 1.2))):
            x = rng.uniform(x0 + 10, x1 - 10)
            self.add(label, box(x, 3.1 if label != 15 else 5.5, 0.15 if label == 15 else 0.0, *dims), thing=True)

    def _plan_dynamic(self, x0: float, x1: float) -> None:
        """Draw everything about the moving objects once, so each looks the same in every frame."""
        rng = self.rng

        def ident(label: int) -> tuple[int, np.ndarray]:
            self.next_instance += 1
            return self.next_instance - 1, self.colour(label)

        car_size = lambda: (rng.uniform(3.9, 4.7), rng.uniform(1.7, 1.9))  # noqa: E731
        # (x at frame 0, metres per frame, identity, colour, size)
        self.oncoming = [(rng.uniform(x0 + 30, x1), rng.uniform(0.6, 1.2), *ident(252), car_size()) for _ in range(3)]
        self.leader = (rng.uniform(12.0, 25.0), *ident(252), car_size())
        self.walkers = [(rng.uniform(x0, x1), rng.choice([-1, 1]) * rng.uniform(5.0, 6.6), rng.uniform(0.1, 0.15),
                         *ident(254)) for _ in range(3)]
        self.cyclist = (rng.uniform(x0 + 20, x1), rng.uniform(0.4, 0.6), *ident(253))

    def dynamic(self, frame: int, ego_x: float) -> list[Mesh]:
        """Moving objects at `frame`: oncoming cars, a car leading the ego, walkers, a cyclist."""
        out: list[Mesh] = []
        for x, v, inst, colour, size in self.oncoming:
            self.car(x - v * frame, 1.9, np.pi, label=252, into=out, instance=inst, colour=colour, size=size)
        gap, inst, colour, size = self.leader
        self.car(ego_x + gap, -2.0, 0.0, label=252, into=out, instance=inst, colour=colour, size=size)
        for x, y, v, inst, colour in self.walkers:
            self.person(x + v * frame, y, label=254, into=out, instance=inst, colour=colour)
        x, v, inst, colour = self.cyclist
        self.add(253, box(x + v * frame, -3.4, 0.0, 1.7, 0.5, 1.0), instance=inst, colour=np.array([0.1, 0.1, 0.1]), into=out)
        self.add(253, box(x + v * frame, -3.4, 1.0, 0.5, 0.45, 0.75), instance=inst, colour=colour, into=out)
        return out


# --------------------------------------------------------------------------- sensors

def lidar_directions(beams: int, width: int) -> np.ndarray:
    """Unit ray directions [beams * width, 3] in the sensor frame, row-major by beam."""
    elev = np.radians(np.linspace(BEAM_ELEVATIONS[0], BEAM_ELEVATIONS[1], beams))
    azim = np.linspace(np.pi, -np.pi, width, endpoint=False)
    e, a = np.meshgrid(elev, azim, indexing="ij")
    return np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)


def scaled_calib(size: tuple[int, int], scale: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """P2 [3, 4], Tr [4, 4] and (width, height) of KITTI's calibration for `size`, scaled."""
    calib = KITTI_CALIB[tuple(size)]
    P2 = np.diag([scale, scale, 1.0]) @ np.array(calib["P2"]).reshape(3, 4)
    Tr = np.vstack([np.array(calib["Tr"]).reshape(3, 4), [0, 0, 0, 1]])
    return P2, Tr, (int(round(size[0] * scale)), int(round(size[1] * scale)))


def camera_rays(P2: np.ndarray, Tr: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin [3] and directions [H * W, 3] (velodyne frame) of the rays through pixel centres.

    P2 = K [I | t]: the camera centre is -t in camera-0 coordinates and the ray of pixel
    (u, v) is K^-1 [u, v, 1]; Tr^-1 takes both to the velodyne frame, so a hit at pixel
    (c + 0.5, r + 0.5) projects back into pixel (r, c) with cmkd.data.geometry.project_to_image.
    """
    K = P2[:, :3]
    t = np.linalg.solve(K, P2[:, 3])
    inv = np.linalg.inv(Tr)
    origin = inv[:3, :3] @ (-t) + inv[:3, 3]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
    dirs = (inv[:3, :3] @ np.linalg.solve(K, pix)).T
    return origin, dirs / np.linalg.norm(dirs, axis=1, keepdims=True)


def _pose(x: float, y: float, yaw: float) -> np.ndarray:
    """World <- sensor transform of a sensor at (x, y, SENSOR_HEIGHT) heading `yaw`."""
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = [x, y, SENSOR_HEIGHT]
    return T


def _raycasting_scene(meshes: list[Mesh]):
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    ids = [scene.add_triangles(o3d.core.Tensor(m.vertices), o3d.core.Tensor(m.triangles)) for m in meshes]
    # Geometry ids are 0, 1, ... in insertion order; the lookup below relies on that.
    assert ids == list(range(len(meshes)))
    return scene


def _cast_from(scene, origins: np.ndarray, dirs: np.ndarray) -> dict[str, np.ndarray]:
    """Cast rays from `origins` ([3] or [N, 3]) along `dirs` [N, 3]."""
    import open3d as o3d

    rays = np.concatenate([np.broadcast_to(origins, dirs.shape), dirs], axis=1).astype(np.float32)
    return {k: v.numpy() for k, v in scene.cast_rays(o3d.core.Tensor(rays)).items()}


def render_frame(street: Street, frame: int, pose: np.ndarray, lidar_dirs: np.ndarray, P2: np.ndarray,
                 Tr: np.ndarray, size: tuple[int, int], rng: np.random.Generator, sun: np.ndarray,
                 range_noise: float, pixel_noise: float) -> dict[str, np.ndarray]:
    """Ray-cast one frame: points [N, 4], raw labels uint32 [N], image uint8 [H, W, 3] and the
    camera's per-pixel raw label map (for tests of the geometry)."""
    meshes = street.meshes + street.dynamic(frame, pose[0, 3])
    scene = _raycasting_scene(meshes)
    labels = np.array([m.label for m in meshes], np.uint32)
    instances = np.array([m.instance for m in meshes], np.uint32)
    colours = np.array([m.colour for m in meshes])
    reflect = np.array([REFLECTIVITY.get(m.label, 0.3) for m in meshes])
    R, origin = pose[:3, :3], pose[:3, 3]

    # LiDAR
    hit = _cast_from(scene, origin, lidar_dirs @ R.T)
    t = hit["t_hit"]
    ok = np.isfinite(t) & (t > MIN_RANGE) & (t < MAX_RANGE)
    geom = hit["geometry_ids"][ok]
    dist = t[ok] + rng.normal(0.0, range_noise, ok.sum())
    xyz = lidar_dirs[ok] * dist[:, None]
    normal = hit["primitive_normals"][ok] @ R  # world -> sensor frame
    cos_inc = np.abs(np.sum(normal * lidar_dirs[ok], axis=1))
    remission = np.clip(reflect[geom] * (0.4 + 0.6 * cos_inc) + rng.normal(0.0, 0.02, ok.sum()), 0.0, 1.0)
    points = np.column_stack([xyz, remission]).astype(np.float32)
    raw = labels[geom] | (instances[geom] << 16)

    # Camera
    width, height = size
    cam_origin, cam_dirs = camera_rays(P2, Tr, width, height)
    world_dirs = cam_dirs @ R.T
    cam = _cast_from(scene, R @ cam_origin + origin, world_dirs)
    t = cam["t_hit"]
    seen = np.isfinite(t)
    g = cam["geometry_ids"][seen]
    n = cam["primitive_normals"][seen]
    n = np.where((np.sum(n * world_dirs[seen], axis=1) > 0)[:, None], -n, n)  # face the camera
    hit_pos = R @ cam_origin + origin + world_dirs[seen] * t[seen, None]
    lit = np.ones(seen.sum(), bool)
    lambert = np.clip(n @ sun, 0.0, 1.0)
    facing = lambert > 0
    if facing.any():  # shadow rays towards the sun
        starts = hit_pos[facing] + n[facing] * 0.02
        blocked = np.isfinite(_cast_from(scene, starts, np.broadcast_to(sun, starts.shape))["t_hit"])
        lit[np.flatnonzero(facing)[blocked]] = False
    shade = 0.35 + 0.65 * lambert * lit
    image = np.empty((height * width, 3))
    image[seen] = colours[g] * shade[:, None]
    up = np.clip(world_dirs[~seen, 2], 0.0, 1.0)[:, None]  # sky: pale at the horizon, bluer above
    image[~seen] = (1 - up) * np.array([0.80, 0.86, 0.92]) + up * np.array([0.35, 0.55, 0.85])
    image += rng.normal(0.0, pixel_noise, image.shape)
    image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(height, width, 3)
    camera_labels = np.zeros(height * width, np.uint32)
    camera_labels[seen] = labels[g]
    return {"points": points, "labels": raw.astype(np.uint32), "image": image,
            "camera_labels": camera_labels.reshape(height, width)}


# --------------------------------------------------------------------------- writing

def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.12e}" for v in np.asarray(values).ravel())


def write_calib(path: Path, P2: np.ndarray, Tr: np.ndarray) -> None:
    """calib.txt as KITTI odometry writes it: P0..P3 and Tr, 12 numbers each."""
    K = P2[:, :3]
    P0 = np.column_stack([K, np.zeros(3)])
    P1 = np.column_stack([K, [-K[0, 0] * 0.54, 0.0, 0.0]])  # the grey stereo partner, 0.54 m baseline
    P3 = np.column_stack([K, P2[:, 3] - [K[0, 0] * 0.54, 0.0, 0.0]])
    lines = [f"{name}: {_fmt(m)}" for name, m in (("P0", P0), ("P1", P1), ("P2", P2), ("P3", P3), ("Tr", Tr[:3]))]
    path.write_text("\n".join(lines) + "\n")


def sequence_config(cfg: Mapping[str, Any], key: str = KEY) -> dict[str, dict[str, Any]]:
    """`sequences` (a list of {sequence, frames, image_size}) as {"NN": {frames, image_size}}.

    A list rather than a mapping keyed by sequence: YAML reads an unquoted 08 as a string and
    00 as an integer, and mixed key types break DVC's params hashing.
    """
    seqs = cfg.get("sequences", DEFAULTS["sequences"])
    if not isinstance(seqs, list) or not seqs:
        raise ConfigError(f"{key}.sequences", "must be a non-empty list of {sequence, frames, image_size}")
    out = {}
    for i, spec in enumerate(seqs):
        k = f"{key}.sequences[{i}]"
        if not isinstance(spec, Mapping) or set(spec) - {"sequence", "frames", "image_size"}:
            raise ConfigError(k, f"must be a mapping with keys sequence, frames, image_size; got {spec!r}")
        try:
            seq = semantickitti.sequence_name(spec.get("sequence"))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{k}.sequence", f"must be a sequence number such as 0 or 8, got {spec.get('sequence')!r}") from err
        if seq in out:
            raise ConfigError(f"{k}.sequence", f"sequence {seq} is listed twice")
        frames = spec.get("frames")
        if not isinstance(frames, int) or frames < 1:
            raise ConfigError(f"{k}.frames", f"must be a positive integer, got {frames!r}")
        size = tuple(spec.get("image_size", (1241, 376)))
        if size not in KITTI_CALIB:
            raise ConfigError(f"{k}.image_size", f"must be one of KITTI's sizes {[list(s) for s in KITTI_CALIB]}, got {list(size)}")
        out[seq] = {"frames": frames, "image_size": size}
    return out


def validate(cfg: Mapping[str, Any], key: str = KEY) -> None:
    seqs = sequence_config(cfg, key)
    scale = cfg.get("image_scale", DEFAULTS["image_scale"])
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise ConfigError(f"{key}.image_scale", f"must be in (0, 1], got {scale!r}")
    for name in ("lidar_beams", "lidar_width"):
        value = cfg.get(name, DEFAULTS[name])
        if not isinstance(value, int) or value < 8:
            raise ConfigError(f"{key}.{name}", f"must be an integer >= 8, got {value!r}")
    if cfg.get("palette", "natural") not in ("natural", "label"):
        raise ConfigError(f"{key}.palette", f"must be 'natural' or 'label', got {cfg.get('palette')!r}")
    semantickitti.validate(cfg, key)
    # Every split's sequences must be generated.
    for split, names in semantickitti.split_sequences(cfg, key).items():
        missing = sorted(set(names) - set(seqs))
        if missing:
            raise ConfigError(f"{key}.split.{split}", f"sequence(s) {missing} are not in {key}.sequences")
    for split in semantickitti.split_sequences(cfg, key):
        ch, cw = semantickitti._crop_for(cfg, key, split)
        for seq in semantickitti.split_sequences(cfg, key)[split]:
            w, h = (int(round(s * scale)) for s in seqs[seq]["image_size"])
            if ch > h or cw > w:
                raise ConfigError(f"{key}.crop", f"crop {cw}x{ch} for {split} does not fit sequence {seq}'s "
                                                 f"{w}x{h} images (image_size x image_scale)")


def generate(cfg: Mapping[str, Any], root: Path, progress: bool = True) -> Path:
    """Write the sample under `root/dataset/sequences/NN/...`; return `root`."""
    cfg = {**DEFAULTS, **cfg}
    seqs = sequence_config(cfg)
    seed = int(cfg["seed"])
    scale = float(cfg["image_scale"])
    spacing = float(cfg["frame_spacing"])
    dirs = lidar_directions(int(cfg["lidar_beams"]), int(cfg["lidar_width"]))
    root = Path(root)
    with atomic_dir(root / "dataset") as dataset:
        total = sum(s["frames"] for s in seqs.values())
        with tqdm(total=total, desc="generate semantickitti-sample", unit="frame", disable=not progress) as bar:
            for seq, spec in seqs.items():
                _generate_sequence(dataset / "sequences" / seq, spec, seed, int(seq), scale, spacing, dirs, cfg, bar)
    return root


def _generate_sequence(out: Path, spec: Mapping[str, Any], seed: int, seq: int, scale: float, spacing: float,
                       dirs: np.ndarray, cfg: Mapping[str, Any], bar) -> None:
    rng = np.random.default_rng([seed, seq])
    frames = spec["frames"]
    x_end = frames * spacing
    street = Street(rng, -MAX_RANGE - 10.0, x_end + MAX_RANGE + 10.0, str(cfg["palette"]))
    P2, Tr, size = scaled_calib(spec["image_size"], scale)
    sun_az = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_az) * 0.6, np.sin(sun_az) * 0.6, 0.8])
    sun /= np.linalg.norm(sun)
    for sub in ("velodyne", "labels", "image_2"):
        (out / sub).mkdir(parents=True)
    write_calib(out / "calib.txt", P2, Tr)
    poses, times = [], []
    first_inv = None
    for frame in range(frames):
        pose = _pose(frame * spacing, -2.0 + rng.normal(0, 0.1), rng.normal(0, np.radians(1.5)))
        result = render_frame(street, frame, pose, dirs, P2, Tr, size, rng, sun,
                              float(cfg["range_noise"]), float(cfg["pixel_noise"]))
        name = f"{frame:06d}"
        result["points"].astype("<f4").tofile(out / "velodyne" / f"{name}.bin")
        result["labels"].astype("<u4").tofile(out / "labels" / f"{name}.label")
        Image.fromarray(result["image"]).save(out / "image_2" / f"{name}.png")
        # poses.txt: camera-0 pose of each frame in the first frame's camera-0 coordinates.
        if first_inv is None:
            first_inv = np.linalg.inv(pose)
        cam_pose = Tr @ first_inv @ pose @ np.linalg.inv(Tr)
        poses.append(_fmt(cam_pose[:3]))
        times.append(f"{frame * 0.1:.6e}")
        bar.update()
    (out / "poses.txt").write_text("\n".join(poses) + "\n")
    (out / "times.txt").write_text("\n".join(times) + "\n")


# --------------------------------------------------------------------------- stages

def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Generate the sample into `raw_dir` (or fetch a pre-made copy listed in `sources`)."""
    validate(cfg, KEY)
    raw_dir = Path(raw_dir)
    if cfg.get("sources"):
        fetch(list(cfg["sources"]), raw_dir, progress=progress, key=f"{KEY}.sources",
              max_extract_bytes=cfg.get("max_extract_bytes"))
        return
    raw_dir.mkdir(parents=True, exist_ok=True)
    generate(cfg, raw_dir, progress)
    # The manifest doubles as the provenance record whose checksum `prepare` stores.
    settings = {k: cfg.get(k, v) for k, v in DEFAULTS.items()}
    write_json(raw_dir / "SOURCES.json", {"sources": [{"generated": "cmkd.data.kitti_sample", "settings": settings}]})


def is_smoke_test(cfg: Mapping[str, Any]) -> bool:
    """A procedural street: its tables exercise the code path, they measure nothing."""
    return True


@register_dataset("semantickitti-sample")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    validate(cfg, KEY)
    semantickitti.prepare(cfg, raw_dir, out_path, progress, key=KEY)
