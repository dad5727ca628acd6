"""A synthetic face generator: 68 landmarks with random pose, shape and expression, rendered to
an RGB "photo". Deterministic from a seed; the ground-truth landmarks and attributes are kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .draw import brow_width, part_shapes

SKIN_TONES = {
    "pale": (238, 208, 186),
    "light": (224, 180, 150),
    "tan": (198, 142, 102),
    "brown": (150, 100, 70),
    "dark": (96, 62, 44),
}
HAIR_COLOURS = {
    "black": (25, 22, 22),
    "brown": (95, 60, 35),
    "blond": (215, 180, 110),
    "red": (160, 60, 30),
    "grey": (165, 165, 170),
}
BACKGROUNDS = {
    "blue": (60, 100, 190),
    "green": (70, 150, 80),
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
    "purple": (120, 70, 160),
    "orange": (225, 140, 50),
}
EYE_COLOURS = {"brown": (90, 55, 30), "blue": (60, 110, 190), "green": (70, 130, 70)}


@dataclass
class FaceAttributes:
    """What the generator chose for one face; captions are built from these."""

    skin: str
    hair: str
    background: str
    eye_colour: str
    mouth_open: bool
    smiling: bool
    eyes_closed: bool
    brows_raised: bool
    bald: bool
    roll_deg: float
    yaw: float
    scale: float

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_landmarks(rng: np.random.Generator, attrs: FaceAttributes) -> np.ndarray:
    """68 points of a frontal face in a unit frame (face half-width 1, y down, origin mid-face)."""
    w = rng.uniform(0.85, 1.05)  # face half-width
    h = rng.uniform(1.05, 1.3)  # temple-to-chin height
    squareness = rng.uniform(0.6, 1.0)
    pts = np.zeros((68, 2))
    t = np.linspace(0.0, 1.0, 17)
    c = np.cos(np.pi * t)
    pts[0:17, 0] = -np.sign(c) * np.abs(c) ** squareness * w
    pts[0:17, 1] = -0.15 + np.sin(np.pi * t) * h

    eye_y = rng.uniform(-0.2, -0.08)
    eye_dx = rng.uniform(0.36, 0.46)
    ew = rng.uniform(0.14, 0.19)
    eh = 0.015 if attrs.eyes_closed else rng.uniform(0.06, 0.09)
    brow_y = eye_y - rng.uniform(0.16, 0.22) - (0.1 if attrs.brows_raised else 0.0)
    arch = rng.uniform(0.03, 0.08) + (0.04 if attrs.brows_raised else 0.0)
    bx = np.linspace(-0.82, -0.16, 5)
    by = brow_y - arch * np.sin(np.linspace(0.15, np.pi - 0.4, 5))
    pts[17:22] = np.stack([bx, by], 1)
    pts[22:27] = np.stack([-bx[::-1], by[::-1]], 1)

    nose_len = rng.uniform(0.38, 0.5)
    pts[27:31, 0] = 0.0
    pts[27:31, 1] = np.linspace(eye_y + 0.02, eye_y + nose_len, 4)
    nw = rng.uniform(0.16, 0.24)
    pts[31:36, 0] = np.linspace(-nw, nw, 5)
    pts[31:36, 1] = eye_y + nose_len + 0.06 + np.array([0.0, 0.03, 0.05, 0.03, 0.0])

    for cx, idx in ((-eye_dx, range(36, 42)), (eye_dx, range(42, 48))):
        shape = [(-ew, 0), (-ew / 3, -eh), (ew / 3, -eh), (ew, 0), (ew / 3, eh), (-ew / 3, eh)]
        pts[list(idx)] = [(cx + x, eye_y + y) for x, y in shape]

    my = eye_y + nose_len + rng.uniform(0.28, 0.36)
    mw = rng.uniform(0.3, 0.4) + (0.05 if attrs.smiling else 0.0)
    lift = 0.08 if attrs.smiling else 0.0
    lip_u = rng.uniform(0.05, 0.08)
    lip_l = rng.uniform(0.06, 0.1)
    gap = rng.uniform(0.12, 0.22) if attrs.mouth_open else 0.0
    xs_outer = np.array([-1, -0.6, -0.25, 0, 0.25, 0.6, 1]) * mw
    corner = my - lift
    upper = [(x, my - lip_u * (1 - abs(x) / mw) ** 0.5 - lift * (abs(x) / mw) ** 2) for x in xs_outer]
    upper[0] = (-mw, corner)
    upper[-1] = (mw, corner)
    lower = [(x, my + gap + lip_l * (1 - abs(x) / mw) ** 0.5 - lift * (abs(x) / mw) ** 2) for x in xs_outer[1:-1][::-1]]
    pts[48:55] = upper
    pts[55:60] = lower
    iw = mw * 0.8
    xs_inner = np.array([-1, -0.45, 0, 0.45, 1]) * iw
    inner_u = [(x, my - lift * (abs(x) / mw) ** 2 + 0.005) for x in xs_inner]
    inner_l = [(x, my + gap - lift * (abs(x) / mw) ** 2) for x in xs_inner[1:-1][::-1]]
    inner_u[0] = (-iw, corner + 0.01)
    inner_u[-1] = (iw, corner + 0.01)
    pts[60:65] = inner_u
    pts[65:68] = inner_l

    # Yaw: the inner features slide towards one side and the far half of the face narrows.
    inner = np.arange(17, 68)
    pts[inner, 0] += attrs.yaw * 0.35 * (1 - 0.3 * np.abs(pts[inner, 0]))
    far = pts[:, 0] * np.sign(attrs.yaw) > 0
    pts[far, 0] *= 1 - abs(attrs.yaw) * 0.35
    return pts


def random_attributes(rng: np.random.Generator) -> FaceAttributes:
    return FaceAttributes(
        skin=str(rng.choice(list(SKIN_TONES))),
        hair=str(rng.choice(list(HAIR_COLOURS))),
        background=str(rng.choice(list(BACKGROUNDS))),
        eye_colour=str(rng.choice(list(EYE_COLOURS))),
        mouth_open=bool(rng.random() < 0.4),
        smiling=bool(rng.random() < 0.4),
        eyes_closed=bool(rng.random() < 0.2),
        brows_raised=bool(rng.random() < 0.3),
        bald=bool(rng.random() < 0.1),
        roll_deg=float(rng.uniform(-25, 25)),
        yaw=float(rng.uniform(-0.5, 0.5)),
        scale=float(rng.uniform(0.75, 1.0)),
    )


def place(pts: np.ndarray, rng: np.random.Generator, attrs: FaceAttributes, size: int) -> np.ndarray:
    """Rotate, scale and translate canonical points into a ``size``-pixel image."""
    a = np.deg2rad(attrs.roll_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    half = attrs.scale * size * 0.4  # pixels per canonical unit; the head spans about 2 units
    margin = max(size / 2 - 1.05 * half, 0.0)
    centre = size / 2 + rng.uniform(-1, 1, 2) * margin
    return (pts - [0, 0.12]) @ rot.T * half + centre


def _shade(colour: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in colour)


def render(lm: np.ndarray, attrs: FaceAttributes, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """Paint a face "photo" from landmarks and attributes."""
    s = supersample
    big = size * s
    L = lm * s
    bg = np.array(BACKGROUNDS[attrs.background], dtype=np.float64) * rng.uniform(0.85, 1.1)
    ramp = np.linspace(1.1, 0.8, big)[:, None, None] if rng.random() < 0.5 else np.linspace(1.1, 0.8, big)[None, :, None]
    canvas = np.clip(np.broadcast_to(bg, (big, big, 3)) * ramp, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    d = ImageDraw.Draw(img)
    skin = _shade(SKIN_TONES[attrs.skin], rng.uniform(0.92, 1.08))
    hair = HAIR_COLOURS[attrs.hair]
    centre = L[:17].mean(0)
    width = np.linalg.norm(L[0] - L[16])
    up = L[[19, 24]].mean(0) - L[8]
    up /= np.linalg.norm(up) + 1e-8
    # Neck, then hair behind the head, then the head itself (jaw closed by a forehead arc).
    chin = L[8]
    side = np.array([-up[1], up[0]])
    neck_w = width * 0.28
    d.polygon(
        [
            tuple(chin - side * neck_w - up * width * 0.1),
            tuple(chin + side * neck_w - up * width * 0.1),
            tuple(chin + side * neck_w - up * width * 2),
            tuple(chin - side * neck_w - up * width * 2),
        ],
        fill=_shade(skin, 0.8),
    )
    top = centre + up * width * 0.55
    if not attrs.bald:
        r = width * 0.62
        d.ellipse([top[0] - r, top[1] - r, top[0] + r, top[1] + r], fill=hair)
    shapes = part_shapes(L)
    d.polygon(shapes["skin"][1], fill=skin)
    _, nose = shapes["nose"]
    d.polygon(nose, fill=_shade(skin, 0.88))
    for n in (31, 35):
        r = width * 0.018
        d.ellipse([L[n][0] - r, L[n][1] - r, L[n][0] + r, L[n][1] + r], fill=_shade(skin, 0.5))
    bw = max(1, round(brow_width(L)))
    for name in ("right_brow", "left_brow"):
        d.line(shapes[name][1], fill=_shade(hair, 0.7), width=bw, joint="curve")
    for name, idx in (("right_eye", slice(36, 42)), ("left_eye", slice(42, 48))):
        pts = shapes[name][1]
        if attrs.eyes_closed:
            d.polygon(pts, fill=_shade(skin, 0.75))
            d.line([pts[0], pts[4], pts[5], pts[3]], fill=_shade(skin, 0.4), width=max(1, bw // 3))
        else:
            d.polygon(pts, fill=(245, 245, 240))
            c = L[idx].mean(0)
            r = np.linalg.norm(L[idx][1] - L[idx][5]) * 0.5
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=EYE_COLOURS[attrs.eye_colour])
            d.ellipse([c[0] - r / 2, c[1] - r / 2, c[0] + r / 2, c[1] + r / 2], fill=(10, 10, 10))
    lip = _shade((200, 80, 90), rng.uniform(0.8, 1.1))
    d.polygon(shapes["upper_lip"][1], fill=lip)
    d.polygon(shapes["lower_lip"][1], fill=_shade(lip, 1.08))
    if attrs.mouth_open:
        d.polygon(shapes["inner_mouth"][1], fill=(60, 15, 20))
        teeth = L[[60, 61, 62, 63, 64]]
        d.line([tuple(p) for p in teeth], fill=(240, 240, 230), width=max(1, bw // 2))
    out = img.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(0.3))
    arr = np.asarray(out, dtype=np.float64) + rng.normal(0, 4.0, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_face(seed: int, size: int) -> tuple[Image.Image, np.ndarray, FaceAttributes]:
    """One synthetic sample: (photo, landmarks (68, 2) in pixels, attributes)."""
    rng = np.random.default_rng(seed)
    attrs = random_attributes(rng)
    lm = place(canonical_landmarks(rng, attrs), rng, attrs, size)
    return render(lm, attrs, size, rng), lm.astype(np.float32), attrs


def describe(attrs: FaceAttributes) -> str:
    """A caption from the generator's known attributes."""
    hair = "bald" if attrs.bald else f"{attrs.hair} hair"
    parts = [f"a face with {attrs.skin} skin and {hair}"]
    if attrs.smiling:
        parts.append("smiling")
    if attrs.mouth_open:
        parts.append("open mouth")
    if attrs.eyes_closed:
        parts.append("closed eyes")
    else:
        parts.append(f"{attrs.eye_colour} eyes")
    if attrs.brows_raised:
        parts.append("raised eyebrows")
    return ", ".join(parts) + f", on a {attrs.background} background"


# Every word :func:`describe` can write, for tokenizers that should see each as one token.
CAPTION_WORDS = sorted(
    {*SKIN_TONES, *HAIR_COLOURS, *BACKGROUNDS, *EYE_COLOURS}
    | set(
        [
            "a",
            "face",
            "with",
            "skin",
            "and",
            "hair",
            "bald",
            "smiling",
            "open",
            "mouth",
            "closed",
            "eyes",
            "raised",
            "eyebrows",
            "on",
            "background",
        ]
    )
)
