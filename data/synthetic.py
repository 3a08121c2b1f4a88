"""Synthetic video benchmark with exact optical flow, in the spirit of Flying Chairs.

Textured shapes (disc, box, triangle, cross) move, turn and grow over a textured background
seen by a panning, zooming camera under a slowly varying gain. Each layer (the background and
every object) is a similarity transform of its own coordinates into the image, so the flow
between any two frames is analytic. Everything is drawn from ``np.random.default_rng(seed)``
and is a function of absolute time, so a shorter clip is a prefix of a longer one.

The motion regime is the one DFF is built for: objects 48-96 px across (3-6 feature cells at
stride 16) move about 0.5 px per frame (95th percentile 1.2), the camera drifts 0.1-0.5 px per
frame, so over a 10-frame key interval things move a fraction of their size. With objects
half that size moving 2-4× faster, even warping along the exact flow lost 15+ mIoU points at
k=10 (disocclusion and border effects on the stride-16 grid), so the benchmark no longer
measured the method but the limits of any stride-16 feature warp.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "box", "triangle", "cross")
DETECTION_CLASS_NAMES: tuple[str, ...] = CLASS_NAMES[1:]  # detection class i is label i + 1
EVAL_FRAMES = 60
# An object is an ignore region (docs/DESIGN.md §14) when fewer pixels than this are visible
# (one stride-16 cell), or less than this fraction of its whole silhouette is.
IGNORE_MIN_PIXELS = 256
IGNORE_MIN_VISIBLE = 0.25
EVAL_SEEDS: tuple[int, ...] = tuple(10_000_000 + i for i in range(20))

_EDGE_MARGIN = 1.5  # image px: flow within this distance of a visible edge is invalid
_HUES = {1: ((-12, 25),), 2: ((200, 235),), 3: ((95, 140),), 4: ((50, 62), (285, 320))}
_DISC, _BOX, _TRIANGLE, _CROSS = 1, 2, 3, 4


@dataclass(frozen=True)
class _Shape:
    cls: int  # class id, 1..4
    params: tuple[float, ...]  # shape size in the object's own coordinates (see _shape_sd)
    radius: float  # distance from the origin to the farthest shape point


@dataclass(frozen=True)
class _Texture:
    planes: np.ndarray  # [3, n*n] colour at an n×n periodic lattice, row-major (see _ease)
    size: int  # n
    cell: float  # lattice spacing in the layer's own coordinates
    offset: tuple[float, float]
    wave: tuple[float, float, float, float]  # kx, ky, phase, amplitude (added to all channels)


@dataclass
class Clip:
    """One rendered clip plus the per-frame layer poses needed for its exact flow."""

    frames: np.ndarray  # uint8 [T,H,W,3] RGB
    labels: np.ndarray  # uint8 [T,H,W] class id
    instances: np.ndarray  # int16 [T,H,W]: 0 background, i+1 object i (topmost visible)
    boxes: list[np.ndarray]  # per frame float32 [M_t,4] x0,y0,x1,y1 (x1,y1 exclusive)
    box_classes: list[np.ndarray]  # per frame int64 [M_t]: segmentation label (1..4)
    box_pixels: list[np.ndarray]  # per frame int64 [M_t]: visible pixels (top layer, in view)
    box_visible: list[np.ndarray]  # per frame float32 [M_t]: of the whole silhouette, visible
    box_ignore: list[np.ndarray]  # per frame bool [M_t]: ignore region (see is_ignore)
    gains: np.ndarray  # float64 [T]
    poses: np.ndarray = field(repr=False)  # [T, 1+objects, 4]: scale, angle, bx, by
    shapes: tuple[_Shape, ...] = field(repr=False)

    def flow(self, current: int, key: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact flow float32 [2,H,W] from `current` to `key` (key sampled at p + flow
        reproduces current) and a bool [H,W] mask, False where the point is hidden in `key`,
        outside it, or within ~1.5 px of a visible object edge in either frame."""
        height, width = self.instances.shape[1:]
        inst = self.instances[current].astype(np.intp)
        rel = _relative_affine(self.poses[current], self.poses[key])[inst]  # [H,W,2,3]
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
        qx = rel[..., 0, 0] * xs + rel[..., 0, 1] * ys + rel[..., 0, 2]
        qy = rel[..., 1, 0] * xs + rel[..., 1, 1] * ys + rel[..., 1, 2]
        valid = (qx >= 0) & (qx <= width - 1) & (qy >= 0) & (qy <= height - 1)
        for k, shape in enumerate(self.shapes):
            layer = k + 1
            for pose, px, py in ((self.poses[current, layer], xs, ys),
                                 (self.poses[key, layer], qx, qy)):
                reach = pose[0] * shape.radius + _EDGE_MARGIN + 1.0
                sel = (valid & (inst <= layer) & (np.abs(px - pose[2]) <= reach)
                       & (np.abs(py - pose[3]) <= reach))
                if not sel.any():
                    continue
                sd = _shape_sd(shape, *_to_local(pose, px[sel], py[sel])) * pose[0]
                # Own layer: near its edge. Layers above: covering the point or near their edge.
                bad = np.where(inst[sel] == layer, sd > -_EDGE_MARGIN, sd < _EDGE_MARGIN)
                valid[sel] = ~bad
        flow = np.stack([qx - xs, qy - ys]).astype(np.float32)
        return flow, valid


