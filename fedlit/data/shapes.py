"""A procedural "shapes world": coloured shapes on varied backgrounds, rendered offline.

Every image shows one object: a *colour* (8) × *shape* (6) combination, so there are 48 classes with
``label = colour_idx * len(SHAPES) + shape_idx`` and class name ``f"{colour} {shape}"``. Nuisance attributes
(object size, position on a 3×3 grid with jitter, brightness) are drawn per image from an explicitly seeded
:class:`numpy.random.Generator`.

* :data:`HELD_OUT` lists 12 combinations that never appear in pretraining
  (:func:`sample_pretraining_batch`), so downstream "novel" classes can be truly unseen compositions.
* :data:`DOMAINS` are rendering styles: ``clean`` is the pretraining domain; ``textured``, ``noisy``, ``dark`` and
  ``stripes`` are shifted downstream domains that make zero-shot harder while staying easy for a human.

Rendering is fully vectorised (numpy + one torch interpolation), deterministic given the seed, and draws the
object attributes *before* anything domain-specific: the same seed gives the same objects (colour, shape, size,
position, brightness) in every domain, only backgrounds and noise differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lazy import lazy
from fedlit.errors import FedlitError, unknown_name

torch = lazy("torch", __name__, "torch")
F = lazy("torch.nn.functional", __name__, "F")

__all__ = [
    "COLOURS",
    "COLOUR_RGB",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "HELD_OUT",
    "HELD_OUT_LABELS",
    "SEEN_LABELS",
    "NUM_CLASSES",
    "TEMPLATES",
    "Domain",
    "DOMAINS",
    "label_of",
    "class_names",
    "render",
    "caption",
    "sample_pretraining_batch",
]

#: Colour names, in label order, and their RGB values (0-255), chosen to be distinct from each other and from
#: the grey backgrounds.
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink")
COLOUR_RGB: np.ndarray = np.array(
    [
        (220, 30, 30),  # red
        (30, 170, 40),  # green
        (30, 60, 230),  # blue
        (240, 220, 30),  # yellow
        (150, 40, 190),  # purple
        (250, 135, 20),  # orange
        (30, 215, 225),  # cyan
        (250, 120, 200),  # pink
    ],
    dtype=np.float32,
)
#: Shape names, in label order; each is an analytic region of the plane (see ``_shape_mask``).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
#: Size words and the object radius for each, as a fraction of the image side.
SIZES: tuple[str, ...] = ("small", "medium", "large")
_SIZE_RADIUS = np.array([0.16, 0.22, 0.29], dtype=np.float32)
#: Position words: a 3×3 grid in row-major order (index = row * 3 + col).
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
_GRID = np.array([0.3, 0.5, 0.7], dtype=np.float32)  # centre of each row / column, fraction of the side
_JITTER = 0.04  # max position jitter, fraction of the side

NUM_CLASSES = len(COLOURS) * len(SHAPES)

#: (colour_idx, shape_idx) combinations never shown in pretraining. Six with labels < 24 (colours 0-3) and six
#: with labels >= 24 (colours 4-7); each half covers all six shapes, and every colour appears at least once.
HELD_OUT: tuple[tuple[int, int], ...] = (
    (0, 0), (0, 3), (1, 1), (2, 2), (2, 5), (3, 4),
    (4, 1), (4, 4), (5, 2), (6, 0), (6, 3), (7, 5),
)  # fmt: skip


def label_of(colour: int | np.ndarray, shape: int | np.ndarray) -> int | np.ndarray:
    """Class label of a (colour, shape) index pair: ``colour * len(SHAPES) + shape``."""
    return colour * len(SHAPES) + shape


HELD_OUT_LABELS: tuple[int, ...] = tuple(sorted(label_of(c, s) for c, s in HELD_OUT))
SEEN_LABELS: tuple[int, ...] = tuple(i for i in range(NUM_CLASSES) if i not in HELD_OUT_LABELS)


def class_names() -> list[str]:
    """The 48 class names in label order, e.g. ``"red circle"``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class Domain:
    """How one domain is rendered. Grey levels are 0-255.

    Attributes:
        background: Word used in captions (``"a red circle on a {background} background."``).
        bg_level: (low, high) range of the per-image background grey level.
        noise_std: Std of the i.i.d. Gaussian pixel noise.
        texture_amp: Amplitude of a smooth random grey texture added to the background (0 = none).
        stripes: Draw the background as grey stripes with random angle, period and phase.
        stripe_levels: (low, high) ranges of the dark and the light stripe grey level.
        object_gain: Multiplies the object colour (< 1 = darker, lower contrast).
        brightness_jitter: Per-image object brightness factor is uniform in ``1 ± brightness_jitter``.
        tint_std: Std of a per-image, per-channel additive jitter of the object colour.
    """

    background: str
    bg_level: tuple[float, float] = (100.0, 200.0)
    noise_std: float = 4.0
    texture_amp: float = 0.0
    stripes: bool = False
    stripe_levels: tuple[tuple[float, float], tuple[float, float]] = ((40.0, 90.0), (170.0, 230.0))
    object_gain: float = 1.0
    brightness_jitter: float = 0.08
    tint_std: float = 6.0


