"""Where a training image's view comes from and in which encoding pass a row sits — the pure functions behind
:class:`~fedlit.features.FeatureBank`'s values:

- :func:`augment_params`: the random-resized-crop + flip of view ``v`` of image ``i``, drawn from ``(seed, i, v)``
  only, so every method of a seed trains on the same views (a grid shares them);
- :func:`block_layout` / :func:`layout_positions`: the fixed-size passes a set of rows is encoded in, each row at a
  slot fixed by its position in the split's layout, so a feature never depends on which rows were encoded with it;
  :func:`rows_digest` names a layout in the cache key.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

AUG_SCALE = (0.08, 1.0)
AUG_RATIO = (3.0 / 4.0, 4.0 / 3.0)
AUG_FLIP = 0.5


def rows_digest(rows: np.ndarray | None) -> str | None:
    """Digest of a pass layout (``None``: rows by index), for the cache key."""
    if rows is None:
        return None
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def augment_params(seed: int, row: int, view: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)`` of view ``view`` of image ``row``: torchvision's RandomResizedCrop algorithm
    (scale (0.08, 1), ratio (3/4, 4/3), 10 tries then a centre crop) and a p = 0.5 flip, drawn from
    ``(seed, row, view)`` only."""
    rng = np.random.default_rng([int(seed), 0xA116, int(row), int(view)])
    area = height * width
    log_ratio = (math.log(AUG_RATIO[0]), math.log(AUG_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*AUG_SCALE)
        ar = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:  # centre crop at the closest allowed ratio
        in_ratio = width / height
        if in_ratio < AUG_RATIO[0]:
            w, h = width, int(round(width / AUG_RATIO[0]))
        elif in_ratio > AUG_RATIO[1]:
            h, w = height, int(round(height * AUG_RATIO[1]))
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w, bool(rng.random() < AUG_FLIP)


def block_layout(rows: np.ndarray, block: int, positions: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encoding passes for ``rows`` (sorted, distinct): row ``r`` always sits at slot ``position(r) % block`` of a
    pass of exactly ``block`` images, so its feature is the same computation whichever other rows are encoded
    with it (CPU kernels are not batch-invariant on every processor: a row encoded in another batch composition
    can differ in its last bits). ``positions`` (distinct, aligned with ``rows``; default the rows themselves) is a
    fixed function of the row: the bank passes each row's rank in its split's *layout* (the rows the run said it
    would ask for, :meth:`FeatureBank.expect`), so a scattered subset of a split packs ``ceil(n / block)`` full
    passes instead of leaving most slots empty (``r % block`` of a K-shot subset collides: up to 2× the forwards
    on the embedded default, more on a sparse subset). Returns ``[(rows, slots), …]``, each with distinct slots;
    the slots of a pass that no row fills are zeros."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return []
    slots = (rows if positions is None else np.asarray(positions, dtype=np.int64)) % block
    order = np.lexsort((rows, slots))  # by slot, then row
    sorted_slots = slots[order]
    starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
    rank = np.empty(len(rows), dtype=np.int64)  # the k-th row of a slot goes to pass k
    rank[order] = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    passes = []
    for k in range(int(rank.max()) + 1):
        sel = np.flatnonzero(rank == k)
        passes.append((rows[sel], slots[sel]))
    return passes


def layout_positions(rows: np.ndarray, layout: np.ndarray | None) -> np.ndarray:
    """Each row's position in the pass layout: its rank in ``layout`` (sorted, distinct) if it is there, else
    ``len(layout) + row`` (rows nobody announced keep a fixed, distinct position after the dense range)."""
    rows = np.asarray(rows, dtype=np.int64)
    if layout is None or not len(layout):
        return rows
    rank = np.searchsorted(layout, rows)
    inside = (rank < len(layout)) & (layout[np.minimum(rank, len(layout) - 1)] == rows)
    return np.where(inside, rank, len(layout) + rows)


__all__ = ["AUG_FLIP", "AUG_RATIO", "AUG_SCALE", "augment_params", "block_layout", "layout_positions", "rows_digest"]