def is_ignore(pixels: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """The ignore rule: fewer than IGNORE_MIN_PIXELS visible pixels, or less than
    IGNORE_MIN_VISIBLE of the silhouette (in and out of the image) visible."""
    return (np.asarray(pixels) < IGNORE_MIN_PIXELS) | (np.asarray(visible) < IGNORE_MIN_VISIBLE)


def make_clip(seed: int, num_frames: int = 60, height: int = 128, width: int = 224,
              times: np.ndarray | None = None) -> Clip:
    """Render clip `seed`: frames, labels, instances, boxes and the poses for exact flow.
    `times` (float [num_frames], default 0, 1, 2, ...) are the scene's times of the frames:
    every motion is a function of time, so spacing them d apart plays the scene d times as
    fast (dff.data.motion builds its motion categories and bursts so)."""
    rng = np.random.default_rng(seed)
    if times is None:
        t = np.arange(num_frames, dtype=np.float64)
    else:
        t = np.asarray(times, dtype=np.float64)
        if t.shape != (num_frames,):
            raise ValueError(f"times: shape {t.shape}, expected ({num_frames},)")
    camera, zoom, gains = _camera(rng, t)
    centre = np.array([width / 2, height / 2])
    num_objects = int(rng.integers(2, 5))
    shapes = tuple(_make_shape(rng, int(rng.integers(1, 5))) for _ in range(num_objects))
    textures = [_make_texture(rng, 32, (8.0, 14.0), _background_colour(rng), 22.0)]
    textures += [_make_texture(rng, 16, (7.0, 11.0), _object_colour(rng, s.cls), 20.0)
                 for s in shapes]
    poses = np.empty((num_frames, 1 + num_objects, 4))
    poses[:, 0] = np.column_stack([zoom, np.zeros_like(t), *(centre - zoom[:, None] * camera).T])
    for k in range(num_objects):
        rel, angle, scale = _object_motion(rng, t, width, height)
        poses[:, k + 1] = np.column_stack(
            [zoom * scale, angle, *(centre + zoom[:, None] * rel).T])
    return _render(poses, shapes, textures, gains, height, width)


def eval_split(height: int = 128, width: int = 224) -> Iterator[Clip]:
    """The fixed evaluation split: one clip of EVAL_FRAMES frames per seed in EVAL_SEEDS."""
    for seed in EVAL_SEEDS:
        yield make_clip(seed, EVAL_FRAMES, height, width)


def train_seeds(count: int, start: int = 0) -> list[int]:
    """`count` consecutive training seeds from `start`, never overlapping EVAL_SEEDS."""
    if start < 0 or start + count > EVAL_SEEDS[0]:
        raise ValueError(f"training seeds must lie in [0, {EVAL_SEEDS[0]}); "
                         f"got start={start}, count={count}")
    return list(range(start, start + count))


# ---------------------------------------------------------------- scene parameters


def _sine(rng: np.random.Generator, t: np.ndarray, amplitude: float,
          period: tuple[float, float]) -> np.ndarray:
    """A random sinusoid over absolute time t, within ±amplitude."""
    omega = 2 * np.pi / rng.uniform(*period)
    return amplitude * np.sin(omega * t + rng.uniform(0, 2 * np.pi))


def _camera(rng: np.random.Generator, t: np.ndarray):
    """World pan c_t [T,2] (0.1-0.5 px/frame drift plus a slow sway), zoom z_t in ~0.9..1.12,
    gain g_t ~0.85..1.15."""
    direction = rng.uniform(0, 2 * np.pi)
    velocity = rng.uniform(0.1, 0.5) * np.array([np.cos(direction), np.sin(direction)])
    camera = t[:, None] * velocity + np.column_stack(
        [_sine(rng, t, rng.uniform(0, 3), (70, 160)) for _ in range(2)])
    zoom = rng.uniform(0.97, 1.04) * np.exp(
        _sine(rng, t, rng.uniform(0, 0.035), (90, 200)) + rng.uniform(-0.035, 0.035))
    gains = 1 + _sine(rng, t, rng.uniform(0, 0.05), (40, 120)) + \
        _sine(rng, t, rng.uniform(0, 0.025), (15, 40)) + rng.uniform(-0.07, 0.07)
    return camera, zoom, gains


def _object_motion(rng: np.random.Generator, t: np.ndarray, width: int, height: int):
    """Position relative to the camera (world units) [T,2], angle [T], scale [T]."""
    mid = EVAL_FRAMES / 2  # in view around mid-clip, so mostly in view over EVAL_FRAMES
    pos_mid = rng.uniform(-0.4, 0.4, 2) * np.array([width, height])
    speed = rng.uniform(0.1, 0.7) if rng.random() < 0.85 else rng.uniform(0.7, 1.4)
    direction = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.cos(direction), np.sin(direction)])
    curve = np.column_stack([_sine(rng, t - mid, rng.uniform(0, 4), (80, 200))
                             for _ in range(2)])
    rel = pos_mid + (t - mid)[:, None] * velocity + curve
    angle = rng.uniform(0, 2 * np.pi) + np.deg2rad(rng.uniform(-0.6, 0.6)) * t
    scale = 1 + _sine(rng, t - mid, rng.uniform(0, 0.15), (100, 240))
    return rel, angle, scale