#: Rendering domains by name. ``clean`` is the pretraining domain; the others are shifted downstream domains.
DOMAINS: dict[str, Domain] = {
    "clean": Domain(background="plain"),
    "textured": Domain(background="textured", bg_level=(90.0, 170.0), noise_std=12.0, texture_amp=55.0,
                       brightness_jitter=0.15, tint_std=12.0),
    "noisy": Domain(background="noisy", bg_level=(100.0, 190.0), noise_std=50.0),
    "dark": Domain(background="dark", bg_level=(5.0, 35.0), noise_std=5.0, object_gain=0.5,
                   brightness_jitter=0.15),
    "stripes": Domain(background="striped", noise_std=6.0, stripes=True),
}  # fmt: skip

#: Caption templates; ``{size}``, ``{pos}`` and ``{background}`` are filled with words from :data:`SIZES`,
#: :data:`POSITIONS` and the domain. Template 0 is the CLIP-style class template.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {colour} {shape}.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape} at the {pos}.",
    "a photo of a {size} {colour} {shape} at the {pos}.",
    "a {colour} {shape} on a {background} background.",
    "a {size} {colour} {shape} on a {background} background, at the {pos}.",
    "a picture showing a {colour} {shape}.",
)


def _domain(domain: str | Domain) -> Domain:
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise unknown_name("domain", domain, list(DOMAINS))
    return DOMAINS[domain]


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in object coordinates (``u`` right, ``v`` down, radius 1)."""
    au, av = np.abs(u), np.abs(v)
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (au <= 0.82) & (av <= 0.82)
    if name == "triangle":  # pointing up, apex at v = -0.95, base at v = 0.75
        return (v <= 0.75) & (au <= 0.6 * (v + 0.95))
    if name == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.25)
    if name == "diamond":
        return au + av <= 1.05
    raise AssertionError(name)  # pragma: no cover


def _cubic_upsampler(cells: int, size: int) -> np.ndarray:
    """Matrix [size, cells] that upsamples a 1-D signal of ``cells`` values to ``size`` (bicubic weights)."""
    eye = torch.eye(cells, dtype=torch.float32)[:, None, None, :]  # [cells, 1, 1, cells]
    return F.interpolate(eye, size=(1, size), mode="bicubic", align_corners=False)[:, 0, 0, :].T.numpy()


def _smooth_texture(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth grey texture in about [-1, 1], shape [n, 1, size, size]: two octaves of upsampled noise."""
    out = np.zeros((n, size, size), dtype=np.float32)
    for cells, weight in ((4, 0.65), (9, 0.35)):
        grid = rng.uniform(-1.0, 1.0, (n, cells, cells)).astype(np.float32)
        up = _cubic_upsampler(cells, size)  # separable: rows, then columns
        out += weight * np.matmul(np.matmul(up, grid), up.T)
    return out[:, None]


