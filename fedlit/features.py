"""Frozen image work, done once.

When a method leaves the image tower untouched (``FedMethod.frozen_image_path``) and the images are
not augmented, CLIP's image features are a pure function of the image: :class:`FeatureBank` encodes
each image of a split at most once per process, on demand, and serves rows by index afterwards.
Methods that change the image tower get the normalised images instead (:meth:`FeatureBank.inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .backbones import FrozenCLIP
from .data.registry import ImageSplit


class FeatureBank:
    """Per-split cache of frozen image features, filled lazily in batches.

    Args:
        clip: the frozen backbone.
        splits: name → split (``train``, ``test`` …).
        batch_size: encoding batch size.
        autocast: a context-manager factory for mixed precision (e.g. ``fabric.autocast``).
        enabled: when False, :meth:`inputs` returns normalised images (methods that prompt the image tower).
    """

    def __init__(self, clip: FrozenCLIP, splits: dict[str, ImageSplit], batch_size: int = 256,
                 autocast=None, enabled: bool = True):
        self.clip = clip
        self.splits = splits
        self.batch_size = batch_size
        self.autocast = autocast
        self.enabled = enabled
        self._feats: dict[str, torch.Tensor] = {}
        self._have: dict[str, np.ndarray] = {}
        self.encoded = 0  # images encoded so far (a cache that works keeps this at one per image)

    def images(self, split: str, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        x = self.splits[split].images(np.asarray(idx))
        return self.clip.normalize_images(x.to(self.clip.device))

    @torch.no_grad()
    def features(self, split: str, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Image features ``[n, D]`` (float32, unnormalised) of the given rows of ``split``."""
        idx = np.asarray(idx, dtype=np.int64)
        if split not in self._feats:
            n = len(self.splits[split])
            self._feats[split] = torch.empty(n, self.clip.embed_dim, device=self.clip.device)
            self._have[split] = np.zeros(n, dtype=bool)
        have, bank = self._have[split], self._feats[split]
        todo = np.unique(idx[~have[idx]])
        for s in range(0, len(todo), self.batch_size):
            rows = todo[s : s + self.batch_size]
            x = self.images(split, rows)
            if self.autocast is not None:
                with self.autocast():
                    f = self.clip.encode_image(x)
            else:
                f = self.clip.encode_image(x)
            bank[torch.as_tensor(rows, device=bank.device)] = f.float()
            have[rows] = True
            self.encoded += len(rows)
        return bank[torch.as_tensor(idx, device=bank.device)]

    def inputs(self, split: str, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """What a method's forward takes: cached features, or normalised images when disabled."""
        return self.features(split, idx) if self.enabled else self.images(split, idx)