def _make_shape(rng: np.random.Generator, cls: int) -> _Shape:
    half = rng.uniform(48, 96) / 2  # half the object's extent at scale 1
    if cls == _DISC:
        minor = half * rng.uniform(0.6, 1.0)
        return _Shape(cls, (half, minor), half)
    if cls == _BOX:
        short = half * rng.uniform(0.5, 1.0)
        return _Shape(cls, (half, short), float(np.hypot(half, short)))
    if cls == _TRIANGLE:
        angles = np.deg2rad(-90 + 120 * np.arange(3) + rng.uniform(-12, 12, 3))
        radii = half * rng.uniform(0.85, 1.0, 3)
        vertices = np.column_stack([radii * np.cos(angles), radii * np.sin(angles)])
        return _Shape(cls, tuple(vertices.ravel()), float(radii.max()))
    arm, bar = half, half * rng.uniform(0.22, 0.35)
    other = half * rng.uniform(0.8, 1.0)
    return _Shape(cls, (arm, bar, other), float(np.hypot(max(arm, other), bar)))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return 255.0 * np.array(colorsys.hsv_to_rgb((h / 360.0) % 1.0, s, v))


def _object_colour(rng: np.random.Generator, cls: int) -> np.ndarray:
    ranges = _HUES[cls]
    lo, hi = ranges[int(rng.integers(len(ranges)))]
    return _hsv(rng.uniform(lo, hi), rng.uniform(0.6, 0.95), rng.uniform(0.55, 0.78))


def _background_colour(rng: np.random.Generator) -> np.ndarray:
    """Browns, greys or teals at low saturation, so saturation and hue set objects apart."""
    family = int(rng.integers(3))
    hue = rng.uniform(*((20, 45), (0, 360), (165, 195))[family])
    sat = rng.uniform(*((0.1, 0.35), (0.0, 0.08), (0.08, 0.3))[family])
    return _hsv(hue, sat, rng.uniform(0.3, 0.65))


