"""Frozen image work, done once.

When a method leaves the image tower untouched (``FedMethod.image_input`` is ``features`` or ``tokens``) and the images are
not augmented, CLIP's image features are a pure function of the image: :class:`FeatureBank` encodes
each image of a split at most once per process, on demand, and serves rows by index afterwards.
Methods that change the image tower get the normalised images instead (:meth:`FeatureBank.inputs`).
"""

from __future__ import annotations

import contextlib
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
        kind: ``features`` (pooled), ``tokens`` (all projected tokens, FedOTP) or ``images`` (no cache:
            :meth:`inputs` returns normalised images, for methods that prompt the image tower).
    """

    def __init__(self, clip: FrozenCLIP, splits: dict[str, ImageSplit], batch_size: int = 256,
                 autocast=None, kind: str = "features"):
        if kind not in ("features", "tokens", "images"):
            raise ValueError(f"unknown image input kind '{kind}'")
        self.clip = clip
        self.splits = splits
        self.batch_size = batch_size
        self.autocast = autocast
        self.kind = kind
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
        encode = self.clip.encode_image_tokens if self.kind == "tokens" else self.clip.encode_image
        have = self._have.setdefault(split, np.zeros(len(self.splits[split]), dtype=bool))
        todo = np.unique(idx[~have[idx]])
        for s in range(0, len(todo), self.batch_size):
            rows = todo[s : s + self.batch_size]
            x = self.images(split, rows)
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                f = encode(x).float()
            if split not in self._feats:  # allocated on first use, once the feature shape is known
                self._feats[split] = torch.empty(len(have), *f.shape[1:], device=f.device)
            self._feats[split][torch.as_tensor(rows, device=f.device)] = f
            have[rows] = True
            self.encoded += len(rows)
        bank = self._feats[split]
        return bank[torch.as_tensor(idx, device=bank.device)]

    def inputs(self, split: str, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        """What a method's forward takes: cached features/tokens, or normalised images."""
        return self.images(split, idx) if self.kind == "images" else self.features(split, idx)
