"""OOD detection and covariate shift, for every method (FOCoOp's evaluation, spec 3b §2.8 / §3): the ``ood:``
section of a config and the evaluator the round loop calls at the final evaluation.

Per client, with the client's own model (global ∪ personal state), classified among the client's training task:

- ``ood/acc`` (ID): accuracy on the client's own test images;
- ``ood/cacc`` (covariate shift): accuracy on the corrupted copies of the client's own test images (rows whose
  ``meta['source']`` is one of them; sets without a source map: the corrupted images of the client's classes),
  the mean over corruption types of each type's accuracy over all its severities; also ``ood/cacc/<type>``,
  ``ood/cacc/<type>/s<k>`` and ``ood/cacc/s<k>`` (mean over types at severity k);
- ``ood/<score>/auroc`` and ``ood/<score>/fpr95``: the client's ID images against the OOD set(s), which every
  client shares, scored with ``msp`` (max softmax), ``energy`` (T · logsumexp) or ``neglabel`` (NegLabel: ID
  logits against the same prompts on negative labels); several OOD sets: per set ``…/<set>`` and their mean.
  AUROC: ID positive, ties ½. FPR95: ``ood.fpr95`` names the convention (:func:`fedlit.metrics.fpr_at_95_tpr`).

Means over clients are unweighted (as Local; FOCoOp weights ACC/CACC by test batches). Everything is logged as
``eval/ood/…`` (TensorBoard), in ``results.json`` (``final``, ``per_client``, ``ood``) and ``fedlit summarize``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import FedlitError

SCORES = ("msp", "energy", "neglabel")

#: default negative labels of the ``neglabel`` score: generic nouns far from any ID class of the shapes world
#: (NegLabel mines ~10,000 WordNet words per ID dataset; pass such a list with ``ood.neg_labels`` on real data).
DEFAULT_NEG_LABELS = (
    "dog", "cat", "horse", "bird", "fish", "tree", "flower", "car", "truck", "house", "bridge", "mountain", "river",
    "chair", "table", "book", "phone", "shoe", "hat", "apple", "bread", "boat", "airplane", "bicycle", "clock",
    "guitar", "lamp", "cup", "bottle", "key", "door", "window",
)


class OODEval:
    """The ``ood:`` section: OOD detection and covariate-shift evaluation (off unless a set is named).

    Args:
        ood_datasets: registered OOD sets, shared by every client (all their test images): ``texture`` (DTD),
            ``shapes-<domain>-ood`` (embedded) …
        covariate: registered covariate-shift sets: corrupted copies of the ID test split, labels in the ID task
            (``cifar10_c``, ``cifar100_c``, ``tinyimagenet_c``, ``shapes-<domain>-c``).
        scores: OOD scores among ``msp``, ``energy``, ``neglabel``.
        fpr95: ``id_positive`` (OpenOOD/MCM: OOD accepted when 95 % of ID is), ``ood_positive`` (Outlier
            Exposure: ID rejected when 95 % of OOD is), or ``focoop`` (FOCoOp's code: ``ood_positive`` for msp and
            neglabel, ``id_positive`` for energy; without its nearest-det-curve-point rule).
        neg_labels: negative labels of ``neglabel``: a list of words or a text file (one per line); ``null``: the
            built-in :data:`DEFAULT_NEG_LABELS`.
        energy_temperature: T of the energy score.
        cadence: ``final`` (FOCoOp: once, on the final models) or ``every_eval``.
        subset: fraction of every OOD and covariate set scored (rows drawn with numpy seed 42; FOCoOp's
            ``main_fpl`` uses 10 % subsets, 1.0 = ``test_fpl.py``'s full sets).
        score_logits: which logits ``msp`` and ``energy`` score: ``method`` (default) the whole vector of a method
            with OOD prompts (FOCoOp, FedLAPT: their ``full_logits``, C ID + K_o OOD-prompt logits, as FOCoOp's
            code scores them, spec 3b §2.8) and the C ID logits of every other method; ``id``: the C ID logits
            always. Accuracies (ID, CACC) and ``neglabel`` always use the C ID logits (FOCoOp's CACC over all
            logits, Q-F5, is not reproduced).
        dataset_args: keyword arguments of the OOD and covariate sets' factories, over ``data.dataset_args``
            (which they also get, so a corrupted copy is made of the very ID split): e.g. ``{types: [fog, snow],
            severities: [1, 5]}``.
    """

    def __init__(self, ood_datasets: list[str] | None = None, covariate: list[str] | None = None,
                 scores: list[str] | None = None, fpr95: Literal["id_positive", "ood_positive", "focoop"] = "id_positive",
                 neg_labels: list[str] | str | None = None, energy_temperature: float = 1.0,
                 cadence: Literal["final", "every_eval"] = "final", subset: float = 1.0,
                 score_logits: Literal["method", "id"] = "method", dataset_args: dict | None = None):
        scores = list(SCORES if scores is None else scores)
        bad = [s for s in scores if s not in SCORES]
        checks = [(not bad, f"ood.scores: {', '.join(bad)} unknown; use any of {', '.join(SCORES)}"),
                  (fpr95 in ("id_positive", "ood_positive", "focoop"),
                   f"ood.fpr95={fpr95!r}: use 'id_positive', 'ood_positive' or 'focoop'"),
                  (cadence in ("final", "every_eval"), f"ood.cadence={cadence!r}: use 'final' or 'every_eval'"),
                  (0 < subset <= 1, f"ood.subset={subset}: a fraction in (0, 1]"),
                  (score_logits in ("method", "id"), f"ood.score_logits={score_logits!r}: use 'method' or 'id'"),
                  (energy_temperature > 0, f"ood.energy_temperature={energy_temperature}: must be > 0")]
        for ok, msg in checks:
            if not ok:
                raise FedlitError(msg)
        self.ood_datasets, self.covariate = list(ood_datasets or []), list(covariate or [])
        self.scores, self.fpr95, self.neg_labels = scores, fpr95, neg_labels
        self.energy_temperature, self.cadence, self.subset = energy_temperature, cadence, subset
        self.score_logits = score_logits
        self.dataset_args = dict(dataset_args or {})

    @property
    def enabled(self) -> bool:
        return bool(self.ood_datasets or self.covariate)

    def convention(self, score: str) -> str:
        if self.fpr95 == "focoop":
            return "id_positive" if score == "energy" else "ood_positive"
        return self.fpr95

    def words(self) -> tuple[str, ...]:
        if self.neg_labels is None:
            return DEFAULT_NEG_LABELS
        if isinstance(self.neg_labels, str):
            path = Path(self.neg_labels).expanduser()
            if not path.is_file():
                raise FedlitError(f"ood.neg_labels: {path} is not a file; give a list of words or a file, one a line")
            words = tuple(w.strip() for w in path.read_text().splitlines() if w.strip())
        else:
            words = tuple(self.neg_labels)
        if not words:
            raise FedlitError("ood.neg_labels is empty; give at least one negative label")
        return words


class OODEvaluator:
    """Scores the loaded client models of an :class:`~fedlit.orchestrator.Orchestrator` on the OOD settings."""

    def __init__(self, cfg: OODEval, orch, root: str | None, seed: int, dataset_args: dict | None = None):
        from .data.registry import get_dataset
        from .data.task import Task
        from .features import FeatureBank

        self.cfg, self.orch = cfg, orch
        args = {**(dataset_args or {}), **cfg.dataset_args}
        self.ood = {n: get_dataset(n, root=root, seed=seed, **args).test for n in cfg.ood_datasets}
        self.cov = {n: get_dataset(n, root=root, seed=seed, **args) for n in cfg.covariate}
        if "neglabel" in cfg.scores and not orch.method.text_classifier:
            raise FedlitError(f"ood.scores: neglabel needs a text classifier; method '{orch.method.name}' has a "
                              f"linear head — drop neglabel")
        if "neglabel" in cfg.scores and not orch.method.encodes_any_label(cfg.words()):
            raise FedlitError(f"ood.scores: neglabel scores the method's prompts on negative labels, and method "
                              f"'{orch.method.name}' cannot build a class prompt for them (FedMVP: no attribute "
                              f"phrases for them in method.init_args.attributes_dir) — drop neglabel from ood.scores")
        self.neg_task = Task("neglabels", cfg.words()) if "neglabel" in cfg.scores else None
        #: msp / energy over the method's whole logit vector (its OOD prompts included): ``score_logits``
        self.full = cfg.score_logits == "method" and callable(getattr(orch.method, "full_logits", None))
        rng = np.random.default_rng(42)
        pick = (lambda n: np.sort(rng.choice(n, size=max(1, int(round(cfg.subset * n))), replace=False))
                if cfg.subset < 1 else np.arange(n))
        self.ood_rows = {n: pick(len(s)) for n, s in self.ood.items()}
        self.cov_rows = {n: pick(len(d.test)) for n, d in self.cov.items()}
        splits = {**{f"ood/{n}": s for n, s in self.ood.items()}, **{f"cov/{n}": d.test for n, d in self.cov.items()}}
        b = orch.bank
        self.bank = FeatureBank(orch.clip, splits, autocast=b.autocast, kind=b.kind, cache=b.cache,
                                cache_dir=b.cache_dir)
        for n, rows in self.ood_rows.items():
            self.bank.expect(f"ood/{n}", rows)
        self._offsets = {n: self._source_offset(d) for n, d in self.cov.items()}
        for n in self.cov:  # encode only the corrupted rows some client is scored on, in full passes
            self.bank.expect(f"cov/{n}", np.concatenate([self._cov_rows(n, c)[0] for c in range(len(orch.fed.clients))]))

    def _source_offset(self, ds) -> int | None:
        """Where the ID test split that ``ds``'s rows corrupt starts in the federation's test rows (None: no map)."""
        base = getattr(ds.test, "base", None) or getattr(ds.test, "source_split", None)
        test = self.orch.fed.data.test
        if base is None or "source" not in getattr(ds.test, "meta", {}):
            return None
        if base is test:
            return 0
        for part, off in zip(getattr(test, "parts", []), getattr(test, "offsets", [])):
            if part is base:
                return int(off)
        return None

    def due(self, rnd: int) -> bool:
        o = self.orch
        return self.cfg.cadence == "every_eval" or rnd + 1 >= o.cfg.rounds or not o.method.trainable

    # ------------------------------------------------------------------------------------ per client
    def evaluate(self, cids: list[int]) -> dict[int, dict[str, float]]:
        import torch

        o, out, shared = self.orch, {}, {}
        for cid in cids:
            task = o.fed.task_of(cid)
            same = not o.protocol.has_personal(cid) and not o.method.client_specific
            cache = shared.setdefault(task.key, {}) if same else {}
            o.load_client_model(cid)
            client = o.fed.clients[cid]
            z, neg = self._logits(o.bank, "test", client.test_idx, task)
            y = torch.as_tensor(client.test_y)
            res = {"ood/acc": _acc(z[:, :len(task)], y)}
            id_scores = self._scores(z, neg, len(task))
            for n in self.ood:
                if n not in cache:
                    cache[n] = self._scores(*self._logits(self.bank, f"ood/{n}", self.ood_rows[n], task), len(task))
            for s in self.cfg.scores:
                vals = {n: self._detect(s, id_scores[s], cache[n][s]) for n in self.ood}
                for m in ("auroc", "fpr95"):
                    if vals:
                        res[f"ood/{s}/{m}"] = float(np.mean([v[m] for v in vals.values()]))
                    if len(vals) > 1:
                        res.update({f"ood/{s}/{m}/{n}": v[m] for n, v in vals.items()})
            for n in self.cov:
                res.update(self._cacc(n, cid, task, prefix="ood/cacc" if len(self.cov) == 1 else f"ood/cacc/{n}"))
            out[cid] = res
        return out

    def _cacc(self, name: str, cid: int, task, prefix: str) -> dict[str, float]:
        import torch

        ds = self.cov[name]
        meta = ds.test.meta
        sel, y = self._cov_rows(name, cid)
        y = torch.as_tensor(y)
        z, _ = self._logits(self.bank, f"cov/{name}", sel, task, negatives=False)
        correct = (z[:, :len(task)].argmax(-1) == y).float().numpy() if len(sel) else np.zeros(0)
        types = getattr(ds.test, "corruptions", None) or [str(t) for t in sorted(set(meta["corruption"].tolist()))]
        t_of, s_of = meta["corruption"][sel], meta["severity"][sel]
        res, per_type, per_sev = {}, [], {}
        for ti, t in enumerate(types):
            m = t_of == ti
            if m.any():
                res[f"{prefix}/{t}"] = 100.0 * float(correct[m].mean())
                per_type.append(res[f"{prefix}/{t}"])
            for s in sorted(set(s_of[m].tolist())):
                v = 100.0 * float(correct[m & (s_of == s)].mean())
                res[f"{prefix}/{t}/s{s}"] = v
                per_sev.setdefault(s, []).append(v)
        if per_type:
            res[prefix] = float(np.mean(per_type))
        res.update({f"{prefix}/s{s}": float(np.mean(v)) for s, v in sorted(per_sev.items())})
        return res

    def _cov_rows(self, name: str, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of covariate set ``name`` client ``cid`` is scored on, and their labels in its task."""
        o, ds, rows = self.orch, self.cov[name], self.cov_rows[name]
        task, off = o.fed.task_of(cid), self._offsets[name]
        pos = {c: i for i, c in enumerate(task.classnames)}
        lab = np.array([pos.get(ds.classnames[int(c)], -1) for c in ds.test.labels[rows]], dtype=np.int64)
        if off is not None:
            keep = np.isin(ds.test.meta["source"][rows] + off, o.fed.clients[cid].test_idx)
        else:  # no source map: the corrupted images of the client's classes
            own = {o.fed.data.classnames[c] for c in o.fed.clients[cid].classes}
            keep = np.array([ds.classnames[int(c)] in own for c in ds.test.labels[rows]], dtype=bool)
        keep &= lab >= 0
        return rows[keep], lab[keep]

    def _detect(self, score: str, id_s: np.ndarray, ood_s: np.ndarray) -> dict[str, float]:
        from .metrics import auroc, fpr_at_95_tpr

        return {"auroc": auroc(id_s, ood_s), "fpr95": fpr_at_95_tpr(id_s, ood_s, self.cfg.convention(score))}

    def _scores(self, z, neg, c: int) -> dict[str, np.ndarray]:
        """The scores of logits ``z`` whose first ``c`` columns are the ID logits (the rest: OOD-prompt logits)."""
        from .metrics import energy_score, msp_score, neglabel_score

        fns = {"msp": lambda: msp_score(z), "energy": lambda: energy_score(z, self.cfg.energy_temperature),
               "neglabel": lambda: neglabel_score(z[:, :c], neg)}
        return {s: fns[s]().numpy().astype(np.float64) for s in self.cfg.scores}

    def _logits(self, bank, split: str, rows: np.ndarray, task, negatives: bool = True):
        """Logits of the loaded model on ``rows`` of ``split`` among ``task`` (and the negative labels), on CPU;
        with :attr:`full`, the ID logits followed by the method's OOD-prompt logits."""
        import torch

        o = self.orch
        bs = o.cfg.eval_batch_size
        m, method = o.module, o.method
        neg_task = self.neg_task if negatives else None
        out, negs = [], []
        with torch.no_grad(), (o.fabric.autocast() if o.fabric is not None else contextlib.nullcontext()):
            prep = method.prepare(m.prompt, m.clip, task)
            prep_neg = method.prepare(m.prompt, m.clip, neg_task) if neg_task is not None else None
            score = method.full_logits if self.full else method.logits
            for s in range(0, len(rows), bs):
                x = bank.inputs(split, rows[s:s + bs])
                out.append(score(m.prompt, m.clip, x, task, prep).float().cpu())
                if neg_task is not None:
                    negs.append(method.logits(m.prompt, m.clip, x, neg_task, prep_neg).float().cpu())
        z = torch.cat(out) if out else torch.zeros(0, len(task))
        neg = torch.cat(negs) if negs else torch.zeros(len(z), 0)
        return z, neg

    def report(self) -> dict:
        """The ``ood`` block of ``results.json``: sets, scores and conventions."""
        return {"ood": {"ood_datasets": self.cfg.ood_datasets, "covariate": self.cfg.covariate,
                        "scores": self.cfg.scores, "fpr95": {s: self.cfg.convention(s) for s in self.cfg.scores},
                        "score_logits": "id + ood prompts" if self.full else "id",
                        "auroc": "ID positive, ties count 1/2", "score_sign": "higher = more in-distribution",
                        "neg_labels": len(self.neg_task) if self.neg_task is not None else 0,
                        "subset": self.cfg.subset, "cadence": self.cfg.cadence,
                        "ood_images": {n: int(len(r)) for n, r in self.ood_rows.items()},
                        "aggregation": "unweighted mean over clients (then over groups)"}}


def _acc(z, y) -> float:
    return 100.0 * float((z.argmax(-1) == y).float().mean()) if len(y) else float("nan")


def format_ood(final: dict) -> str:
    """One line: ID, CACC, and FPR95 / AUROC of each score present in ``final`` (empty when there is none)."""
    parts = [f"{label} {final[k]:.2f}" for label, k in (("ID", "ood/acc"), ("CACC", "ood/cacc")) if k in final]
    for s in SCORES:
        if f"ood/{s}/fpr95" in final:
            parts.append(f"{s}: FPR95 {final[f'ood/{s}/fpr95']:.2f} AUROC {final[f'ood/{s}/auroc']:.2f}")
    return "  ".join(parts)


__all__ = ["DEFAULT_NEG_LABELS", "OODEval", "OODEvaluator", "SCORES", "format_ood"]
