"""Distribution-shift data for the OOD protocol (:mod:`fedlit.ood`): covariate-shift sets (corrupted copies of an
ID test split, labels in the ID task) and OOD sets (images of no ID class), embedded and procedural.

- :class:`CorruptedSplit`: every (corruption type, severity) block of a base split, stacked type-major then
  severity (row ``(t · S + s) · N + i`` is test row ``i`` under type ``t`` at severity ``s + 1``, as CIFAR-10-C's
  ``{type}.npy`` stacks its five severities). ``meta``: ``corruption`` (type index), ``severity`` (1–5) and
  ``source`` (the ID test row it corrupts). Images are computed on demand, deterministically from
  ``(seed, type, severity, row)``, so memory stays flat.
- ``shapes[-<domain>]-c``: the shapes test split under :data:`CORRUPTIONS` (5 types × 5 severities, parameters in
  the spirit of CIFAR-10-C at 32 px).
- ``shapes[-<domain>]-ood``: an OOD family no split contains — three new shapes (star, crescent, hourglass) and
  three whole-image patterns (checkerboard, dots, zigzag) in the 8 colours, rendered in the same domain, so only
  the semantics differ from the ID images (``test_per_class`` images per kind, label = kind).
"""

from __future__ import annotations

import numpy as np

from ..lazy import lazy
from . import shapes
from .registry import ClassificationData, ImageSplit, Indices, TensorImageSplit, get_dataset, register_dataset

torch = lazy("torch", __name__, "torch")
F = lazy("torch.nn.functional", __name__, "F")

#: corruption type → its parameter at severities 1..5 (images in [0, 1], 32 px)
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.05, 0.10, 0.15, 0.20, 0.25),  # pixel noise std
    "defocus_blur": (0.6, 0.9, 1.2, 1.6, 2.0),  # Gaussian blur std, pixels at 32 px
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # x → (x − mean) · c + mean
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # x → x + c
    "pixelate": (0.9, 0.75, 0.6, 0.5, 0.4),  # downsample to c · side, nearest upsample
}
OOD_KINDS: tuple[str, ...] = ("star", "crescent", "hourglass", "checkerboard", "dots", "zigzag")


def corrupt(x: torch.Tensor, kind: str, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """Images ``x`` [n, 3, H, W] in [0, 1] under corruption ``kind`` at ``severity`` (1–5); ``seeds[k]`` seeds the
    random part of image ``k`` (noise), so a corrupted image never depends on the batch it is computed in."""
    c = CORRUPTIONS[kind][int(severity) - 1]
    x = x.float()
    if kind == "gaussian_noise":
        noise = np.stack([np.random.default_rng(int(s)).standard_normal(x.shape[1:], dtype=np.float32) for s in seeds])
        out = x + c * torch.from_numpy(noise).reshape(x.shape)
    elif kind == "defocus_blur":
        r = int(np.ceil(3 * c))
        k1 = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / c) ** 2)
        k1 = k1 / k1.sum()
        y = F.pad(x, (r, r, r, r), mode="replicate")
        y = F.conv2d(y, k1.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
        out = F.conv2d(y, k1.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - mean) * c + mean
    elif kind == "brightness":
        out = x + c
    elif kind == "pixelate":
        side = max(1, int(round(x.shape[-1] * c)))
        small = F.interpolate(x, size=(side, side), mode="area")
        out = F.interpolate(small, size=x.shape[-2:], mode="nearest")
    else:  # pragma: no cover - guarded by CorruptedSplit
        raise KeyError(kind)
    return out.clamp_(0.0, 1.0)


class CorruptedSplit(ImageSplit):
    """A base split under every (type, severity) of ``types`` × ``severities``, stacked (module docstring)."""

    def __init__(self, base: ImageSplit, types: tuple[str, ...], severities: tuple[int, ...], seed: int):
        self.base, self.types, self.severities, self.seed = base, tuple(types), tuple(int(s) for s in severities), int(seed)
        n, blocks = len(base), len(self.types) * len(self.severities)
        super().__init__(np.tile(base.labels, blocks))
        block = np.repeat(np.arange(blocks), n)
        self.meta = {"corruption": block // len(self.severities),
                     "severity": np.asarray(self.severities)[block % len(self.severities)],
                     "source": np.tile(np.arange(n), blocks)}
        self.pixel_norm = base.pixel_norm

    def images(self, indices: Indices = None) -> torch.Tensor:
        rows = np.arange(len(self))[indices] if indices is None or isinstance(indices, slice) else \
            np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64).reshape(-1)
        src, t, s = self.meta["source"][rows], self.meta["corruption"][rows], self.meta["severity"][rows]
        x = self.base.images(src)
        out = torch.empty_like(x)
        for ti, si in sorted({(int(a), int(b)) for a, b in zip(t, s)}):
            sel = np.flatnonzero((t == ti) & (s == si))
            seeds = [int(np.random.SeedSequence([self.seed, ti, si, int(r)]).generate_state(1)[0]) for r in src[sel]]
            out[torch.as_tensor(sel)] = corrupt(x[torch.as_tensor(sel)], self.types[ti], si, np.asarray(seeds))
        return out