def _make_texture(rng: np.random.Generator, n: int, cell: tuple[float, float],
                  colour: np.ndarray, contrast: float) -> _Texture:
    """Smooth colour texture: lattice noise (luminance + weak chroma) plus a low sinusoid."""
    luma = np.clip(rng.normal(0, contrast, (n, n, 1)), -2.2 * contrast, 2.2 * contrast)
    chroma = rng.normal(0, contrast / 3.5, (n, n, 3))
    # Bounded so that the texture plus wave stays within 10..215: gain ≤ 1.15 never saturates.
    grid = np.clip(colour + luma + chroma, 25, 200)
    wavelength, direction = rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
    k = 2 * np.pi / wavelength
    wave = (k * np.cos(direction), k * np.sin(direction), rng.uniform(0, 2 * np.pi),
            rng.uniform(6, 15))
    planes = np.ascontiguousarray(grid.reshape(n * n, 3).T)
    return _Texture(planes, n, rng.uniform(*cell), tuple(rng.uniform(0, n, 2)), wave)


# ---------------------------------------------------------------- geometry


def _to_local(pose: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Image -> layer coordinates for pose (scale a, angle θ, bx, by): x = a R(θ) u + b."""
    a, angle, bx, by = pose
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - bx, y - by
    return (c * dx + s * dy) / a, (c * dy - s * dx) / a


def _relative_affine(pose_from: np.ndarray, pose_to: np.ndarray) -> np.ndarray:
    """Per layer [L,2,3] affine taking image points of frame `from` to frame `to`."""
    ratio = pose_to[:, 0] / pose_from[:, 0]
    turn = pose_to[:, 1] - pose_from[:, 1]
    c, s = ratio * np.cos(turn), ratio * np.sin(turn)
    bx0, by0, bx1, by1 = pose_from[:, 2], pose_from[:, 3], pose_to[:, 2], pose_to[:, 3]
    return np.stack([np.stack([c, -s, bx1 - c * bx0 + s * by0], -1),
                     np.stack([s, c, by1 - s * bx0 - c * by0], -1)], -2)


def _box_sd(u: np.ndarray, v: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(u) - hx, np.abs(v) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _shape_sd(shape: _Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance in the object's own units, negative inside (ellipse: close estimate)."""
    p = shape.params
    if shape.cls == _DISC:
        ra, rb = p
        k0 = np.hypot(u / ra, v / rb)
        k1 = np.maximum(np.hypot(u / ra**2, v / rb**2), 1e-12)
        return np.where(k0 > 0.5, k0 * (k0 - 1) / k1, (k0 - 1) * min(ra, rb))
    if shape.cls == _BOX:
        return _box_sd(u, v, p[0], p[1])
    if shape.cls == _CROSS:
        return np.minimum(_box_sd(u, v, p[0], p[1]), _box_sd(u, v, p[1], p[2]))
    verts = np.array(p).reshape(3, 2)
    (ax, ay), (bx, by) = verts[1] - verts[0], verts[2] - verts[0]
    orient = np.sign(ax * by - ay * bx)
    dist2 = np.full(np.shape(u), np.inf)
    inside = np.ones(np.shape(u), bool)
    for i in range(3):
        (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % 3]
        ex, ey, wx, wy = x1 - x0, y1 - y0, u - x0, v - y0
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0, 1)
        dist2 = np.minimum(dist2, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        inside &= orient * (ex * wy - ey * wx) >= 0
    return np.where(inside, -1.0, 1.0) * np.sqrt(dist2)


def _ease(f: np.ndarray) -> np.ndarray:
    """Smoothstep weights: the lattice interpolation is C1, so warping it bilinearly is
    accurate to a fraction of a grey level (plain bilinear has kinks at cell borders)."""
    return f * f * (3 - 2 * f)


def _sample_texture(tex: _Texture, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture colour [...,3] at layer coordinates (u, v): periodic lattice + wave."""
    n = tex.size
    gx, gy = u / tex.cell + tex.offset[0], v / tex.cell + tex.offset[1]
    fx, fy = np.floor(gx), np.floor(gy)
    wx, wy = _ease(gx - fx), _ease(gy - fy)
    x0, y0 = fx.astype(np.intp) % n, fy.astype(np.intp) % n
    x1, r1 = (x0 + 1) % n, (y0 + 1) % n * n
    r0 = y0 * n
    kx, ky, phase, amplitude = tex.wave
    wave = amplitude * np.sin(kx * u + ky * v + phase)
    out = np.empty(np.shape(u) + (3,))
    for c, plane in enumerate(tex.planes):  # 1-D take per channel: faster than [n,n,3] gathers
        top = plane.take(r0 + x0)
        top += wx * (plane.take(r0 + x1) - top)
        bottom = plane.take(r1 + x0)
        bottom += wx * (plane.take(r1 + x1) - bottom)
        out[..., c] = top + wy * (bottom - top) + wave
    return out


# ---------------------------------------------------------------- rendering


def _render(poses: np.ndarray, shapes: tuple[_Shape, ...], textures: list[_Texture],
            gains: np.ndarray, height: int, width: int) -> Clip:
    """Composite layers back to front at integer pixel centres; soft alpha, hard labels."""
    num_frames = poses.shape[0]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    instances = np.zeros((num_frames, height, width), np.int16)
    class_of = np.array([0] + [s.cls for s in shapes], np.uint8)
    boxes, box_classes, box_pixels, box_visible = [], [], [], []
    for t in range(num_frames):
        image = _sample_texture(textures[0], *_to_local(poses[t, 0], xs, ys))
        inst = instances[t]
        crops, areas = [], []
        for k, shape in enumerate(shapes):
            pose = poses[t, k + 1]
            reach = pose[0] * shape.radius + 1.0
            x0, x1 = max(0, int(pose[2] - reach)), min(width, int(np.ceil(pose[2] + reach)) + 1)
            y0, y1 = max(0, int(pose[3] - reach)), min(height, int(np.ceil(pose[3] + reach)) + 1)
            crops.append((x0, x1, y0, y1))
            if x0 >= x1 or y0 >= y1:
                areas.append(0)
                continue
            u, v = _to_local(pose, xs[y0:y1, x0:x1], ys[y0:y1, x0:x1])
            sd = _shape_sd(shape, u, v) * pose[0]  # image pixels
            alpha = np.clip(0.5 - sd, 0, 1)[..., None]  # ~1 px ramp, 0.5 on the hard edge
            region = image[y0:y1, x0:x1]
            region += alpha * (_sample_texture(textures[k + 1], u, v) - region)
            inst[y0:y1, x0:x1][sd <= 0] = k + 1
            whole = x0 <= pose[2] - reach and x1 - 1 >= pose[2] + reach and \
                y0 <= pose[3] - reach and y1 - 1 >= pose[3] + reach  # the crop holds it all
            areas.append(int((sd <= 0).sum()) if whole else _silhouette_pixels(shape, pose))
        frames[t] = np.clip(np.rint(image * gains[t]), 0, 255).astype(np.uint8)
        frame_boxes, frame_classes, frame_pixels, frame_visible = [], [], [], []
        for k, (x0, x1, y0, y1) in enumerate(crops):
            mask = inst[y0:y1, x0:x1] == k + 1
            if x0 >= x1 or y0 >= y1 or not mask.any():
                continue
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            frame_boxes.append([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1])
            frame_classes.append(shapes[k].cls)
            frame_pixels.append(int(mask.sum()))
            frame_visible.append(frame_pixels[-1] / max(areas[k], frame_pixels[-1]))
        boxes.append(np.array(frame_boxes, np.float32).reshape(-1, 4))
        box_classes.append(np.array(frame_classes, np.int64))
        box_pixels.append(np.array(frame_pixels, np.int64))
        box_visible.append(np.array(frame_visible, np.float32))
    return Clip(frames=frames, labels=class_of[instances], instances=instances, boxes=boxes,
                box_classes=box_classes, box_pixels=box_pixels, box_visible=box_visible,
                box_ignore=[is_ignore(p, v) for p, v in zip(box_pixels, box_visible)],
                gains=np.asarray(gains, np.float64), poses=poses, shapes=shapes)


def _silhouette_pixels(shape: _Shape, pose: np.ndarray) -> int:
    """Pixel centres inside the whole silhouette, on a grid not clipped to the image."""
    reach = pose[0] * shape.radius + 1.0
    x0, x1 = int(np.floor(pose[2] - reach)), int(np.ceil(pose[2] + reach)) + 1
    y0, y1 = int(np.floor(pose[3] - reach)), int(np.ceil(pose[3] + reach)) + 1
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    return int((_shape_sd(shape, *_to_local(pose, xs, ys)) <= 0).sum())
