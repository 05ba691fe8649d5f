"""NegLabel OOD words (Jiang et al., ICLR 2024, as FOCoOp and FedLAPT mine them; spec 3b §2.2): the K_o candidate
words least similar to the ID classes, which both methods give OOD prompts of their own. Shared by
:mod:`fedlit.methods.focoop` and :mod:`fedlit.methods.fedlapt` (PengyangZhou/FOCoOp@f30f6f306377
``src/models/clip_fedlapt.py:17-55``, ``clip_for_wordnet_prepare.py:53-154``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FedlitError
from ..prompts import clean_classname
from .base import fp32


def negative_labels(clip, id_classes: tuple[str, ...], k: int, candidates: list[str]) -> tuple[str, ...]:
    """The ``k`` candidates least similar to the ID classes (95-th percentile cosine of "The nice {w}.")."""
    words = {w for c in id_classes for w in clean_classname(c).lower().split()}
    cand = list(dict.fromkeys(w for w in candidates if w.lower() not in words))
    if len(cand) < k:
        raise FedlitError(f"only {len(cand)} OOD word candidates for num_ood_prompts={k}; give a longer "
                          "method.init_args.ood_words_file (one word a line) or fewer prompts")
    with torch.no_grad():
        def feats(names):
            out = torch.cat([clip.encode_tokens(clip.tokenize([f"The nice {w}." for w in names[i:i + 512]])).float()
                             for i in range(0, len(names), 512)])
            return F.normalize(out, dim=-1)
        sim = feats(cand) @ feats([clean_classname(c) for c in id_classes]).t()
        score = torch.quantile(sim, 0.95, dim=1)
    return tuple(cand[i] for i in torch.argsort(score, stable=True)[:k].tolist())


def vocabulary_words(clip, count: int) -> list[str]:
    """The first ``count`` whole, alphabetic, ≥ 4-letter words of the backbone's BPE vocabulary (merge order)."""
    enc = getattr(clip.tokenizer, "encoder", None)
    if enc is None:
        raise FedlitError(f"backbone '{clip.name}' has no BPE vocabulary; give method.init_args.ood_words_file")
    words = [t[:-4] for t, _ in sorted(enc.items(), key=lambda kv: kv[1])
             if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].islower() and len(t) >= 8]
    return words[:count]


def mine_ood_words(clip, id_classes: tuple[str, ...], k: int, words_file: str | None,
                   candidates: int) -> tuple[str, ...]:
    """The ``k`` NegLabel OOD words of FOCoOp and FedLAPT: from ``words_file`` (one word a line) or the first
    ``candidates`` words of the backbone's vocabulary (:func:`vocabulary_words`), by :func:`negative_labels`."""
    if words_file:
        cands = [w.strip() for w in Path(words_file).read_text().splitlines() if w.strip()]
    else:
        cands = vocabulary_words(clip, candidates)
    return negative_labels(clip, id_classes, k, cands)




class OODPrompts:
    """The parts a method with OOD prompts on NegLabel words shares (FOCoOp, FedLAPT; mixed in before
    :class:`FedMethod`): the federation's training classes, the mined words (``num_ood_prompts``,
    ``ood_words_file``, ``ood_candidates``), and classification from a ``prepare`` that returns the normalised class
    features ``[C, D]`` and OOD-prompt features ``[K_o, D]``."""

    _classes: tuple[str, ...] = ()
    ood_words: tuple[str, ...] = ()

    def word_source(self, num_ood_prompts: int, ood_words_file: str | None, ood_candidates: int) -> None:
        """Where the OOD words come from (checked: a named file must exist)."""
        if ood_words_file is not None and not Path(ood_words_file).is_file():
            raise FedlitError(f"method.init_args.ood_words_file={ood_words_file}: no such file (one word a line)")
        self.num_ood_prompts, self.ood_words_file, self.ood_candidates = num_ood_prompts, ood_words_file, ood_candidates

    def setup_federation(self, train_task, num_clients: int) -> None:
        self._classes = tuple(train_task.classnames)

    def mine_words(self, clip) -> None:
        """The K_o OOD words for the run's backbone (:func:`mine_ood_words`), before the prompts are built."""
        if not self._classes:
            raise FedlitError(f"{self.name}: call method.setup_federation(train_task, num_clients) before build()")
        self.ood_words = mine_ood_words(clip, self._classes, self.num_ood_prompts, self.ood_words_file,
                                        self.ood_candidates)

    def full_logits(self, prompt, clip, x, task, prepared=None) -> torch.Tensor:
        """``[B, C + K_o]``: the ID logits then the OOD-prompt logits (the OOD protocol's msp / energy use them all:
        ``ood.score_logits``)."""
        t, o = prepared if prepared is not None else self.prepare(prompt, clip, task)
        f = self.image_features(prompt, clip, x)
        with fp32(f):
            return clip.logit_scale * F.normalize(f.float(), dim=-1) @ torch.cat([t, o]).t()

    def logits(self, prompt, clip, x, task, prepared=None) -> torch.Tensor:
        """The C ID logits (accuracy)."""
        return self.full_logits(prompt, clip, x, task, prepared)[:, :len(task)]



__all__ = ["OODPrompts", "mine_ood_words", "negative_labels", "vocabulary_words"]
