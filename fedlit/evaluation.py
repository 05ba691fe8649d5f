"""Evaluation of loaded client models: Local / Base / Novel per client, for both protocols.

Which test sets give a client's numbers is decided by the data layer (:class:`fedlit.data.federation.ClientEvals`):
``base`` and ``novel`` are each the mean accuracy over the client's listed evaluation sets, and Local reuses the
predictions of its ``home`` set (the set holding its own test images, classified among its training task).

- ``personalized`` (FedPGP, spec §7.4): every client's own model (global ∪ personal state). Clients whose model
  equals the global one share one set of predictions.
- ``global`` (FedTPG, spec §7.3): Base / Novel of the global model; Local = each client's own test images
  classified among the client's own classes only.

With more than one evaluation set per role (several datasets, domains, unseen datasets) every set's accuracy is
also reported per client as ``acc/<set>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import torch

from .data.federation import Federation
from .data.protocol import relabel
from .features import FeatureBank
from .metrics import accuracy, harmonic_mean
from .methods.base import FedMethod
from .data.task import Task

Results = dict[int, dict[str, float]]


class Evaluator:
    """Predicts with whatever client model is loaded in ``module`` (``load(cid | None)`` loads one)."""

    def __init__(self, fed: Federation, method: FedMethod, module, bank: FeatureBank, load: Callable,
                 batch_size: int = 512, autocast: Callable | None = None):
        self.fed, self.method, self.module, self.bank, self.load = fed, method, module, bank, load
        self.batch_size, self.autocast = batch_size, autocast
        self.detailed = len(fed.evals) > 2 or len(fed.groups) > 1

    # ------------------------------------------------------------------------------------ protocols
    def personalized(self, cids: Iterable[int], has_personal: Callable[[int], bool]) -> Results:
        client_specific = self.method.client_specific
        shared: dict[str, torch.Tensor] = {}  # predictions of the global model, for clients equal to it
        out = {}
        for cid in cids:
            same_as_global = not has_personal(cid) and not client_specific
            preds = shared if same_as_global else {}
            loaded = False

            def pred(name: str, cid=cid, preds=preds) -> torch.Tensor:
                nonlocal loaded
                if name not in preds:
                    if not loaded:
                        self.load(cid)
                        loaded = True
                    ev = self.fed.evals[name]
                    preds[name] = self.predict(ev.task, ev.idx)
                return preds[name]

            out[cid] = self._client_results(cid, pred, local_among_own=False)
        return out

    def global_(self, cids: Iterable[int]) -> Results:
        self.load(None)
        preds: dict[str, torch.Tensor] = {}

        def pred(name: str) -> torch.Tensor:
            if name not in preds:
                ev = self.fed.evals[name]
                preds[name] = self.predict(ev.task, ev.idx)
            return preds[name]

        return {cid: self._client_results(cid, pred, local_among_own=True) for cid in cids}

    # ------------------------------------------------------------------------------------ one client
    def _client_results(self, cid: int, pred: Callable[[str], torch.Tensor], local_among_own: bool) -> dict:
        fed, client = self.fed, self.fed.clients[cid]
        ce = fed.evals_of(cid)
        usable = self._usable(cid)
        res: dict[str, float] = {}
        accs: dict[str, float] = {}
        for role in ("base", "novel"):
            for name in getattr(ce, role):
                if name in usable:
                    ev = fed.evals[name]
                    accs[name] = accuracy(pred(name), torch.as_tensor(ev.y), len(ev.task))
        if local_among_own:  # FedTPG: the client's own classes only, with the client's own model
            self.load(cid)
            names = fed.data.classnames
            task = Task(f"client{cid}", tuple(names[c] for c in client.classes))
            y = relabel(fed.data.test.labels[client.test_idx], client.classes)
            res["local"] = accuracy(self.predict(task, client.test_idx), torch.as_tensor(y), len(task))
            self.load(None)
        else:
            home = fed.evals[ce.home] if ce.home is not None else None
            rows = _positions(home.idx, client.test_idx) if home is not None else None
            if rows is not None:
                res["local"] = accuracy(pred(ce.home)[rows], torch.as_tensor(client.test_y), len(home.task))
                if self.method.neighbor_accuracy:  # DP-FPL: the home set's images that are not the client's own
                    others = torch.ones(len(home.idx), dtype=torch.bool)
                    others[rows] = False
                    if bool(others.any()):
                        y = torch.as_tensor(home.y)[others]
                        res["neighbor"] = accuracy(pred(ce.home)[others], y, len(home.task))
            else:  # no set holds the client's test images: predict them directly
                task = fed.task_of(cid)
                res["local"] = accuracy(self.predict(task, client.test_idx), torch.as_tensor(client.test_y), len(task))
        for role in ("base", "novel"):
            vals = [accs[n] for n in getattr(ce, role) if n in accs]
            if vals:
                res[role] = float(np.mean(vals))
        if self.detailed:
            res.update({f"acc/{n}": v for n, v in accs.items()})
        return res

    def _usable(self, cid: int) -> set[str]:
        """Evaluation sets this method can score: all with a text classifier; otherwise (a linear head over the
        training classes: pFedPG, VPT) only sets classified among exactly the client's training classes."""
        if self.method.text_classifier:
            return set(self.fed.evals)
        own = self.fed.task_of(cid).classnames
        return {n for n, ev in self.fed.evals.items() if ev.task.classnames == own}

    # ------------------------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict(self, task: Task, idx: np.ndarray) -> torch.Tensor:
        """Predicted labels of the loaded model on test rows ``idx`` (task-level work done once)."""
        m, bs = self.module, self.batch_size
        with self.autocast() if self.autocast is not None else contextlib.nullcontext():
            prepared = self.method.prepare(m.prompt, m.clip, task)
            out = []
            for s in range(0, len(idx), bs):
                x = self.bank.inputs("test", idx[s : s + bs])
                logits = self.method.logits(m.prompt, m.clip, x, task, prepared)
                out.append(logits.argmax(dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _positions(haystack: np.ndarray, needles: np.ndarray) -> torch.Tensor | None:
    """Positions of ``needles`` in the sorted-unique ``haystack`` (None if one is missing)."""
    haystack, needles = np.asarray(haystack), np.asarray(needles)
    if len(haystack) == 0:
        return None if len(needles) else torch.zeros(0, dtype=torch.long)
    order = np.argsort(haystack, kind="stable")
    pos = np.minimum(np.searchsorted(haystack[order], needles), len(haystack) - 1)
    if not np.array_equal(haystack[order][pos], needles):
        return None
    return torch.as_tensor(order[pos], dtype=torch.long)


def summarize_clients(per_client: dict[int, dict[str, float]], fed: Federation) -> tuple[dict, dict]:
    """``(mean, per_group)``: per group the mean over its clients of every key; ``mean`` = mean over groups
    (FedTPG: clients of a dataset, then datasets; one group: plain mean over clients); ``hm`` = harmonic mean
    of Local/Base/Novel of the averaged values."""
    by_group: dict[str, list[dict]] = {}
    for cid, res in sorted(per_client.items()):
        by_group.setdefault(fed.clients[cid].group, []).append(res)
    per_group = {g: mean_with_hm(rs) for g, rs in by_group.items()}
    mean = mean_with_hm(list(per_group.values()))
    return mean, (per_group if len(per_group) > 1 else {})


def mean_with_hm(rows: list[dict]) -> dict[str, float]:
    """Mean over rows (clients or groups) of each metric present (NaN skipped), plus ``hm`` of Local/Base/Novel."""
    keys = [k for k in ("local", "base", "novel") if any(k in r for r in rows)]
    keys += [k for k in ("neighbor",) if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith(("acc/", "ood/"))})
    out: dict[str, float] = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r and r[k] == r[k]]
        if vals:
            out[k] = float(np.mean(vals))
    present = [out[k] for k in ("local", "base", "novel") if k in out]
    if present:
        out["hm"] = harmonic_mean(present)
    return out


__all__ = ["Evaluator", "mean_with_hm", "summarize_clients"]
