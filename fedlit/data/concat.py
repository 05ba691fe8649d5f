"""Several datasets (or domains) seen as one: rows side by side, label spaces concatenated or shared — how a
federation pools FedTPG's datasets or a dataset's domains (:func:`concat_datasets`)."""

from __future__ import annotations

import numpy as np

from ..errors import FedlitError
from ..lazy import lazy
from .registry import ClassificationData, ImageSplit, Indices

torch = lazy("torch", __name__, "torch")


class ConcatSplit(ImageSplit):
    """Several splits side by side: row ``offsets[i] + j`` is row ``j`` of ``parts[i]``; labels shifted by
    ``label_offsets[i]``. Images of parts with different native sizes are resized to the largest."""

    def __init__(self, parts: list[ImageSplit], label_offsets: list[int]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        super().__init__(np.concatenate([p.labels + o for p, o in zip(parts, label_offsets)]) if parts
                         else np.zeros(0, dtype=np.int64))
        if len({repr(p.pixel_norm) for p in parts}) > 1:
            raise FedlitError("pooled datasets must share one pre-processing (dataset_args preprocess)")
        if parts and parts[0].pixel_norm is not None:  # set only when there is one: cache keys stay as they were
            self.pixel_norm = parts[0].pixel_norm

    def images(self, indices: Indices = None) -> torch.Tensor:
        if indices is None or isinstance(indices, slice):
            rows = np.arange(len(self))[indices if indices is not None else slice(None)]
        else:
            rows = torch.as_tensor(indices).cpu().numpy().astype(np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        chunks, order = [], []
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            chunks.append(self.parts[i].images(rows[sel] - self.offsets[i]))
            order.append(sel)
        if not chunks:
            return self.parts[0].images([]) if self.parts else torch.zeros(0, 3, 1, 1)
        size = max(c.shape[-1] for c in chunks)
        chunks = [c if c.shape[-1] == size else torch.nn.functional.interpolate(
            c, size=(size, size), mode="bilinear", antialias=True, align_corners=False) for c in chunks]
        out = torch.empty(len(rows), *chunks[0].shape[1:], dtype=chunks[0].dtype)
        for sel, c in zip(order, chunks):
            out[torch.as_tensor(sel)] = c
        return out


    def view_crops(self, indices, params, size: tuple[int, int]) -> torch.Tensor:
        """Each part crops its own originals (``params`` sees positions in ``indices``)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = torch.empty(len(rows), 3, *size)
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            out[torch.as_tensor(sel)] = self.parts[i].view_crops(
                rows[sel] - self.offsets[i], lambda k, h, w, sel=sel: params(int(sel[k]), h, w), size)
        return out


def concat_datasets(parts: list[ClassificationData], shared_labels: bool) -> ClassificationData:
    """One :class:`ClassificationData` over several: label spaces concatenated (``shared_labels=False``; class
    ``j`` of part ``i`` becomes ``offset_i + j``) or shared (domains of one dataset: identical class lists)."""
    if len(parts) == 1:
        return parts[0]
    if shared_labels:
        offsets, classnames = [0] * len(parts), list(parts[0].classnames)
    else:
        offsets = list(np.cumsum([0] + [len(p.classnames) for p in parts[:-1]]).tolist())
        classnames = [c for p in parts for c in p.classnames]
    splits = {s: ConcatSplit([p.split(s) for p in parts], offsets) for s in ("train", "val", "test")}
    return ClassificationData("+".join(p.name for p in parts), classnames, **splits,
                              image_size=max(p.image_size for p in parts))