def _ood_mask(kind: str, u: np.ndarray, v: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Mask of an OOD kind: object kinds in object coordinates (``u``, ``v``, radius 1), patterns over the image
    (``px``, ``py`` in pixels)."""
    r, ang = np.sqrt(u * u + v * v), np.arctan2(v, u)
    if kind == "star":  # five points
        return r <= 0.45 + 0.5 * np.cos(5 * ang) ** 8
    if kind == "crescent":
        return (r <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.55)
    if kind == "hourglass":
        return (np.abs(v) <= 0.95) & (np.abs(u) <= np.abs(v) + 0.08)
    if kind == "checkerboard":
        return ((px // 4 + py // 4) % 2 == 0)
    if kind == "dots":
        return ((px % 8 - 3.5) ** 2 + (py % 8 - 3.5) ** 2 <= 5.0)
    if kind == "zigzag":
        return (np.abs((py + np.abs(px % 8 - 4)) % 8 - 4) <= 1.2)
    raise KeyError(kind)  # pragma: no cover


def render_ood(kind_idx: np.ndarray, colour: np.ndarray, domain: str, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 images [N, 3, size, size] of OOD kinds (indices into :data:`OOD_KINDS`) in ``domain``'s style."""
    dom = shapes.DOMAINS[domain]
    n = len(kind_idx)
    rng = np.random.default_rng(seed)
    sz, pos = rng.integers(0, len(shapes.SIZES), n), rng.integers(0, len(shapes.POSITIONS), n)
    bright = rng.uniform(1 - dom.brightness_jitter, 1 + dom.brightness_jitter, n).astype(np.float32)
    bg = np.broadcast_to(shapes._background(dom, rng, n, size), (n, 3, size, size))
    coord = np.arange(size, dtype=np.float32) + 0.5
    cx, cy = shapes._GRID[pos % 3] * size, shapes._GRID[pos // 3] * size
    rad = shapes._SIZE_RADIUS[sz] * size * 1.2
    u = (coord[None, None, :] - cx[:, None, None]) / rad[:, None, None]
    v = (coord[None, :, None] - cy[:, None, None]) / rad[:, None, None]
    u, v = np.broadcast_arrays(u, v)
    px, py = np.broadcast_to(coord[None, None, :] - 0.5, u.shape), np.broadcast_to(coord[None, :, None] - 0.5, u.shape)
    mask = np.zeros((n, size, size), dtype=bool)
    for k in np.unique(kind_idx):
        i = np.flatnonzero(kind_idx == k)
        mask[i] = _ood_mask(OOD_KINDS[int(k)], u[i], v[i], px[i], py[i])
    obj = shapes.COLOUR_RGB[colour] * (dom.object_gain * bright[:, None])
    img = torch.from_numpy(np.where(mask[:, None], obj[:, :, None, None], bg).astype(np.float32))
    if dom.noise_std > 0:
        img.add_(torch.randn(img.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**63)))),
                 alpha=dom.noise_std)
    return img.round_().clamp_(0, 255).to(torch.uint8)


def _corrupted_factory(base_name: str):
    def build(root, seed, types: list[str] | None = None, severities: list[int] | None = None,
              **base_args) -> ClassificationData:
        """Corrupted copies of the shapes test split (every type × severity; see fedlit.data.shift)."""
        from ..errors import FedlitError

        types = tuple(types or CORRUPTIONS)
        bad = [t for t in types if t not in CORRUPTIONS]
        sev = tuple(severities or (1, 2, 3, 4, 5))
        if bad or not set(sev) <= {1, 2, 3, 4, 5}:
            raise FedlitError(f"{base_name}-c: corruption types must be among {', '.join(CORRUPTIONS)} and "
                              f"severities among 1..5; got {list(types)}, {list(sev)}")
        base = get_dataset(base_name, root, seed, **base_args)
        test = CorruptedSplit(base.test, types, sev, seed)
        test.corruptions = types
        return ClassificationData(f"{base_name}-c", list(base.classnames), base.train, base.val, test,
                                  base.image_size)
    return build


def _ood_factory(domain: str, name: str):
    def build(root, seed, test_per_class: int = 32, image_size: int = 32, **_ignored) -> ClassificationData:
        """Embedded OOD shapes family: new shapes and patterns never in the 48 classes (see fedlit.data.shift)."""
        kinds = np.repeat(np.arange(len(OOD_KINDS)), int(test_per_class))
        colour = np.arange(len(kinds)) % len(shapes.COLOURS)
        stream = int(np.random.SeedSequence([int(seed), 0x00D, list(shapes.DOMAINS).index(domain)]).generate_state(1)[0])
        data = render_ood(kinds, colour, domain, stream, image_size)
        test = TensorImageSplit(kinds.astype(np.int64), data=data)
        empty = TensorImageSplit(np.zeros(0, dtype=np.int64), data=data[:0])
        return ClassificationData(name, list(OOD_KINDS), empty, empty, test, image_size)
    return build


for _domain in shapes.DOMAINS:
    _base = "shapes" if _domain == "clean" else f"shapes-{_domain}"
    register_dataset(f"{_base}-c")(_corrupted_factory(_base))
    register_dataset(f"{_base}-ood")(_ood_factory(_domain, f"{_base}-ood"))
del _domain, _base

__all__ = ["CORRUPTIONS", "OOD_KINDS", "CorruptedSplit", "corrupt", "render_ood"]
