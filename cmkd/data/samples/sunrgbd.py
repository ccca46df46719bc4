"""An offline SUN RGB-D sample: procedural indoor rooms rendered with Open3D ray casting and
written in SUN RGB-D's own Kinect v2 layout, so `sunrgbd.prepare` runs its real reader on it.
The datasets sunrgbd-sample, sunrgbd-sample-mm and sunrgbd-sample-mm-rgb (`sample:` settings in
`data.<name>`); `validate` and `download` also take the real data's settings (then the reader's).

Per frame: a room (floor, walls, ceiling) furnished according to its scene class (beds in
bedrooms, rows of desks facing a board in classrooms, desks with monitors in computer rooms,
a long table ringed by chairs in conference rooms, counters and a fridge in kitchens, a toilet,
tub and sink in bathrooms...). Furniture types are shared between classes (desks, chairs,
sofas, round tables, shelves, plants, doors, windows) and sizes, counts, colours and the
camera pose are random, so the classes are learnable but not trivially. Each class also has its
own wall and floor colours and light (`CLASS_STYLE`, in 85 % of its rooms): colour is the RGB
teacher's trace of the class, room size and furniture shape the depth student's. The camera is a
Kinect v2 as SUN RGB-D stores it (730 x 530, fx = fy = 529.5) scaled by `image_scale`.

Written per frame, exactly as SUN RGB-D does (every third frame of a class in align_kv2)::

    SUNRGBD/kv2/<kinect2data|align_kv2>/<frame>/
        image/<id>.jpg        colour: Lambert shading with shadows, per-object colours, texture noise
        depth/<id>.png        uint16, mm rotated left by 3 bits, Kinect-like noise and holes
        depth_bfx/<id>.png    the same without noise or holes
        intrinsics.txt        3 x 3 K, row-major
        scene.txt             the scene class

Every frame draws from its own generator seeded by (seed, class, frame), so the sample is
deterministic per seed and independent of the order frames are made in.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from cmkd.utils.atomic import atomic_dir
from cmkd.data.datasets import sunrgbd
from cmkd.data.datasets.sunrgbd import SCENE_CLASSES, encode_depth
from cmkd.data.registry import register_dataset
from cmkd.errors import ConfigError

KINECT2_K = np.array([[529.5, 0.0, 365.0], [0.0, 529.5, 265.0], [0.0, 0.0, 1.0]])
KINECT2_HW = (530, 730)

# Albedo palettes (linear RGB). Furniture palettes are shared between classes on purpose.
WOOD = [(0.55, 0.38, 0.22), (0.70, 0.52, 0.33), (0.42, 0.28, 0.16), (0.80, 0.66, 0.48), (0.62, 0.45, 0.30)]
WHITE = [(0.90, 0.90, 0.88), (0.95, 0.95, 0.95), (0.86, 0.87, 0.90)]
GREY = [(0.50, 0.50, 0.52), (0.30, 0.30, 0.32), (0.65, 0.65, 0.66), (0.40, 0.42, 0.45)]
DARK = [(0.07, 0.07, 0.08), (0.12, 0.12, 0.14)]
FABRIC = [(0.60, 0.20, 0.20), (0.20, 0.30, 0.60), (0.30, 0.50, 0.30), (0.55, 0.50, 0.40),
          (0.40, 0.40, 0.45), (0.70, 0.60, 0.30), (0.50, 0.30, 0.50)]
WALL = [(0.92, 0.90, 0.85), (0.85, 0.88, 0.90), (0.90, 0.85, 0.75), (0.80, 0.85, 0.80), (0.95, 0.95, 0.95),
        (0.88, 0.80, 0.72)]
FLOOR = [(0.55, 0.40, 0.25), (0.45, 0.45, 0.48), (0.70, 0.68, 0.62), (0.35, 0.38, 0.45), (0.60, 0.55, 0.45)]
GREEN = [(0.20, 0.45, 0.20), (0.25, 0.55, 0.25), (0.15, 0.35, 0.18)]

# Per class: wall and floor palettes and the light's colour (multiplies the shading). A room takes its
# class's style with probability STYLE_P, otherwise the shared WALL / FLOOR palettes under white light.
# Without it only the geometry (depth) told the classes apart and the RGB teacher sat below chance
# (issue 26); these give RGB the stronger, though not perfect, trace, so the teacher has something to teach.
STYLE_P = 0.85
WARM, COOL, NEUTRAL = (1.08, 0.92, 0.72), (0.88, 0.96, 1.08), (1.0, 1.0, 1.0)
CLASS_STYLE: dict[str, tuple[list, list, tuple[float, float, float]]] = {
    "bathroom": ([(0.72, 0.86, 0.95), (0.82, 0.92, 0.97)], [(0.50, 0.62, 0.74), (0.42, 0.52, 0.64)], COOL),
    "bedroom": ([(0.90, 0.72, 0.74), (0.84, 0.68, 0.80)], [(0.55, 0.38, 0.22), (0.62, 0.45, 0.30)], WARM),
    "classroom": ([(0.86, 0.90, 0.58), (0.80, 0.88, 0.54)], [(0.60, 0.62, 0.52), (0.55, 0.58, 0.50)], COOL),
    "computer_room": ([(0.74, 0.74, 0.78), (0.68, 0.70, 0.74)], [(0.15, 0.20, 0.45), (0.20, 0.25, 0.52)], COOL),
    "conference_room": ([(0.55, 0.40, 0.30), (0.62, 0.46, 0.34)], [(0.24, 0.24, 0.28), (0.30, 0.28, 0.30)], NEUTRAL),
    "dining_area": ([(0.86, 0.55, 0.36), (0.80, 0.50, 0.30)], [(0.70, 0.52, 0.33), (0.60, 0.42, 0.26)], WARM),
    "discussion_area": ([(0.34, 0.70, 0.70), (0.40, 0.76, 0.64)], [(0.70, 0.70, 0.70), (0.62, 0.64, 0.66)], NEUTRAL),
    "kitchen": ([(0.95, 0.86, 0.45), (0.94, 0.80, 0.40)], [(0.80, 0.78, 0.72), (0.34, 0.32, 0.30)], NEUTRAL),
    "office": ([(0.70, 0.78, 0.92), (0.76, 0.82, 0.94)], [(0.40, 0.42, 0.46), (0.34, 0.36, 0.42)], COOL),
    "rest_space": ([(0.60, 0.72, 0.44), (0.66, 0.76, 0.50)], [(0.76, 0.66, 0.50), (0.70, 0.60, 0.46)], WARM),
}

# Surface textures (index stored per triangle).
PLAIN, WOODGRAIN, TILES, FABRIC_T, SCREEN, GLASS = range(6)


def validate_sample(cfg: Mapping[str, Any], key: str) -> None:
    """Check the `sample:` settings (`cfg` is that section, `key` its params key)."""
    known = {"frames_per_class", "image_scale", "seed", "jpeg_quality"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"not a sample parameter; known: {sorted(known)}")
    if int(cfg.get("frames_per_class", 15)) < 10:
        # 70/10/20 stratified splits need >= 2 frames per class outside the training split.
        raise ConfigError(f"{key}.frames_per_class",
                          f"must be >= 10 for stratified 70/10/20 splits, got {cfg.get('frames_per_class')}")
    if not 0.05 <= float(cfg.get("image_scale", 0.25)) <= 1.0:
        raise ConfigError(f"{key}.image_scale", f"must be in [0.05, 1], got {cfg.get('image_scale')}")
    if not 50 <= int(cfg.get("jpeg_quality", 90)) <= 100:
        raise ConfigError(f"{key}.jpeg_quality", f"must be in [50, 100], got {cfg.get('jpeg_quality')}")


# ----------------------------------------------------------------------------- mesh building

def _unit_templates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Unit primitives with y up and the base on y = 0: box [-.5,.5] x [0,1] x [-.5,.5],
    cylinder of radius 1 and height 1, sphere of radius 1 centred at y = 0."""
    import open3d as o3d

    box = o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0)
    bv = np.asarray(box.vertices) - [0.5, 0.0, 0.5]
    cyl = o3d.geometry.TriangleMesh.create_cylinder(1.0, 1.0, resolution=16, split=1)
    cv = np.asarray(cyl.vertices)[:, [0, 2, 1]] + [0.0, 0.5, 0.0]  # axis z -> y, base on y = 0
    ct = np.asarray(cyl.triangles)[:, [0, 2, 1]]  # keep the winding after swapping two axes
    sph = o3d.geometry.TriangleMesh.create_sphere(1.0, resolution=8)
    return {
        "box": (bv, np.asarray(box.triangles)),
        "cylinder": (cv, ct),
        "sphere": (np.asarray(sph.vertices), np.asarray(sph.triangles)),
    }