def _background(dom: Domain, rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Background images [n, 1 or 3, size, size] (float32, grey levels)."""
    if dom.stripes:
        (lo_a, lo_b), (hi_a, hi_b) = dom.stripe_levels
        lo = rng.uniform(lo_a, lo_b, n).astype(np.float32)
        hi = rng.uniform(hi_a, hi_b, n).astype(np.float32)
        theta = rng.integers(0, 4, n) * (np.pi / 4)
        freq = (2 * np.pi / (rng.uniform(4.0, 8.0, n) * (size / 32))).astype(np.float32)  # 1 / period
        phase = rng.uniform(0.0, 2 * np.pi, n).astype(np.float32)
        coord = np.arange(size, dtype=np.float32) + 0.5
        fx = (np.cos(theta) * freq)[:, None, None].astype(np.float32)
        fy = (np.sin(theta) * freq)[:, None, None].astype(np.float32)
        on = np.sin(fx * coord[None, None, :] + fy * coord[None, :, None] + phase[:, None, None]) > 0
        bg = np.where(on, hi[:, None, None], lo[:, None, None])[:, None]
    else:
        level = rng.uniform(*dom.bg_level, n).astype(np.float32)
        bg = np.broadcast_to(level[:, None, None, None], (n, 1, size, size))
    if dom.texture_amp > 0:
        bg = bg + dom.texture_amp * _smooth_texture(rng, n, size)
        bg = bg + rng.normal(0.0, 6.0, (n, 3, 1, 1)).astype(np.float32)  # a faint per-image tint
    return bg


def render(
    colour: int | np.ndarray,
    shape: int | np.ndarray,
    domain: str | Domain = "clean",
    seed: int = 0,
    size: int = 32,
    *,
    size_idx: np.ndarray | None = None,
    pos_idx: np.ndarray | None = None,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """Render one image per (colour, shape) pair.

    Args:
        colour: Colour indices into :data:`COLOURS`, shape [N] (a scalar is broadcast).
        shape: Shape indices into :data:`SHAPES`, shape [N] (a scalar is broadcast).
        domain: A name from :data:`DOMAINS` or a :class:`Domain`.
        seed: Seed of the numpy Generator; the output is a pure function of the arguments.
        size: Image side in pixels.
        size_idx: Optional fixed size indices [N] (replace the random ones; the random stream is unchanged).
        pos_idx: Optional fixed position indices [N], likewise.

    Returns:
        ``(images, attrs)``: images is a uint8 tensor [N, 3, size, size]; attrs maps ``colour``, ``shape``,
        ``size``, ``pos`` to int64 arrays [N] (``size`` indexes :data:`SIZES`, ``pos`` :data:`POSITIONS`).

    Raises:
        FedlitError: On an unknown domain or out-of-range indices.
    """
    dom = _domain(domain)
    colour, shape = np.broadcast_arrays(np.atleast_1d(np.asarray(colour, dtype=np.int64)),
                                        np.atleast_1d(np.asarray(shape, dtype=np.int64)))  # fmt: skip
    colour, shape = colour.reshape(-1).copy(), shape.reshape(-1).copy()
    if colour.size and (colour.min() < 0 or colour.max() >= len(COLOURS)):
        raise FedlitError(f"colour indices must be in [0, {len(COLOURS)}); got {colour.min()}..{colour.max()}")
    if shape.size and (shape.min() < 0 or shape.max() >= len(SHAPES)):
        raise FedlitError(f"shape indices must be in [0, {len(SHAPES)}); got {shape.min()}..{shape.max()}")
    n = colour.size
    rng = np.random.default_rng(seed)

    # 1. Object attributes (drawn first and identically for every domain).
    sz = rng.integers(0, len(SIZES), n)
    pos = rng.integers(0, len(POSITIONS), n)
    jitter = rng.uniform(-_JITTER, _JITTER, (n, 2)).astype(np.float32) * size
    bright = rng.uniform(1 - dom.brightness_jitter, 1 + dom.brightness_jitter, n).astype(np.float32)
    tint = rng.normal(0.0, 1.0, (n, 3)).astype(np.float32) * dom.tint_std
    if size_idx is not None:
        sz = np.broadcast_to(np.asarray(size_idx, dtype=np.int64), (n,)).copy()
    if pos_idx is not None:
        pos = np.broadcast_to(np.asarray(pos_idx, dtype=np.int64), (n,)).copy()

    # 2. Background, 3. pixel noise (domain-specific draws).
    bg = _background(dom, rng, n, size)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**63)))  # torch's randn is ~2x faster

    # Object mask in per-image normalised coordinates.
    cx = _GRID[pos % 3] * size + jitter[:, 0]
    cy = _GRID[pos // 3] * size + jitter[:, 1]
    radius = _SIZE_RADIUS[sz] * size
    coord = np.arange(size, dtype=np.float32) + 0.5
    mask = np.zeros((n, size, size), dtype=bool)
    for s in np.unique(shape):
        idx = np.flatnonzero(shape == s)
        r = radius[idx, None, None]
        u = (coord[None, None, :] - cx[idx, None, None]) / r
        v = (coord[None, :, None] - cy[idx, None, None]) / r
        mask[idx] = _shape_mask(int(s), u, v)

    obj = COLOUR_RGB[colour] * (dom.object_gain * bright[:, None]) + tint  # [n, 3]
    img = torch.from_numpy(np.where(mask[:, None], obj[:, :, None, None], bg))
    if dom.noise_std > 0:
        img.add_(torch.randn(img.shape, generator=noise_gen), alpha=dom.noise_std)
    images = img.round_().clamp_(0, 255).to(torch.uint8)
    attrs = {"colour": colour, "shape": shape, "size": sz.astype(np.int64), "pos": pos.astype(np.int64)}
    return images, attrs


def caption(
    colour: int | str,
    shape: int | str,
    size_idx: int,
    pos_idx: int,
    domain: str | Domain = "clean",
    template_idx: int = 0,
) -> str:
    """Caption of one image, e.g. ``"a small blue square at the top left."``.

    Args:
        colour: Colour index or name.
        shape: Shape index or name.
        size_idx: Index into :data:`SIZES`.
        pos_idx: Index into :data:`POSITIONS`.
        domain: Domain name or :class:`Domain` (gives the background word).
        template_idx: Index into :data:`TEMPLATES` (0 is ``"a photo of a {colour} {shape}."``).
    """
    return TEMPLATES[template_idx].format(
        colour=colour if isinstance(colour, str) else COLOURS[int(colour)],
        shape=shape if isinstance(shape, str) else SHAPES[int(shape)],
        size=SIZES[int(size_idx)],
        pos=POSITIONS[int(pos_idx)],
        background=_domain(domain).background,
    )


def sample_pretraining_batch(
    batch_size: int, rng: np.random.Generator, size: int = 32
) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """A random pretraining batch: seen combinations only (never :data:`HELD_OUT`), ``clean`` domain.

    Args:
        batch_size: Number of images.
        rng: Generator that drives everything (combinations, render seed, caption templates).
        size: Image side in pixels.

    Returns:
        ``(images, captions, labels)``: uint8 tensor [B, 3, size, size], one caption per image (random template),
        int64 class labels [B] (in the 48-class label space).
    """
    seen = np.asarray(SEEN_LABELS, dtype=np.int64)
    labels = seen[rng.integers(0, len(seen), batch_size)]
    templates = rng.integers(0, len(TEMPLATES), batch_size)
    colour, shape = labels // len(SHAPES), labels % len(SHAPES)
    images, attrs = render(colour, shape, "clean", seed=int(rng.integers(2**63)), size=size)
    captions = [
        caption(c, s, z, p, "clean", t)
        for c, s, z, p, t in zip(colour, shape, attrs["size"], attrs["pos"], templates, strict=True)
    ]
    return images, captions, labels