def _rot_y(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


class RoomBuilder:
    """Collects primitives of one room as one triangle soup with per-triangle material.

    Coordinates: x across the room (0..W), y up (floor 0, ceiling H), z along it (0..D).
    Furniture has a local frame whose +z is its front; `yaw` turns it about y.
    """

    def __init__(self, rng: np.random.Generator, templates: Mapping[str, tuple[np.ndarray, np.ndarray]]):
        self.rng = rng
        self.templates = templates
        self.vertices: list[np.ndarray] = []
        self.triangles: list[np.ndarray] = []
        self.albedo: list[np.ndarray] = []
        self.texture: list[np.ndarray] = []
        self.n_vertices = 0
        self.keep_out: tuple[float, float, float] | None = None  # (x, z, radius) around the camera
        self.light_colour = np.ones(3)  # RGB of the room's light

    def colour(self, palette: list[tuple[float, float, float]]) -> np.ndarray:
        base = np.array(palette[self.rng.integers(len(palette))])
        return np.clip(base * self.rng.uniform(0.85, 1.15, 3), 0.02, 1.0)

    def free(self, x: float, z: float, radius: float) -> bool:
        """Whether furniture of this footprint radius at (x, z) stays clear of the camera."""
        if self.keep_out is None:
            return True
        kx, kz, kr = self.keep_out
        return (x - kx) ** 2 + (z - kz) ** 2 > (kr + radius) ** 2

    def _add(self, kind: str, scale: tuple[float, float, float], pos: np.ndarray, yaw: float,
             albedo: np.ndarray, texture: int) -> None:
        v, t = self.templates[kind]
        world = (v * np.asarray(scale)) @ _rot_y(yaw).T + pos
        self.vertices.append(world)
        self.triangles.append(t + self.n_vertices)
        self.n_vertices += len(v)
        self.albedo.append(np.repeat(albedo[None], len(t), axis=0))
        self.texture.append(np.full(len(t), texture, np.int64))

    def part(self, kind: str, frame: tuple[float, float, float], local: tuple[float, float, float],
             size: tuple[float, float, float], albedo: np.ndarray, texture: int = PLAIN) -> None:
        """A primitive at `local` (x, y, z; y = its base height) in the furniture frame (x, z, yaw)."""
        fx, fz, yaw = frame
        offset = _rot_y(yaw) @ np.array([local[0], 0.0, local[2]])
        self._add(kind, size, np.array([fx + offset[0], local[1], fz + offset[2]]), yaw, albedo, texture)

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (np.concatenate(self.vertices).astype(np.float32), np.concatenate(self.triangles).astype(np.uint32),
                np.concatenate(self.albedo), np.concatenate(self.texture))


# ----------------------------------------------------------------------------- furniture

Frame3 = tuple[float, float, float]


def table(b: RoomBuilder, f: Frame3, w: float, d: float, h: float, top: np.ndarray, legs: np.ndarray | None = None) -> None:
    legs = top if legs is None else legs
    b.part("box", f, (0, h - 0.04, 0), (w, 0.04, d), top, WOODGRAIN)
    for sx in (-1, 1):
        for sz in (-1, 1):
            b.part("box", f, (sx * (w / 2 - 0.05), 0, sz * (d / 2 - 0.05)), (0.05, h - 0.04, 0.05), legs)


def round_table(b: RoomBuilder, f: Frame3, r: float, h: float, top: np.ndarray) -> None:
    b.part("cylinder", f, (0, h - 0.04, 0), (r, 0.04, r), top, WOODGRAIN)
    b.part("cylinder", f, (0, 0, 0), (0.05, h - 0.04, 0.05), top * 0.6)
    b.part("cylinder", f, (0, 0, 0), (0.3, 0.03, 0.3), top * 0.6)


def chair(b: RoomBuilder, f: Frame3, colour: np.ndarray, seat: np.ndarray | None = None) -> None:
    seat = colour if seat is None else seat
    b.part("box", f, (0, 0.42, 0), (0.44, 0.05, 0.44), seat, FABRIC_T)
    for sx in (-1, 1):
        for sz in (-1, 1):
            b.part("box", f, (sx * 0.19, 0, sz * 0.19), (0.04, 0.42, 0.04), colour)
    b.part("box", f, (0, 0.47, -0.2), (0.44, 0.45, 0.04), seat, FABRIC_T)


def office_chair(b: RoomBuilder, f: Frame3, colour: np.ndarray) -> None:
    b.part("cylinder", f, (0, 0, 0), (0.3, 0.05, 0.3), np.full(3, 0.08))
    b.part("cylinder", f, (0, 0.05, 0), (0.03, 0.4, 0.03), np.full(3, 0.3))
    b.part("box", f, (0, 0.45, 0), (0.48, 0.07, 0.46), colour, FABRIC_T)
    b.part("box", f, (0, 0.55, -0.22), (0.46, 0.55, 0.06), colour, FABRIC_T)


def monitor(b: RoomBuilder, f: Frame3, y: float) -> None:
    b.part("box", f, (0, y, -0.05), (0.06, 0.14, 0.06), np.full(3, 0.1))
    b.part("box", f, (0, y + 0.12, -0.02), (0.55, 0.34, 0.03), np.full(3, 0.06), SCREEN)


def desk(b: RoomBuilder, f: Frame3, w: float, d: float, top: np.ndarray, monitors: int = 0, office: bool = False,
         chair_colour: np.ndarray | None = None) -> None:
    """A desk used from its local -z side: the sitter faces +z, monitors on the far side face them."""
    table(b, f, w, d, 0.74, top, np.full(3, 0.3) if office else top)
    xs = np.linspace(-w / 2 + 0.4, w / 2 - 0.4, monitors) if monitors > 1 else np.zeros(monitors)
    for x in xs:
        # Screens face the sitter (local -z): turn them by pi about the desk's own axis.
        gx, gz = _local_to_world(f, x, d * 0.15)
        monitor(b, (gx, gz, f[2] + np.pi), 0.74)
        if office:
            tx, tz = _local_to_world(f, x + 0.25, d * 0.1)
            b.part("box", (tx, tz, f[2]), (0, 0, 0), (0.2, 0.45, 0.45), np.full(3, 0.08))
    if chair_colour is not None:
        for x in (xs if monitors else [0.0]):
            cx, cz = _local_to_world(f, x, -d / 2 - 0.35)
            (office_chair if office else chair)(b, (cx, cz, f[2]), chair_colour)


def _local_to_world(f: Frame3, dx: float, dz: float) -> tuple[float, float]:
    off = _rot_y(f[2]) @ np.array([dx, 0.0, dz])
    return f[0] + off[0], f[1] + off[2]


def sofa(b: RoomBuilder, f: Frame3, w: float, colour: np.ndarray) -> None:
    b.part("box", f, (0, 0.0, 0.05), (w, 0.42, 0.8), colour, FABRIC_T)
    b.part("box", f, (0, 0.0, -0.36), (w, 0.85, 0.2), colour, FABRIC_T)
    for sx in (-1, 1):
        b.part("box", f, (sx * (w / 2 - 0.1), 0.0, 0.05), (0.2, 0.62, 0.8), colour * 0.9, FABRIC_T)


def plant(b: RoomBuilder, f: Frame3) -> None:
    b.part("cylinder", f, (0, 0, 0), (0.16, 0.32, 0.16), np.array([0.6, 0.3, 0.2]))
    r = b.rng.uniform(0.25, 0.4)
    b.part("sphere", f, (0, 0.32 + r, 0), (r, r * 1.3, r), b.colour(GREEN), FABRIC_T)


def wall_panel(b: RoomBuilder, f: Frame3, w: float, h: float, y: float, albedo: np.ndarray, texture: int = PLAIN) -> None:
    """A thin panel on a wall (board, screen, mirror, door, window): local z = 0 is the wall."""
    b.part("box", f, (0, y, 0.015), (w, h, 0.03), albedo, texture)


def on_wall(wall: int, t: float, depth: float, dims: tuple[float, float]) -> Frame3:
    """Frame of an item whose back touches `wall` (0: z=0, 1: z=D, 2: x=0, 3: x=W) at
    fraction `t` along it, its front facing into the room; `depth` is its front-back size."""
    w, d = dims
    if wall == 0:
        return (t * w, depth / 2, 0.0)
    if wall == 1:
        return (t * w, d - depth / 2, np.pi)
    if wall == 2:
        return (depth / 2, t * d, np.pi / 2)
    return (w - depth / 2, t * d, -np.pi / 2)


def wall_length(wall: int, dims: tuple[float, float]) -> float:
    return dims[0] if wall in (0, 1) else dims[1]


# ----------------------------------------------------------------------------- layouts

def _place(b: RoomBuilder, f: Frame3, radius: float, make: Callable[[], None]) -> bool:
    if b.free(f[0], f[1], radius):
        make()
        return True
    return False


def _along(b: RoomBuilder, wall: int, dims: tuple[float, float], item_len: float, depth: float,
           lo: float = 0.15, hi: float = 0.85) -> Frame3:
    """A frame on `wall` at a random position that keeps an item of `item_len` off the corners."""
    length = wall_length(wall, dims)
    margin = min(0.49, (item_len / 2 + 0.1) / length)
    t = b.rng.uniform(max(lo, margin), max(max(lo, margin), min(hi, 1 - margin)))
    return on_wall(wall, t, depth, dims)


def layout_bathroom(b: RoomBuilder, dims, h, cam_wall) -> None:
    walls = [w for w in range(4) if w != cam_wall]
    b.rng.shuffle(walls)
    white = b.colour(WHITE)
    f = _along(b, walls[0], dims, 1.6, 0.75, 0.5, 0.5)
    _place(b, f, 0.9, lambda: b.part("box", f, (0, 0, 0), (1.6, 0.55, 0.75), white))
    f2 = _along(b, walls[1], dims, 0.45, 0.65)
    _place(b, f2, 0.35, lambda: (b.part("cylinder", f2, (0, 0, 0.08), (0.19, 0.4, 0.22), white),
                                 b.part("cylinder", f2, (0, 0.4, 0.08), (0.21, 0.04, 0.24), white * 0.97),
                                 b.part("box", f2, (0, 0.4, -0.24), (0.42, 0.38, 0.17), white)))
    f3 = _along(b, walls[2], dims, 0.7, 0.45)
    cab = b.colour(WOOD + WHITE)
    _place(b, f3, 0.4, lambda: (b.part("box", f3, (0, 0, 0), (0.65, 0.82, 0.45), cab, WOODGRAIN),
                                b.part("box", f3, (0, 0.82, 0), (0.67, 0.05, 0.47), white)))
    mx, mz = _local_to_world(f3, 0, -0.22)
    wall_panel(b, (mx, mz, f3[2]), 0.6, 0.8, 1.15, np.array([0.7, 0.78, 0.82]), GLASS)


def layout_bedroom(b: RoomBuilder, dims, h, cam_wall) -> None:
    walls = [w for w in range(4) if w != cam_wall]
    b.rng.shuffle(walls)
    bw, bl = b.rng.choice([0.9, 1.4, 1.6, 1.8]), 2.0
    f = _along(b, walls[0], dims, bw + 1.0, bl)
    wood, linen, blanket = b.colour(WOOD), b.colour(WHITE), b.colour(FABRIC)

    def bed() -> None:
        b.part("box", f, (0, 0, 0), (bw, 0.3, bl), wood, WOODGRAIN)
        b.part("box", f, (0, 0.3, 0.03), (bw - 0.04, 0.2, bl - 0.1), linen, FABRIC_T)
        b.part("box", f, (0, 0.5, 0.35), (bw, 0.06, bl * 0.6), blanket, FABRIC_T)
        b.part("box", f, (0, 0, -bl / 2 + 0.03), (bw, 1.05, 0.06), wood, WOODGRAIN)
        for x in ([0.0] if bw < 1.2 else [-bw / 4, bw / 4]):
            b.part("box", f, (x, 0.5, -bl / 2 + 0.3), (0.5, 0.13, 0.34), linen, FABRIC_T)
        for side in (-1, 1):
            if b.rng.random() < 0.7:
                b.part("box", f, (side * (bw / 2 + 0.3), 0, -bl / 2 + 0.22), (0.45, 0.5, 0.4), wood, WOODGRAIN)

    _place(b, f, 1.2, bed)
    f2 = _along(b, walls[1], dims, 1.4, 0.6)
    ww = b.rng.uniform(1.0, 1.6)
    wcol = b.colour(WOOD + WHITE)
    _place(b, f2, 0.8, lambda: b.part("box", f2, (0, 0, 0), (ww, 2.0, 0.6), wcol, WOODGRAIN))
    if b.rng.random() < 0.35:
        f3 = _along(b, walls[2], dims, 1.2, 0.6)
        _place(b, f3, 0.8, lambda: desk(b, f3, 1.1, 0.6, b.colour(WOOD), 0, False, b.colour(WOOD + FABRIC)))
    if b.rng.random() < 0.3:
        rug = b.colour(FABRIC)
        b.part("box", (dims[0] / 2, dims[1] / 2, 0.0), (0, 0, 0), (1.6, 0.01, 1.1), rug, FABRIC_T)


def layout_classroom(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    board = b.colour([(0.15, 0.30, 0.20), (0.92, 0.92, 0.92), (0.10, 0.12, 0.12)])
    wall_panel(b, (w / 2, d, np.pi), min(w - 1.0, b.rng.uniform(2.5, 4.0)), 1.1, 0.9, board)
    rows, cols = b.rng.integers(3, 6), b.rng.integers(3, 6)
    dw, dd = (1.2, 0.55) if b.rng.random() < 0.5 else (0.7, 0.5)
    top, chair_c = b.colour(WOOD + GREY), b.colour(FABRIC + GREY)
    xs = np.linspace(1.0, w - 1.0, cols)
    zs = np.linspace(d - 2.3, max(1.8, d - 2.3 - (rows - 1) * 1.3), rows)
    for z in zs:
        for x in xs:
            # Desks face the board (+z): the sitter is on the desk's -z side, looking at it.
            f = (x + b.rng.normal(0, 0.05), z + b.rng.normal(0, 0.05), b.rng.normal(0, 0.05))
            _place(b, f, 0.8, lambda f=f: desk(b, f, dw, dd, top, 0, False, chair_c))
    tf = (w / 2 + b.rng.uniform(-1, 1), d - 1.1, 0.0)
    _place(b, tf, 0.9, lambda: table(b, tf, 1.4, 0.7, 0.76, b.colour(WOOD)))


def layout_computer_room(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    top, chair_c = b.colour(WHITE + GREY + WOOD), b.colour(DARK + FABRIC)
    if b.rng.random() < 0.6:
        rows = b.rng.integers(2, 5)
        length = max(1.8, w - b.rng.uniform(1.4, 2.2))
        n_mon = max(1, int(length // 0.85))
        for z in np.linspace(1.8, d - 1.2, rows):
            f = (w / 2, z, np.pi)
            _place(b, f, 0.6, lambda f=f: desk(b, f, length, 0.75, top, n_mon, True, chair_c))
    else:
        for wall in [x for x in range(4) if x != cam_wall]:
            length = wall_length(wall, dims) - 1.2
            f = on_wall(wall, 0.5, 0.75, dims)
            # Wall desks: the sitter faces the wall, so the desk's front (+z) points at it.
            f = (f[0], f[1], f[2] + np.pi)
            _place(b, f, 0.3, lambda f=f, length=length: desk(b, f, length, 0.75, top, max(1, int(length // 0.9)), True, chair_c))


def layout_conference_room(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    along_z = d >= w
    length = (d if along_z else w) * b.rng.uniform(0.5, 0.7)
    width = b.rng.uniform(1.1, 1.5)
    yaw = 0.0 if along_z else np.pi / 2
    f = (w / 2, d / 2, yaw)
    top, chair_c = b.colour(WOOD + DARK + WHITE), b.colour(DARK + FABRIC + GREY)
    table(b, f, width, length, 0.75, top, np.full(3, 0.2))
    n = max(2, int(length // 0.75))
    for z in np.linspace(-length / 2 + 0.4, length / 2 - 0.4, n):
        for side in (-1, 1):
            cx, cz = _local_to_world(f, side * (width / 2 + 0.35), z)
            ax, az = _local_to_world(f, 0.0, z)
            cf = (cx + b.rng.normal(0, 0.04), cz + b.rng.normal(0, 0.04), 0.0)
            # Chairs face the table: their front (+z) turned towards the table's axis.
            cf = (cf[0], cf[1], _face(cf, (ax, az, 0.0)) + b.rng.normal(0, 0.15))
            _place(b, cf, 0.35, lambda cf=cf: office_chair(b, cf, chair_c))
    screen = b.colour(DARK + WHITE)
    if along_z:
        wall_panel(b, (w / 2, d, np.pi), min(w - 0.6, 2.2), 1.3, 0.9, screen, SCREEN)
    else:
        wall_panel(b, (w, d / 2, -np.pi / 2), min(d - 0.6, 2.2), 1.3, 0.9, screen, SCREEN)


def _face(item: Frame3, target: Frame3) -> float:
    """Yaw that turns an item's front (+z) towards the target point."""
    return float(np.arctan2(target[0] - item[0], target[1] - item[1]))


def _seat_around(b: RoomBuilder, centre: Frame3, radius: float, n: int, make: Callable[[Frame3], None]) -> None:
    start = b.rng.uniform(0, 2 * np.pi)
    for a in start + np.arange(n) * 2 * np.pi / n:
        f = (centre[0] + radius * np.sin(a), centre[1] + radius * np.cos(a), 0.0)
        f = (f[0], f[1], _face(f, centre))
        _place(b, f, 0.35, lambda f=f: make(f))


def layout_dining_area(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    n_tables = b.rng.integers(1, 4)
    top, chair_c = b.colour(WOOD + WHITE), b.colour(WOOD + FABRIC)
    spots = [(w * x, d * z) for x, z in b.rng.uniform(0.3, 0.7, (n_tables, 2))]
    if n_tables > 1:
        spots = [(w * (i + 0.5) / n_tables, d * b.rng.uniform(0.4, 0.6)) for i in range(n_tables)]
    for x, z in spots:
        f = (x, z, b.rng.uniform(0, np.pi))
        if b.rng.random() < 0.5:
            r = b.rng.uniform(0.45, 0.6)
            ok = _place(b, f, r + 0.5, lambda f=f, r=r: round_table(b, f, r, 0.75, top))
            seat_r = r + 0.3
        else:
            ok = _place(b, f, 1.1, lambda f=f: table(b, f, 1.4, 0.9, 0.75, top))
            seat_r = 0.85
        if ok:
            _seat_around(b, f, seat_r, 4, lambda cf: chair(b, cf, chair_c))
            lamp = b.colour(WHITE + DARK)
            b.part("cylinder", f, (0, h - 0.7, 0), (0.22, 0.16, 0.22), lamp)
            b.part("cylinder", f, (0, h - 0.54, 0), (0.01, 0.54, 0.01), np.full(3, 0.2))
    if b.rng.random() < 0.5:
        wall = b.rng.choice([x for x in range(4) if x != cam_wall])
        f = _along(b, wall, dims, 1.6, 0.45)
        col = b.colour(WOOD)
        _place(b, f, 0.8, lambda: b.part("box", f, (0, 0, 0), (1.6, 0.85, 0.45), col, WOODGRAIN))


def layout_discussion_area(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    top, seat_c = b.colour(WHITE + WOOD + GREY), b.colour(FABRIC)
    for _ in range(b.rng.integers(2, 4)):
        f = (b.rng.uniform(1.2, w - 1.2), b.rng.uniform(1.2, d - 1.2), 0.0)
        r = b.rng.uniform(0.35, 0.45)
        hgt = b.rng.choice([0.75, 1.05])
        if _place(b, f, r + 0.6, lambda f=f, r=r, hgt=hgt: round_table(b, f, r, hgt, top)):
            if hgt > 1.0:
                _seat_around(b, f, r + 0.35, b.rng.integers(2, 4),
                             lambda cf: b.part("cylinder", cf, (0, 0, 0), (0.17, 0.75, 0.17), seat_c, FABRIC_T))
            else:
                _seat_around(b, f, r + 0.35, b.rng.integers(2, 5), lambda cf: chair(b, cf, seat_c))
    walls = [x for x in range(4) if x != cam_wall]
    if b.rng.random() < 0.75:
        wall = walls[b.rng.integers(len(walls))]
        f = on_wall(wall, 0.5, 0.0, dims)
        wall_panel(b, f, min(wall_length(wall, dims) - 0.8, 2.0), 1.1, 0.95, b.colour(WHITE))
    if b.rng.random() < 0.4:
        wall = walls[b.rng.integers(len(walls))]
        f = _along(b, wall, dims, 2.0, 0.9)
        col = b.colour(FABRIC)
        _place(b, f, 1.1, lambda: sofa(b, f, 2.0, col))


def layout_kitchen(b: RoomBuilder, dims, h, cam_wall) -> None:
    walls = [x for x in range(4) if x != cam_wall]
    b.rng.shuffle(walls)
    cab, stone = b.colour(WOOD + WHITE + GREY), b.colour(GREY + DARK + WHITE)
    for wall in walls[: b.rng.integers(1, 3)]:
        length = wall_length(wall, dims) - b.rng.uniform(0.2, 1.2)
        f = on_wall(wall, 0.5, 0.6, dims)

        def counter(f=f, length=length) -> None:
            b.part("box", f, (0, 0, 0), (length, 0.88, 0.6), cab, WOODGRAIN)
            b.part("box", f, (0, 0.88, 0.01), (length + 0.02, 0.04, 0.62), stone)
            b.part("box", f, (0, 1.45, -0.12), (length, 0.7, 0.35), cab, WOODGRAIN)
            b.part("box", f, (b.rng.uniform(-length / 3, length / 3), 0.92, 0.0), (0.6, 0.01, 0.52), np.full(3, 0.05))

        _place(b, f, 0.2, counter)
    f = _along(b, walls[-1], dims, 0.8, 0.7)
    fridge = b.colour(WHITE + GREY)
    _place(b, f, 0.5, lambda: b.part("box", f, (0, 0, 0), (0.7, 1.8, 0.7), fridge))
    if b.rng.random() < 0.4:
        f2 = (dims[0] / 2, dims[1] / 2, b.rng.uniform(0, np.pi))
        if _place(b, f2, 0.9, lambda: table(b, f2, 1.0, 0.7, 0.75, b.colour(WOOD + WHITE))):
            _seat_around(b, f2, 0.65, 2, lambda cf: chair(b, cf, b.colour(WOOD)))


def layout_office(b: RoomBuilder, dims, h, cam_wall) -> None:
    walls = [x for x in range(4) if x != cam_wall]
    b.rng.shuffle(walls)
    top, chair_c = b.colour(WOOD + WHITE + GREY), b.colour(DARK + FABRIC)
    for wall in walls[: b.rng.integers(1, 3)]:
        f = _along(b, wall, dims, 1.5, 0.7)
        f = (f[0], f[1], f[2] + np.pi)  # the sitter faces the wall
        n_mon = int(b.rng.integers(1, 3))
        _place(b, f, 0.6, lambda f=f, n=n_mon: desk(b, f, 1.4, 0.7, top, n, True, chair_c))
    for wall in walls[1:]:
        if b.rng.random() < 0.6:
            f = _along(b, wall, dims, 1.0, 0.35)
            col = b.colour(WOOD + GREY + WHITE)
            hh = b.rng.uniform(1.1, 2.0)
            _place(b, f, 0.5, lambda f=f, col=col, hh=hh: b.part("box", f, (0, 0, 0), (0.9, hh, 0.35), col, WOODGRAIN))
    if b.rng.random() < 0.5:
        f = _along(b, walls[0], dims, 0.4, 0.3, 0.05, 0.15)
        _place(b, f, 0.3, lambda: plant(b, f))


def layout_rest_space(b: RoomBuilder, dims, h, cam_wall) -> None:
    w, d = dims
    centre = (w / 2 + b.rng.uniform(-0.5, 0.5), d / 2 + b.rng.uniform(-0.5, 0.5), b.rng.uniform(0, np.pi))
    if _place(b, centre, 0.7, lambda: table(b, centre, 1.0, 0.55, 0.42, b.colour(WOOD + WHITE + DARK))):
        col = b.colour(FABRIC)
        n = b.rng.integers(1, 4)
        _seat_around(b, centre, 1.05, n, lambda f: sofa(b, f, b.rng.choice([0.9, 1.8, 2.1]), col))
        if b.rng.random() < 0.5:
            b.part("box", centre, (0, 0, 0), (2.4, 0.01, 1.8), b.colour(FABRIC), FABRIC_T)
    walls = [x for x in range(4) if x != cam_wall]
    for _ in range(b.rng.integers(1, 4)):
        wall = walls[b.rng.integers(len(walls))]
        f = _along(b, wall, dims, 0.5, 0.4, 0.05, 0.95)
        _place(b, f, 0.3, lambda f=f: plant(b, f))
    if b.rng.random() < 0.3:
        wall = walls[b.rng.integers(len(walls))]
        f = _along(b, wall, dims, 0.9, 0.8)
        col = b.colour(FABRIC + GREY)
        _place(b, f, 0.5, lambda: b.part("box", f, (0, 0, 0), (0.9, 1.85, 0.8), col))
    if b.rng.random() < 0.3:
        wall = walls[b.rng.integers(len(walls))]
        wall_panel(b, on_wall(wall, 0.5, 0.0, dims), 1.2, 0.7, 1.2, np.full(3, 0.05), SCREEN)


#: Per class: the layout and the room's (width, depth, height) ranges in metres.
LAYOUTS: dict[str, tuple[Callable[..., None], tuple[tuple[float, float], ...]]] = {
    "bathroom": (layout_bathroom, ((1.8, 3.0), (2.2, 3.5), (2.3, 2.6))),
    "bedroom": (layout_bedroom, ((3.0, 4.5), (3.2, 5.0), (2.4, 2.8))),
    "classroom": (layout_classroom, ((6.0, 9.0), (7.0, 10.0), (2.8, 3.3))),
    "computer_room": (layout_computer_room, ((5.0, 8.0), (5.0, 8.0), (2.6, 3.0))),
    "conference_room": (layout_conference_room, ((4.0, 6.0), (5.0, 8.0), (2.6, 3.0))),
    "dining_area": (layout_dining_area, ((3.5, 6.0), (3.5, 6.0), (2.5, 3.0))),
    "discussion_area": (layout_discussion_area, ((4.0, 7.0), (4.0, 7.0), (2.6, 3.2))),
    "kitchen": (layout_kitchen, ((2.5, 4.5), (3.0, 5.0), (2.4, 2.8))),
    "office": (layout_office, ((3.0, 5.0), (3.0, 5.0), (2.5, 2.9))),
    "rest_space": (layout_rest_space, ((4.0, 7.0), (4.0, 7.0), (2.5, 3.2))),
}


def build_room(scene_class: str, rng: np.random.Generator, templates) -> tuple[RoomBuilder, np.ndarray, np.ndarray, np.ndarray]:
    """Furnish a room of `scene_class`; returns the builder, camera centre, forward and light."""
    layout, ranges = LAYOUTS[scene_class]
    w, d, h = (rng.uniform(lo, hi) for lo, hi in ranges)
    b = RoomBuilder(rng, templates)
    # Room shell: floor, ceiling and walls as thin boxes just outside the free space.
    t = 0.1
    if scene_class in ("bathroom", "kitchen") or rng.random() < 0.2:
        floor_tex = TILES
    else:
        floor_tex = WOODGRAIN if rng.random() < 0.4 else FABRIC_T
    wall_tex = TILES if scene_class == "bathroom" and rng.random() < 0.7 else PLAIN
    wall_pal, floor_pal, light_c = CLASS_STYLE[scene_class]
    if rng.random() >= STYLE_P:
        wall_pal, floor_pal, light_c = WALL, FLOOR, NEUTRAL
    b.light_colour = np.asarray(light_c) * rng.uniform(0.95, 1.05, 3)
    wall_c = b.colour(wall_pal)
    b.part("box", (w / 2, d / 2, 0), (0, -t, 0), (w + 2 * t, t, d + 2 * t), b.colour(floor_pal), floor_tex)
    b.part("box", (w / 2, d / 2, 0), (0, h, 0), (w + 2 * t, t, d + 2 * t), b.colour(WHITE), PLAIN)
    b.part("box", (w / 2, -t / 2, 0), (0, 0, 0), (w + 2 * t, h, t), wall_c, wall_tex)
    b.part("box", (w / 2, d + t / 2, 0), (0, 0, 0), (w + 2 * t, h, t), wall_c, wall_tex)
    b.part("box", (-t / 2, d / 2, 0), (0, 0, 0), (t, h, d), wall_c, wall_tex)
    b.part("box", (w + t / 2, d / 2, 0), (0, 0, 0), (t, h, d), wall_c, wall_tex)

    # Camera: near one wall (the back wall in classrooms), looking into the room.
    cam_wall = 0 if scene_class == "classroom" else int(rng.integers(4))
    dims = (w, d)
    f = on_wall(cam_wall, rng.uniform(0.25, 0.75), 2 * rng.uniform(0.3, 0.7), dims)
    eye = np.array([f[0], rng.uniform(1.1, 1.7), f[1]])
    target = np.array([w / 2 + rng.uniform(-0.25, 0.25) * w, rng.uniform(0.5, 1.1), d / 2 + rng.uniform(-0.25, 0.25) * d])
    b.keep_out = (float(eye[0]), float(eye[2]), 0.35)
    layout(b, dims, h, cam_wall)
    # Distractors every class may have: a door and a window on the walls the camera sees.
    others = [x for x in range(4) if x != cam_wall]
    if rng.random() < 0.5:
        wall = others[rng.integers(len(others))]
        wall_panel(b, _along(b, wall, dims, 0.9, 0.0, 0.1, 0.9), 0.9, 2.05, 0.0, b.colour(WOOD + WHITE), WOODGRAIN)
    if rng.random() < 0.4:
        wall = others[rng.integers(len(others))]
        wall_panel(b, _along(b, wall, dims, 1.4, 0.0), 1.4, 1.2, 1.0, np.array([0.85, 0.9, 0.95]), GLASS)
    light = np.array([w / 2 + rng.uniform(-0.3, 0.3) * w, h - 0.05, d / 2 + rng.uniform(-0.3, 0.3) * d])
    return b, eye, target - eye, light


# ----------------------------------------------------------------------------- rendering

def camera_rotation(forward: np.ndarray, roll: float) -> np.ndarray:
    """World -> camera rotation (rows: right, down, forward) for a camera with y-up world."""
    fwd = forward / np.linalg.norm(forward)
    right = np.cross(np.array([0.0, -1.0, 0.0]), fwd)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, fwd])


def render(builder: RoomBuilder, eye: np.ndarray, forward: np.ndarray, light: np.ndarray, k: np.ndarray,
           hw: tuple[int, int], rng: np.random.Generator, roll: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the room: (rgb float [H, W, 3] in [0, 1], z-depth float [H, W] in metres).

    Rays go through pixel (u, v) along K^-1 [u, v, 1] (0-based, as `sunrgbd.backproject`
    reads them back), so the z-depth is the hit distance along a ray with unit z.
    """
    import open3d as o3d

    vertices, triangles, albedo, texture = builder.mesh()
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(vertices), o3d.core.Tensor(triangles))
    h, w = hw
    rot = camera_rotation(forward, roll)
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    dirs_cam = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], axis=-1)
    dirs = dirs_cam @ rot  # camera -> world: R^T d, row-vector form
    rays = np.concatenate([np.broadcast_to(eye, dirs.shape), dirs], axis=-1).astype(np.float32)
    hit = scene.cast_rays(o3d.core.Tensor(rays))
    t_hit = hit["t_hit"].numpy().astype(np.float64)
    prim = hit["primitive_ids"].numpy().astype(np.int64)
    found = np.isfinite(t_hit) & (prim != scene.INVALID_ID)
    prim = np.where(found, prim, 0)
    depth = np.where(found, t_hit, 0.0)

    normals = hit["primitive_normals"].numpy().astype(np.float64)
    facing = np.sum(normals * dirs, axis=-1) > 0
    normals[facing] *= -1  # shade the side the camera sees
    points = eye + dirs * depth[..., None]
    to_light = light - points
    dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
    to_light /= np.maximum(dist, 1e-6)
    lambert = np.clip(np.sum(normals * to_light, axis=-1), 0.0, 1.0)
    # Shadows: one occlusion ray per pixel along the segment to the light (direction = the
    # whole segment, so t in (0, 1) covers exactly the points between surface and light).
    start = points + normals * 1e-3
    shadow_rays = np.concatenate([start, light - start], axis=-1).astype(np.float32)
    occluded = scene.test_occlusions(o3d.core.Tensor(shadow_rays), tnear=1e-4, tfar=0.999).numpy()
    lit = lambert * np.where(occluded, 0.25, 1.0) / (1.0 + 0.04 * dist[..., 0] ** 2)

    shade = 0.35 + 0.85 * lit
    colour = albedo[prim] * (shade * _texture(texture[prim], points, normals, rng))[..., None] * builder.light_colour
    colour += (texture[prim] == SCREEN)[..., None] * np.array([0.05, 0.07, 0.12])  # screens glow a little
    colour = np.where(found[..., None], colour, 0.0)
    colour = np.clip(colour, 0, 1) ** (1 / 1.8) + rng.normal(0, 0.015, colour.shape)
    return np.clip(colour, 0, 1), depth


def _texture(kind: np.ndarray, p: np.ndarray, n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative texture factor per pixel from its surface kind and 3-D position."""
    factor = 1.0 + rng.normal(0, 0.03, kind.shape)  # fine noise everywhere
    grain = 1.0 + 0.12 * np.sin(2 * np.pi * (p[..., 0] + p[..., 2]) / 0.06 + 3 * np.sin(p[..., 1] * 4))
    frac = np.abs(((p / 0.3) + 0.5) % 1.0 - 0.5)  # distance to the nearest tile joint, in tiles
    joints = np.any((frac < 0.04) & (np.abs(n) < 0.5), axis=-1)
    tiles = np.where(joints, 0.7, 1.0)
    weave = 1.0 + rng.normal(0, 0.08, kind.shape)
    factor = factor * np.select([kind == WOODGRAIN, kind == TILES, kind == FABRIC_T, kind == GLASS],
                                [grain, tiles, weave, 1.15], 1.0)
    return factor


def kinect_noise(depth: np.ndarray, dark: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Depth as a Kinect v2 measures it: axial noise growing with range, holes at depth edges,
    on very dark surfaces and as random dropouts."""
    noisy = depth + rng.normal(0, 1, depth.shape) * (0.0015 + 0.0015 * depth**2)
    jump = np.zeros(depth.shape, bool)
    dz_x = np.abs(np.diff(depth, axis=1)) > 0.08 * np.maximum(depth[:, 1:], 0.1)
    dz_y = np.abs(np.diff(depth, axis=0)) > 0.08 * np.maximum(depth[1:], 0.1)
    jump[:, 1:] |= dz_x
    jump[1:] |= dz_y
    holes = (jump & (rng.random(depth.shape) < 0.6)) | (dark & (rng.random(depth.shape) < 0.3))
    holes |= rng.random(depth.shape) < 0.005
    return np.where(holes | (depth <= 0), 0.0, np.maximum(noisy, 0.0))


def render_frame(scene_class: str, rng: np.random.Generator, image_scale: float, templates=None) -> dict[str, Any]:
    """One sample frame: rgb uint8 [H, W, 3], depth (noisy) and depth_bfx (clean) uint16 in
    SUN RGB-D's encoding, and the camera matrix K."""
    templates = templates or _unit_templates()
    hw = (int(round(KINECT2_HW[0] * image_scale)), int(round(KINECT2_HW[1] * image_scale)))
    k = KINECT2_K.copy()
    k[0, 0] *= hw[1] / KINECT2_HW[1]
    k[1, 1] *= hw[0] / KINECT2_HW[0]
    k[0, 2] = (k[0, 2] + 0.5) * hw[1] / KINECT2_HW[1] - 0.5
    k[1, 2] = (k[1, 2] + 0.5) * hw[0] / KINECT2_HW[0] - 0.5
    builder, eye, forward, light = build_room(scene_class, rng, templates)
    rgb, depth = render(builder, eye, forward, light, k, hw, rng, roll=float(rng.normal(0, 0.03)))
    dark = rgb.mean(axis=-1) < 0.12
    return {
        "rgb": (rgb * 255 + 0.5).astype(np.uint8),
        "depth": encode_depth(kinect_noise(depth, dark, rng)),
        "depth_bfx": encode_depth(depth),
        "k": k,
    }


def frame_name(index: int, seed: int, kv2_dir: str = "kinect2data") -> tuple[str, str]:
    """SUN RGB-D style names (the frame folder, the image/depth file stem) of `kv2_dir`:
    kinect2data "000002_2014-05-26_14-23-37_260595134347_rgbf000103-resize" / "0000103",
    align_kv2 "2014-12-18_11-34-09_260595134347" / "0000337"."""
    minutes, seconds = divmod(index, 60)
    stamp = f"2024-01-01_{minutes // 60 % 24:02d}-{minutes % 60:02d}-{seconds:02d}_cmkd{seed:08d}"
    if kv2_dir == "align_kv2":
        return stamp, f"{index:07d}"
    return f"{index:06d}_{stamp}_rgbf{index:06d}-resize", f"{index:07d}"


def write_frame(frame_dir: Path, stem: str, scene_class: str, frame: Mapping[str, Any], jpeg_quality: int) -> None:
    for sub in ("image", "depth", "depth_bfx"):
        (frame_dir / sub).mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(frame["rgb"]).save(buf, format="JPEG", quality=jpeg_quality)
    (frame_dir / "image" / f"{stem}.jpg").write_bytes(buf.getvalue())
    for sub in ("depth", "depth_bfx"):
        # Fast zlib level: noisy depth compresses slowly and the level does not change the format.
        Image.fromarray(frame[sub]).save(frame_dir / sub / f"{stem}.png", compress_level=1)
    k = frame["k"]
    (frame_dir / "intrinsics.txt").write_text("".join(f"{r[0]:.6f} {r[1]:.6f} {r[2]:.6f}\n" for r in k))
    (frame_dir / "scene.txt").write_text(scene_class)


def generate(raw_dir: str | Path, frames_per_class: int = 15, image_scale: float = 0.25, seed: int = 0,
             jpeg_quality: int = 90, progress: bool = True, classes=SCENE_CLASSES) -> Path:
    """Write the sample under `raw_dir/SUNRGBD` (atomically) and return that folder."""
    from tqdm.auto import tqdm

    raw_dir = Path(raw_dir)
    templates = _unit_templates()
    final = raw_dir / "SUNRGBD"
    jobs = [(c, ci, j) for ci, c in enumerate(classes) for j in range(int(frames_per_class))]
    with atomic_dir(final) as tmp:
        for index, (scene_class, class_index, j) in enumerate(tqdm(jobs, desc="render sunrgbd sample", disable=not progress)):
            rng = np.random.default_rng([int(seed), class_index, j])
            frame = render_frame(scene_class, rng, float(image_scale), templates)
            # Like SUN RGB-D, frames lie in both kv2 folders (every third one in align_kv2).
            kv2_dir = "align_kv2" if j % 3 == 2 else "kinect2data"
            folder, stem = frame_name(index, int(seed), kv2_dir)
            write_frame(tmp / "kv2" / kv2_dir / folder, stem, scene_class, frame, int(jpeg_quality))
    return final


# ----------------------------------------------------------------------------- the dataset

def validate(cfg: Mapping[str, Any], key: str) -> None:
    """Check `data.<sunrgbd sample>` (without `sample:`: the real data's settings, the reader's check)."""
    if "sample" not in cfg:
        sunrgbd.validate(cfg, key)
        return
    sunrgbd.validate_prepare(cfg, key)
    validate_sample(cfg["sample"], f"{key}.sample")


def download(cfg: Mapping[str, Any], raw_dir: Path, progress: bool = True) -> None:
    """Render the sample into `raw_dir` and write its manifest as the reader does for the real
    data (without `sample:`: the reader's download)."""
    if "sample" not in cfg:
        sunrgbd.download(cfg, raw_dir, progress)
        return
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    validate_sample(cfg["sample"], "data.<sunrgbd sample>.sample")
    root = generate(raw_dir, progress=progress, **cfg["sample"])
    # the generator's module name as recorded since the sample existed (the raw files stay identical)
    source = {"generated": "cmkd.data.sunrgbd_sample", "params": dict(cfg["sample"])}
    sunrgbd.record_download(raw_dir, root, cfg, source)


@register_dataset("sunrgbd-sample", "sunrgbd-sample-mm", "sunrgbd-sample-mm-rgb")
def prepare(cfg: Mapping[str, Any], raw_dir: Path, out_path: Path, progress: bool = True) -> None:
    """The rendered frames are prepared by the real reader."""
    sunrgbd.prepare(cfg, raw_dir, out_path, progress)


is_smoke_test = sunrgbd.is_smoke_test  # `sample:` settings: a smoke test
