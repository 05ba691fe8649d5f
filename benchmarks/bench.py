"""Speed and memory, measured as ratios within one run (no timed assertions anywhere in tests).

    python benchmarks/bench.py speed  --method promptfl                  # (a) naive, fedlit, floor at the DEFAULTS
    python benchmarks/bench.py speed  --method promptfl --augment none   #     the same with exact cached features
    python benchmarks/bench.py speed  --method fedtpg                    #     FedTPG's protocol (own classes)
    python benchmarks/bench.py speed  --method fedpgp                    #     FedPGP (two contexts per step)
    python benchmarks/bench.py image  --rounds 8                         # the view bank vs open_clip encode_image
    python benchmarks/bench.py scaling --json benchmarks/figures/scaling.json --figure benchmarks/figures/scaling.png
    python benchmarks/bench.py grid                                      # Table-1 grid: image forwards shared vs alone
    python benchmarks/bench.py text   --backbone ViT-B-16 --pretrained none   # one text step: today vs cut vs shared
    python benchmarks/bench.py speed  --backbone ViT-B-16 --pretrained none --clients 2 --shots 1 --batch 12 --rounds 2
    python benchmarks/bench.py memory --method fedpgp --clients-list 10 100 1000   # (c) peak memory vs clients
    python benchmarks/bench.py procs                                   # (d) 1 vs 2 processes (gloo on CPU)
    python benchmarks/bench.py cache                                   # disk feature cache: first vs second run
    python benchmarks/bench.py lockstep --method fedtpg               # clients in lock-step vs one at a time

(a) ``speed`` runs at the run's defaults (``--augment``, ``--optimizer-state``, ``--drop-last``: ``method``, what
    ``fedlit fit`` resolves: Dassl random-resized-crop views through the view bank, the ``chain`` optimiser and
    Dassl's last-batch rule for the Dassl family). Three paths, interleaved round by round:
    *fedlit* = ``Orchestrator.train_round`` (what ``fedlit fit`` runs per round; its first round fills the view
    bank: every view of the run encoded once, batched);
    *naive* = the official pattern: per client a deep copy of the model (backbone included), and every step
    decodes/crops the augmented view of each sample (the SAME views: the bank's ``train_views`` /
    ``augmented_images``) and runs the frozen image tower on it, with the old text pass (all 77 positions of every
    prompt); same client order (``chain``: the official order), batches, optimiser lifecycle;
    *floor* = one image-tower forward per distinct (image, view) actually trained (at open_clip's best batch size,
    :func:`best_image_batch`) + per local step one forward+backward of the method's text side over the classes the
    client trains among, cut at the last EOT with the shared ``[SOS][ctx]`` prefix (``backbone.text_path:
    shared_prefix``, the *new floor*); the view crops are timed beside it. Headline ratios are on the totals of the
    R rounds (fedlit pays its image work up front); steady-state medians are beside them. The final accuracy and
    global state of fedlit and naive are compared;
(image) the training views of a run encoded by fedlit's view bank, by its per-batch path and by open_clip's own
    ``model.encode_image`` at its best batch size, same views, interleaved;
(scaling) round time of fedlit and the floor vs classes, clients and shots (procedural noise datasets of any
    class count, ``benchmarks/gpu.py``), JSON + PNG;
(grid) image-tower forwards of the Table-1 grid (one dataset, one seed, one shared disk cache) vs its cells alone;
(text) one text step (forward+backward of CoOp's context, n_ctx 16, 50 CoOp-length class names) on the old
    path, the truncated plain path and the shared-prefix path, interleaved, medians;
(c) peak resident memory of whole runs (``fedlit fit``) with 10, 100 and 1,000 clients on the same data
    (FedPGP: every client keeps personal U, V); (d) wall time with 1 and 2 processes;
(lockstep) a round with the clients in lock-step (``trainer.lockstep``: ``--lockstep`` M, 0 = all) vs one at a
    time, interleaved round by round, same start and data order (``optimizer_state: fresh`` on both); the final
    global states compared;
(cache) feature encoding with ``trainer.feature_cache=disk``: a first process encodes and writes the cache,
    a second, fresh process reads it.

``--threads`` sets torch's intra-op threads (default 1: on a 2-core machine shared with other jobs two
spinning OpenMP threads made runs 2-3x slower and erratic; every path is measured with the same setting).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import contextlib

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}, load average at start {os.getloadavg()[0]:.2f}")


def _method(name: str):
    if name == "promptfl":
        from fedlit.methods.promptfl import PromptFL

        return PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01)
    if name == "fedtpg":
        from fedlit.methods.fedtpg import FedTPG

        torch.manual_seed(0)  # the generator's initialisation (identical for both paths)
        return FedTPG()  # official hyper-parameters (spec §2.4): n_ctx 4, SGD lr 0.003, unweighted mean
    if name == "fedpgp":
        from fedlit.methods.fedpgp import FedPGP

        torch.manual_seed(0)
        return FedPGP()  # official hyper-parameters: n_ctx 16, rank 8, mu 0.5, tau 0.5, SGD lr 0.001
    raise SystemExit(f"--method {name}: promptfl, fedtpg or fedpgp")


@contextlib.contextmanager
def text_mode(clip, mode: str):
    """``old``: the text pass before issue 15 (plain path, full context length); ``new``: fedlit's current one."""
    saved = clip.text_path, clip.can_truncate
    if mode == "old":
        clip.text_path, clip.can_truncate = "plain", False
    try:
        yield
    finally:
        clip.text_path, clip.can_truncate = saved


def _text_side(method, m, clip, task):
    """The method's text work of one local step (what the floor times)."""
    if method.name == "fedpgp":
        from fedlit.methods.fedpgp import encode_contexts

        return encode_contexts(clip, task, torch.cat([m.prompt.sigma, m.prompt.personal_context()]))
    return method.text_features(m.prompt, clip, task)


def _orchestrator(args, method, lockstep: int = 1, **pins):
    """The run as ``fedlit fit`` builds it: ``trainer.augment`` / ``optimizer_state`` / ``drop_last`` from
    ``--augment`` / ``--optimizer-state`` / ``--drop-last`` (default ``method``: the method's own, what a user gets);
    ``pins`` override them (``lockstep`` compares the same optimiser lifecycle: ``fresh``)."""
    import lightning as L

    from fedlit.backbones import load_backbone
    from fedlit.data.federation import FederatedData
    from fedlit.orchestrator import Orchestrator
    from fedlit.trainer import FedTrainer

    clip = load_backbone(args.backbone, args.pretrained)
    fed = FederatedData(dataset=getattr(args, "dataset", "shapes-dark"), num_clients=args.clients, shots=args.shots,
                        dataset_args=json.loads(args.dataset_args)).setup(seed=0)
    policy = {"augment": getattr(args, "augment", "method"), "optimizer_state": getattr(args, "optimizer_state", "method"),
              "drop_last": getattr(args, "drop_last", "method"), **pins}
    trainer = FedTrainer(rounds=args.rounds, local_epochs=getattr(args, "local_epochs", 1),
                         batch_size=args.batch or args.shots * 2,
                         checkpoint_every=0, progress=False, lockstep=lockstep, **policy,
                         accelerator="cpu" if not torch.cuda.is_available() else "auto")
    fabric = trainer.make_fabric()
    L.seed_everything(0, verbose=False)
    orch = Orchestrator(fabric, clip, fed, method, trainer, seed=0, callbacks=[])
    return orch, clip, fed


def _client_setup(orch, m, cid: int, rnd: int):
    """What :class:`fedlit.engine.LocalRun` does before the steps (shared by the naive path and the floor), from
    the run's client runtime: returns (client, task, classes, what the server sent it)."""
    rt = orch.runtime
    client = rt.federation.clients[cid]
    sent = orch.protocol.payload(cid)
    m.load_prompt_state(sent, orch.protocol.state_of(cid).personal or rt.init_personal)
    task, classes = rt.federation.task_of(cid), rt.federation.held_classes(cid)
    m.train()
    return client, task, classes, {k: v.clone() for k, v in sent.items()}


class NaiveBank:
    """The official pattern's image side, behind the feature bank's interface: every training step decodes and
    crops the augmented view of each of its samples (the SAME view fedlit's view bank holds: ``train_views`` and
    ``augmented_images`` are the bank's) and runs the frozen image tower on the batch; nothing is kept."""

    def __init__(self, bank):
        self.bank, self.encoded = bank, 0

    def train_views(self, *a):
        return self.bank.train_views(*a)

    @torch.no_grad()
    def inputs(self, split: str, idx, views=None) -> torch.Tensor:
        b = self.bank
        x = b.images(split, idx) if views is None else b.augmented_images(split, idx, views)
        self.encoded += len(idx)
        return x if b.kind == "images" else b._tower(x)


def _naive_runtime(orch):
    import dataclasses

    return dataclasses.replace(orch.runtime, bank=NaiveBank(orch.bank))


def _naive_round(orch, rnd: int, rt=None) -> None:
    """The official pattern: per client a deep copy of the model (backbone included), the augmented view of every
    sample decoded, cropped and encoded by the frozen image tower at every step; the same client loop, order
    (``chain``: the official training order), batches, views and optimiser lifecycle as ``fedlit fit``."""
    from fedlit.engine import LocalRun, train_alone
    from fedlit.optimizer_state import training_order

    rt = rt or _naive_runtime(orch)
    sent = orch.protocol.configure(rnd)
    cids = list(sent)
    if orch.plan.optimizer_state == "chain":
        cids = training_order(orch.seed, rnd, cids, orch.plan.train_order == "drawn", orch.cfg.first_round_all)
    updates = []
    for cid in cids:
        m = copy.deepcopy(orch.module)  # per-client model copy (backbone included)
        updates.append(train_alone(orch.fabric, LocalRun(rt, m, cid, rnd, sent[cid], orch.protocol.state_of(cid))))
    orch.apply(updates)


def _round_views(orch, rnd: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The distinct (image, view) pairs the round trains on (every client's batches of every local epoch, after
    the last-batch rule): (train rows, views or ``None`` without augmentation)."""
    rt, pairs = orch.runtime, set()
    for cid in orch.protocol.select(rnd):
        client = rt.federation.clients[cid]
        for epoch in range(orch.cfg.local_epochs):
            for rows in rt.epoch_rows(cid, rnd, epoch):
                v = rt.bank.train_views((rt.seed, rnd, cid, epoch), client.num_samples, rows)
                v = np.full(len(rows), -1) if v is None else v
                pairs.update(zip(client.train_idx[rows].tolist(), v.tolist()))
    pairs = sorted(pairs)
    idx = np.array([i for i, _ in pairs], dtype=np.int64)
    views = np.array([v for _, v in pairs], dtype=np.int64)
    return idx, (None if len(views) and views[0] < 0 else views)


def best_image_batch(clip, sizes=(8, 16, 32, 64, 128, 256), reps: int = 2, autocast=None) -> tuple[int, dict]:
    """open_clip's ``model.encode_image`` throughput (images/s) at each batch size on random images of the tower's
    size, best of ``reps``; returns (best batch, {batch: images/s})."""
    size = clip.image_size if isinstance(clip.image_size, tuple) else (clip.image_size,) * 2
    rates = {}
    for b in sizes:
        x = torch.randn(b, 3, *size, device=clip.device)
        best = float("inf")
        with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
            clip.model.encode_image(x[:1])
            for _ in range(reps):
                t0 = time.perf_counter()
                clip.model.encode_image(x)
                best = min(best, time.perf_counter() - t0)
        rates[b] = round(b / best, 1)
    return max(rates, key=rates.get), rates


def _floor_image(orch, rnd: int, batch: int, seen: set) -> tuple[float, float, int]:
    """The image side of the floor for round ``rnd``: one tower forward per distinct (image, view) the round trains
    that no earlier round of the run trained (``seen``), at ``batch`` images a pass -> (tower s, crop s, forwards)."""
    idx, views = _round_views(orch, rnd)
    keys = list(zip(idx.tolist(), (views if views is not None else np.full(len(idx), -1)).tolist()))
    keep = np.array([k not in seen for k in keys], dtype=bool)
    seen.update(keys)
    idx, views = idx[keep], (views[keep] if views is not None else None)
    bank, t_crop, t_tower = orch.bank, 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            t0 = time.perf_counter()
            x = (bank.images("train", idx[s:s + batch]) if views is None
                 else bank.augmented_images("train", idx[s:s + batch], views[s:s + batch]))
            t1 = time.perf_counter()
            bank._tower(x)
            t_tower += time.perf_counter() - t1
            t_crop += t1 - t0
    return t_tower, t_crop, int(len(idx))


def _floor_round(orch, mode: str = "new", rnd: int = 0) -> tuple[float, int]:
    """Per local step (after the plan's last-batch rule), one forward+backward of the method's text side over the
    classes the client trains among (FedTPG: its own classes), on the live module, with the ``old`` or ``new``
    text pass (see :func:`text_mode`); returns (seconds, steps)."""
    from fedlit.data.task import client_task

    m, method, clip = orch.module, orch.method, orch.clip
    steps, t = 0, 0.0
    for cid in orch.protocol.select(rnd):
        client, task, classes, _ = _client_setup(orch, m, cid, 0)
        if method.name == "fedtpg":
            task = client_task(task, classes, torch.as_tensor(client.train_y))[0]
        n_steps = len(orch.plan.batch_starts(client.num_samples)) * orch.cfg.local_epochs
        t0 = time.perf_counter()
        with text_mode(clip, mode):
            for _ in range(n_steps):
                f = _text_side(method, m, clip, task)
                f.float().sum().backward()
        t += time.perf_counter() - t0
        m.prompt.zero_grad(set_to_none=True)
        steps += n_steps
    return t, steps


def speed(args) -> dict:
    """Naive, fedlit and floor interleaved round by round, so that load from other jobs on a shared machine hits
    them alike, at the run's defaults (``--augment`` / ``--optimizer-state`` / ``--drop-last``: ``method``).
    fedlit = ``Orchestrator.train_round`` (what ``fedlit fit`` runs per round; its first round also fills the view
    bank: every view of the run, encoded once). Headline = totals over the R rounds (the image work is paid
    up front by fedlit, round by round by the naive path and the floor); steady state = median over rounds 2..R."""
    R = args.rounds
    orch, clip, fed = _orchestrator(args, _method(args.method))
    orch2, _, _ = _orchestrator(args, _method(args.method))  # naive: same start, data order, hyper-parameters
    naive_rt = _naive_runtime(orch2)
    best_b, rates = best_image_batch(clip, tuple(args.image_batches), autocast=orch.fabric.autocast)
    t_fedlit, t_naive, t_text, t_old_floor, t_tower, t_crop, floor_fwd = [], [], [], [], [], [], []
    seen: set = set()
    for r in range(R):
        t0 = time.perf_counter()
        orch.train_round(r)
        t_fedlit.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with text_mode(clip, args.naive_text):
            _naive_round(orch2, r, naive_rt)
        t_naive.append(time.perf_counter() - t0)
        tt, tc, n = _floor_image(orch, r, best_b, seen)
        t_tower.append(tt)
        t_crop.append(tc)
        floor_fwd.append(n)
        t, steps = _floor_round(orch, "new", r)
        t_text.append(t)
        t_old_floor.append(_floor_round(orch, "old", r)[0] if args.old_floor else float("nan"))
    fedlit_fwd = orch.bank.encoded  # training views only (evaluation encodes the test split below)
    acc_fedlit = orch.evaluate(R - 1)["mean"]
    acc_naive = orch2.evaluate(R - 1)["mean"]
    state_fedlit = orch.global_state
    t_floor = [a + b for a, b in zip(t_text, t_tower)]
    steady = lambda ts: float(np.median(ts[1:])) if len(ts) > 1 else ts[0]  # noqa: E731
    tot = lambda ts: float(sum(ts))  # noqa: E731
    fl, nv, fo = tot(t_fedlit), tot(t_naive), tot(t_floor)
    rnd3 = lambda ts: [round(t, 3) for t in ts]  # noqa: E731
    return {
        "method": args.method, "backbone": f"{args.backbone}:{args.pretrained}", "image_size": clip.image_size,
        "plan": orch.plan.describe(), "augment": orch.plan.augment, "optimizer_state": orch.plan.optimizer_state,
        "drop_last": orch.plan.drop_last, "views_cached": bool(orch.plan.cache_views and orch.plan.epoch_views),
        "clients": len(fed.clients), "train_images": len({int(i) for c in fed.clients for i in c.train_idx}),
        "batch": orch.cfg.batch_size, "steps_per_round": steps, "rounds": R,
        "image_forwards": {"naive": naive_rt.bank.encoded, "fedlit": fedlit_fwd,
                           "floor": int(sum(floor_fwd))},
        "open_clip_encode_image_images_per_s": rates, "floor_image_batch": best_b,
        "naive_round_s": rnd3(t_naive), "fedlit_round_s": rnd3(t_fedlit), "floor_round_s": rnd3(t_floor),
        "floor_parts_round_s": {"text (new: EOT cut, shared prefix)": rnd3(t_text), "image tower": rnd3(t_tower),
                                "view decode+crop (not in the floor)": rnd3(t_crop)},
        "total_s": {"naive": round(nv, 3), "fedlit": round(fl, 3), "floor": round(fo, 3),
                    "floor + view crops": round(fo + tot(t_crop), 3), "old floor (text only)": round(tot(t_old_floor), 3)},
        "speedup_vs_naive": round(nv / fl, 2), "fedlit_over_floor": round(fl / fo, 2),
        "fedlit_over_floor_with_crops": round(fl / (fo + tot(t_crop)), 2),
        "steady (median rounds 2..R)": {"naive_s": round(steady(t_naive), 3), "fedlit_s": round(steady(t_fedlit), 3),
                                         "floor_s": round(steady(t_floor), 3),
                                         "speedup_vs_naive": round(steady(t_naive) / steady(t_fedlit), 2),
                                         "fedlit_over_floor": round(steady(t_fedlit) / steady(t_floor), 2)},
        "acc_fedlit": {k: round(v, 2) for k, v in acc_fedlit.items()},
        "acc_naive": {k: round(v, 2) for k, v in acc_naive.items()},
        "max_acc_diff_points": round(max(abs(acc_fedlit[k] - acc_naive[k]) for k in acc_fedlit), 3),
        "state_max_abs_diff": float(max((state_fedlit[k] - orch2.global_state[k]).abs().max() for k in state_fedlit)),
    }


class _Spent(list):
    images = 0


def _timed_tower(bank) -> list:
    """Wrap ``bank._tower`` (the image-tower call of the feature bank) to record its seconds (and ``.images``: the
    images it ran, zero slots of a pass included); returns the list."""
    spent, tower = _Spent(), bank._tower

    def timed(x):
        t0 = time.perf_counter()
        out = tower(x)
        spent.append(time.perf_counter() - t0)
        spent.images += len(x)
        return out

    bank._tower = timed
    return spent


def image(args) -> dict:
    """The image side at its own floor: the training views of a run (``E = rounds × local_epochs`` per image at the
    defaults; the images themselves with ``--augment none``) encoded (1) by fedlit's view bank (all views once,
    batched, :meth:`fedlit.features.FeatureBank.features`), (2) by fedlit's per-batch path (``cache_views`` off:
    partial participation), (3) by open_clip's own ``model.encode_image`` on the same crops at each batch size of
    ``--image-batches`` (the best taken). Interleaved ``--reps`` times; medians. The crops (decode + random-resized
    crop + resize, once per view) are timed apart: every path needs them once per (image, view)."""
    from fedlit.features import FeatureBank

    orch, clip, fed = _orchestrator(args, _method(args.method))
    plan, bank0 = orch.plan, orch.bank
    rows = np.unique(np.concatenate([c.train_idx for c in fed.clients]))
    E = plan.epoch_views if plan.augment == "dassl" else 0
    if E:
        idx, views = np.repeat(rows, E), np.tile(np.arange(E), len(rows))
    else:
        idx, views = rows, None
    splits = {"train": fed.data.train}
    kw = dict(autocast=orch.fabric.autocast, kind="features", seed=orch.seed, epoch_views=E,
              local_epochs=orch.cfg.local_epochs)
    sizes = [b for b in args.image_batches if b <= len(idx)] or [len(idx)]
    times: dict[str, list[float]] = {"fedlit view bank": [], "fedlit view bank: tower calls": [],
                                     "fedlit per-batch (views not cached)": [], "view crops (once per view)": [],
                                     **{f"open_clip encode_image @ {b}": [] for b in sizes}}
    ref = got = None
    for _ in range(args.reps):
        bank = FeatureBank(clip, splits, cache_views=True, **kw)
        spent = _timed_tower(bank)
        bank.expect("train", rows)
        t0 = time.perf_counter()
        got = bank.features("train", idx, views) if E else bank.features("train", idx)
        times["fedlit view bank"].append(time.perf_counter() - t0)
        times["fedlit view bank: tower calls"].append(sum(spent))
        n_bank, n_tower = bank.encoded, spent.images
        if E:
            per = FeatureBank(clip, splits, cache_views=False, **kw)
            t0 = time.perf_counter()
            for s in range(0, len(idx), orch.cfg.batch_size):
                per.features("train", idx[s:s + orch.cfg.batch_size], views[s:s + orch.cfg.batch_size])
            times["fedlit per-batch (views not cached)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        crops = torch.cat([bank0.augmented_images("train", idx[s:s + 256], views[s:s + 256]) if E
                           else bank0.images("train", idx[s:s + 256]) for s in range(0, len(idx), 256)])
        times["view crops (once per view)"].append(time.perf_counter() - t0)
        for b in sizes:
            t0 = time.perf_counter()
            with torch.no_grad(), orch.fabric.autocast():
                out = torch.cat([clip.model.encode_image(crops[s:s + b]).float() for s in range(0, len(crops), b)])
            times[f"open_clip encode_image @ {b}"].append(time.perf_counter() - t0)
            ref = out if ref is None else ref
    med = {k: float(np.median(v)) for k, v in times.items() if v}
    best = min(sizes, key=lambda b: med[f"open_clip encode_image @ {b}"])
    oc = med[f"open_clip encode_image @ {best}"]
    crop = med["view crops (once per view)"]
    res = {"method": args.method, "backbone": f"{args.backbone}:{args.pretrained}", "augment": plan.augment,
           "views_per_image": E or 1, "train_images": int(len(rows)), "forwards": int(len(idx)),
           "fedlit_bank_encoded": n_bank, "fedlit_tower_images (zero slots of a pass included)": n_tower,
           "fedlit_pass_padding": round(n_tower / max(n_bank, 1), 3), "fedlit_block_images": bank.block_rows("train", bool(E)) * (E or 1),
           "median_s": {k: round(v, 4) for k, v in med.items()},
           "images_per_s": {k: round(len(idx) / v, 1) for k, v in med.items()},
           "open_clip_best_batch": best,
           "fedlit_bank_over_open_clip_best (crops + tower, both)": round(med["fedlit view bank"] / (crop + oc), 3),
           "fedlit_bank_tower_over_open_clip_best (tower only)":
               round(med["fedlit view bank: tower calls"] / oc, 3),
           "max_abs_diff_fedlit_vs_open_clip": float((got - ref).abs().max())}
    if E:
        res["fedlit_per_batch_over_open_clip_best (crops + tower)"] = round(
            med["fedlit per-batch (views not cached)"] / (crop + oc), 3)
    return res


def _scaling_point(args, classes: int, clients: int, per_client: int, partition: str) -> dict:
    """One point of the scaling curves: a procedural noise dataset of ``classes`` classes (``benchmarks/gpu.py``'s
    datasets: any class count), ``clients`` clients, ~``per_client`` training images each; fedlit's rounds
    (``Orchestrator.train_round`` at the defaults) and the floor's (text per step + one tower forward per new
    (image, view) at the best batch), interleaved; per round = the run's total / rounds (the view bank is filled
    in round 1)."""
    gpu = _sibling_gpu()
    if partition == "disjoint":  # every client its own classes_per_client classes, per_client / those shots each
        cpc = max(1, classes // clients)
        shots, tpc = max(1, per_client // cpc), max(1, per_client // cpc)
        data = dict(partition="disjoint", subsample="all", shots=shots)
    else:  # iid clients over the pool of every class (``partition: domain``): PromptFL's CE runs over all ``classes``
        tpc = max(1, -(-per_client * clients // classes))
        data = dict(partition="domain", subsample="all", shots=-1)
    test = max(1, -(-2 * clients // classes))
    name = gpu.register_datasets({f"scale-c{classes}-t{tpc}-e{test}": classes}, img_size=args.img_size,
                                 train_per_class=tpc, test_per_class=test)[0]
    a = argparse.Namespace(**{**vars(args), "dataset": name, "clients": clients})
    import lightning as L

    from fedlit.backbones import load_backbone
    from fedlit.data.federation import FederatedData
    from fedlit.orchestrator import Orchestrator
    from fedlit.trainer import FedTrainer

    clip = load_backbone(args.backbone, args.pretrained)
    fed = FederatedData(dataset=[name] if data["partition"] == "domain" else name, num_clients=clients,
                        **data).setup(seed=0)
    trainer = FedTrainer(rounds=a.rounds, local_epochs=1, batch_size=args.batch or 8, checkpoint_every=0,
                         progress=False, augment=args.augment, optimizer_state=args.optimizer_state,
                         drop_last=args.drop_last, accelerator="cpu" if not torch.cuda.is_available() else "auto")
    fabric = trainer.make_fabric()
    L.seed_everything(0, verbose=False)
    with contextlib.redirect_stdout(sys.stderr):
        orch = Orchestrator(fabric, clip, fed, _method(args.method), trainer, seed=0, callbacks=[])
    t_fedlit, t_floor, seen = [], [], set()
    for r in range(a.rounds):
        t0 = time.perf_counter()
        orch.train_round(r)
        t_fedlit.append(time.perf_counter() - t0)
        tt, _, _ = _floor_image(orch, r, args.floor_batch, seen)
        t_floor.append(tt + _floor_round(orch, "new", r)[0])
    return {"plan": orch.plan.describe(), "classes": classes, "clients": len(fed.clients), "train_images": int(sum(c.num_samples for c in fed.clients)),
            "per_client_images": round(float(np.mean([c.num_samples for c in fed.clients])), 1),
            "classes_in_softmax": round(float(np.mean([len(orch.fed.task_of(c.cid)) for c in fed.clients])), 1),
            "fedlit_round_s": round(sum(t_fedlit) / a.rounds, 4), "floor_round_s": round(sum(t_floor) / a.rounds, 4),
            "fedlit_over_floor": round(sum(t_fedlit) / sum(t_floor), 2),
            "rounds_s": {"fedlit": [round(t, 3) for t in t_fedlit], "floor": [round(t, 3) for t in t_floor]}}


def _sibling_gpu():
    import importlib.util

    key = "fedlit_benchmarks_gpu"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / "gpu.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def scaling(args) -> dict:
    """Round time of fedlit and of the floor vs classes, vs clients and vs shots (``--classes-list``,
    ``--clients-list``, ``--shots-list``) at the defaults; writes ``--json`` and the figure ``--figure``."""
    from fedlit.backbones import load_backbone

    clip = load_backbone(args.backbone, args.pretrained)
    args.floor_batch = best_image_batch(clip, tuple(args.image_batches))[0]
    out = {"method": args.method, "backbone": f"{args.backbone}:{args.pretrained}", "rounds": args.rounds,
           "batch": args.batch or 8, "floor_image_batch": args.floor_batch, "augment": args.augment,
           "optimizer_state": args.optimizer_state,
           "setting": {"classes": f"{args.scale_clients} clients, iid over the pool of all classes, "
                                  f"~{args.per_client} images per client",
                       "clients": f"{args.scale_classes} classes, iid, ~{args.per_client} images per client",
                       "shots": f"{args.scale_clients} clients, disjoint classes ({args.scale_classes} classes: "
                                f"{max(1, args.scale_classes // args.scale_clients)} per client), K shots"},
           "classes": [_scaling_point(args, c, args.scale_clients, args.per_client, "iid") for c in args.classes_list],
           "clients": [_scaling_point(args, args.scale_classes, n, args.per_client, "iid") for n in args.clients_list],
           "shots": [_scaling_point(args, args.scale_classes, args.scale_clients,
                                    k * max(1, args.scale_classes // args.scale_clients), "disjoint")
                     for k in args.shots_list]}
    out["plan"] = out["classes"][0]["plan"]
    for key, s in (("classes", "classes"), ("clients", "clients"), ("shots", "shots")):
        for pt, k in zip(out[key], {"classes": args.classes_list, "clients": args.clients_list,
                                    "shots": args.shots_list}[key]):
            pt["x"] = k
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.figure:
        scaling_figure(out, args.figure)
    return out


def scaling_figure(res: dict, path) -> None:
    """Three panels (vs classes, clients, shots), fedlit and floor round time, log-log (fedlit/figures.py style)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from fedlit.figures import figure

    fig = figure(11, 3.4)
    labels = {"classes": "classes (all in every client's softmax)", "clients": "clients", "shots": "shots per class"}
    for i, key in enumerate(("classes", "clients", "shots")):
        ax = fig.add_subplot(1, 3, i + 1)
        xs = [p["x"] for p in res[key]]
        ax.plot(xs, [p["fedlit_round_s"] for p in res[key]], "o-", color="#4C72B0", label="fedlit")
        ax.plot(xs, [p["floor_round_s"] for p in res[key]], "s--", color="#55A868", label="floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(labels[key])
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xs)
        ax.grid(True, which="both", alpha=0.3)
        if i == 0:
            ax.set_ylabel("seconds per round")
            ax.legend(frameon=False)
    fig.suptitle(f"{res['plan']}\n{res['backbone']}: round time = run total / {res['rounds']} rounds",
                 fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


TABLE1_METHODS = ("zeroshot", "coop", "promptfl", "fedprox", "fedmaple", "fedcocoop", "fedotp", "fedpgp")


def _count_tower_images():
    """Count the images that enter any loaded backbone's image tower (a forward hook on its patch embedding /
    stem, registered on every backbone in :mod:`fedlit.backbones`' cache as it appears): returns a callable
    giving the count so far (zero slots of a full encoding pass count too: they are forwards)."""
    from fedlit import backbones

    count, hooked = [0], set()

    def hook(_m, inputs):
        count[0] += int(inputs[0].shape[0])

    def refresh():
        for clip in list(backbones._CACHE.values()):
            v = getattr(getattr(clip, "model", None), "visual", None)
            first = getattr(v, "conv1", None) or getattr(v, "stem", None) if v is not None else None
            if first is not None and id(first) not in hooked:
                hooked.add(id(first))
                first.register_forward_pre_hook(hook)
        return count[0]

    return refresh


def grid(args) -> dict:
    """Image-tower forwards of the Table-1 grid (``--grid-methods``, one dataset, one seed, the embedded backbone,
    the grid's own cell commands: ``fedlit.apps.table1.fit_command``) run as a grid — every cell on one disk
    feature cache (``trainer.feature_cache: disk``: the views of a seed and the test features are shared) — vs
    the sum of its cells run alone (each its own empty cache). Counts, not seconds."""
    from fedlit.apps.table1 import fit_command
    from fedlit.experiment import fit_argv

    count = _count_tower_images()
    from fedlit.backbones import load_backbone

    load_backbone(args.backbone, args.pretrained)  # in the cache before the first cell: its tower is hooked
    count()
    out = {"methods": list(args.grid_methods), "dataset": args.grid_dataset, "seed": 1, "backbone": args.backbone,
           "cells": {}}
    import atexit
    import shutil

    tmp = args.cache_dir or tempfile.mkdtemp(prefix="fedlit-grid-")
    if not args.cache_dir:  # removed at exit, after the disk stores' own exit flush (atexit runs last-in first-out)
        atexit.register(shutil.rmtree, tmp, True)
    if True:
        for mode in ("grid (one shared disk cache)", "alone (each cell its own cache)"):
            for m in args.grid_methods:
                cache = f"{tmp}/shared" if mode.startswith("grid") else f"{tmp}/alone-{m}"
                run = Path(tmp) / mode[:4] / m
                cmd = fit_command(m, args.grid_dataset, 1, args.backbone, run, rounds=args.rounds,
                                  extra=["--trainer.feature_cache", "disk", "--trainer.cache_dir", cache,
                                         "--trainer.progress", "false"])
                before = count()
                with contextlib.redirect_stdout(sys.stderr):
                    rc = fit_argv(cmd[cmd.index("fit") + 1:])
                gc.collect()  # as the grid runner does between in-process cells
                n = count() - before
                res = json.loads((run / "results.json").read_text()) if rc == 0 else {}
                out["cells"].setdefault(m, {})[mode.split(" ")[0]] = {
                    "tower_images": n, "bank_encoded": res.get("images_encoded"), "rc": rc,
                    "augment": (res.get("plan") or {}).get("augment"),
                    "cache_dirs": sorted(p.name for p in Path(cache).glob("*/*"))}
    tot = {k: sum(c[k]["tower_images"] for c in out["cells"].values()) for k in ("grid", "alone")}
    out["total_tower_images"] = tot
    out["grid_over_alone"] = round(tot["grid"] / max(tot["alone"], 1), 3)
    return out


def lockstep(args) -> dict:
    """Rounds with the clients in lock-step vs one at a time (interleaved; steady = median over rounds 2..R)."""
    seq, clip, fed = _orchestrator(args, _method(args.method), optimizer_state="fresh")
    lock, _, _ = _orchestrator(args, _method(args.method), lockstep=args.lockstep, optimizer_state="fresh")
    cids = list(range(len(fed.clients)))
    times: dict[str, list[float]] = {"sequential": [], "lockstep": []}
    for r in range(args.rounds):
        for name, orch in (("sequential", seq), ("lockstep", lock)):
            t0 = time.perf_counter()
            orch.apply(orch.train_clients(cids, r, orch.protocol.configure(r)))
            times[name].append(time.perf_counter() - t0)
    steady = {k: float(np.median(v[1:])) if len(v) > 1 else v[0] for k, v in times.items()}
    diff = max(float((seq.global_state[k] - lock.global_state[k]).abs().max()) for k in seq.global_state)
    return {
        "method": args.method, "backbone": f"{args.backbone}:{args.pretrained}", "clients": len(fed.clients),
        "lockstep": args.lockstep, "batch": seq.cfg.batch_size, "rounds": args.rounds,
        "steps_per_client_round": [len(seq.plan.batch_starts(c.num_samples)) for c in fed.clients],
        **{f"{k}_round_s": [round(t, 3) for t in v] for k, v in times.items()},
        **{f"{k}_steady_round_s": round(v, 3) for k, v in steady.items()},
        "speedup": round(steady["sequential"] / steady["lockstep"], 2),
        "global_state_max_abs_diff": diff,
    }


COOP50 = (  # 37 Oxford-Pets breeds + 13 Food-101 dishes: CoOp-length class names
    "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle", "Bengal", "Birman",
    "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau", "English Cocker Spaniel", "English Setter",
    "German Shorthaired", "Great Pyrenees", "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon",
    "Miniature Pinscher", "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard",
    "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx", "Staffordshire Bull Terrier", "Wheaten Terrier",
    "Yorkshire Terrier", "apple pie", "baby back ribs", "baklava", "beef carpaccio", "beef tartare", "beet salad",
    "beignets", "bibimbap", "bread pudding", "breakfast burrito", "bruschetta", "caesar salad", "cannoli")


def text(args) -> dict:
    """One text step (forward + backward into CoOp's context) on three paths, interleaved ``--reps`` times."""
    from fedlit.backbones import load_backbone
    from fedlit.prompts import ContextPrompt, Task, prompt_template

    clip = load_backbone(args.backbone, args.pretrained)
    task = Task("coop50", COOP50)
    torch.manual_seed(0)
    prompt = ContextPrompt(clip, n_ctx=args.n_ctx)
    w = torch.randn(len(task), clip.embed_dim)
    paths = {"old (plain, full length)": ("old", "plain"), "plain, cut at last EOT": ("new", "plain"),
             "shared prefix (default)": ("new", "shared_prefix")}
    times = {k: [] for k in paths}
    feats, grads = {}, {}
    for _ in range(args.reps):
        for key, (mode, path) in paths.items():
            with text_mode(clip, mode):
                saved, clip.text_path = clip.text_path, path if mode == "new" else clip.text_path
                try:
                    prompt.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    f = prompt.text_features(clip, task)
                    (f * w).sum().backward()
                    times[key].append(time.perf_counter() - t0)
                finally:
                    clip.text_path = saved
            feats[key], grads[key] = f.detach(), prompt.ctx.grad.clone()
    ref = "old (plain, full length)"
    med = {k: float(np.median(v)) for k, v in times.items()}
    tpl = prompt_template(clip, task, args.n_ctx)
    return {
        "backbone": f"{args.backbone}:{args.pretrained}", "classes": len(task), "n_ctx": args.n_ctx,
        "context_length": clip.context_length, "last_eot_plus_1": int(tpl.eot.max()) + 1, "shared_prefix": tpl.common,
        "reps": args.reps, "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "speedup_vs_old (median)": {k: round(med[ref] / v, 2) for k, v in med.items()},
        "max_abs_feature_diff_vs_old": {k: float((feats[k] - feats[ref]).abs().max()) for k in feats},
        "max_abs_grad_diff_vs_old": {k: float((grads[k] - grads[ref]).abs().max()) for k in grads},
        "max_abs_grad_old": float(grads[ref].abs().max()),
    }


def _peak_rss_of(cmd: list[str], env: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    kb = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident" in line)
    return kb / 1024, time.perf_counter() - t0


def _env(args) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def memory(args) -> dict:
    """Whole ``fedlit fit`` runs, one per client count, on the same data (Dirichlet β=100 over every image)."""
    out = {}
    dargs = json.dumps({"train_per_class": args.train_per_class, "test_per_class": args.test_per_class})
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients_list:
            cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", f"configs/{args.method}.yaml",
                   "--config", "configs/embedded.yaml",
                   "--data.subsample", "all", "--data.partition", "dirichlet", "--data.beta", "100",
                   "--data.shots", "-1", "--data.min_samples", "1", "--data.num_clients", str(n),
                   "--data.dataset_args", dargs, "--trainer.rounds", "1", "--out_dir", f"{tmp}/m{n}"]
            mb, wall = _peak_rss_of(cmd, _env(args))
            res = json.loads(next(Path(f"{tmp}/m{n}").rglob("results.json")).read_text())
            out[n] = {"peak_rss_mb": round(mb, 1), "wall_s": round(wall, 1), "clients_evaluated": len(res["per_client"]),
                      "images_encoded": res.get("images_encoded"), "final": res["final"]}
        base = out[args.clients_list[0]]["peak_rss_mb"]
        for n in args.clients_list:
            out[n]["ratio_to_first"] = round(out[n]["peak_rss_mb"] / base, 3)
        out["command_per_point"] = shlex.join(cmd[1:]).replace(f"{tmp}/m{n}", "OUT").replace(
            f"--data.num_clients {n}", "--data.num_clients N")
    return out


def procs(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in (1, 2):
            cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", "configs/quickstart.yaml", "--method", "coop",
                   "--trainer.rounds", "3", "--trainer.devices", str(d), "--trainer.accelerator", "cpu",
                   "--out_dir", f"{tmp}/p{d}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=_env(args))
            r = json.loads(next(Path(f"{tmp}/p{d}").rglob("results.json")).read_text())
            out[d] = {"wall_s": round(time.perf_counter() - t0, 1), "loop_s": r["wall_time_s"], "final": r["final"]}
    return out


def _cache_phase(args) -> dict:
    """One process: key + encode (or read) every train and test image through a disk FeatureBank."""
    from fedlit.backbones import load_backbone
    from fedlit.data.registry import get_dataset
    from fedlit.features import FeatureBank

    clip = load_backbone(args.backbone, args.pretrained)
    data = get_dataset("shapes-dark", seed=0, **json.loads(args.dataset_args))
    t0 = time.perf_counter()
    bank = FeatureBank(clip, {"train": data.train, "test": data.test}, cache="disk", cache_dir=args.cache_dir)
    paths = [bank.cache_path(s) for s in ("train", "test")]  # computes the keys (tower and data digests)
    t_key = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for split in ("train", "test"):
        f = bank.features(split, np.arange(len(data.split(split))))
        n += len(f)
    bank.flush()
    t_feat = time.perf_counter() - t0
    size = sum(p.stat().st_size for d in paths for p in d.iterdir())
    return {"images": n, "encoded": bank.encoded, "key_s": round(t_key, 3), "features_s": round(t_feat, 3),
            "cache_bytes": size, "dirs": [str(p.name) for p in paths]}


def cache(args) -> dict:
    if args.phase:
        return _cache_phase(args)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in ("first", "second"):
            cmd = [sys.executable, __file__, "cache", "--phase", phase, "--cache-dir", tmp, "--backbone", args.backbone,
                   "--pretrained", args.pretrained, "--dataset-args", args.dataset_args, "--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(args))
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            out[phase] = {**json.loads(proc.stdout)["result"], "process_wall_s": round(time.perf_counter() - t0, 1)}
    out["speedup_second_vs_first (features_s)"] = round(out["first"]["features_s"] / max(out["second"]["features_s"], 1e-9), 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["speed", "image", "scaling", "grid", "memory", "procs", "cache", "text", "lockstep"])
    p.add_argument("--method", default=None,
                   help="speed: promptfl (default), fedtpg or fedpgp; memory: fedpgp (default), coop …")
    p.add_argument("--backbone", default="fedlit-toy")
    p.add_argument("--pretrained", default="default")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--batch", type=int, default=None, help="local batch size (default 2 × shots)")
    p.add_argument("--rounds", type=int, default=4, help="speed: rounds per path (the first fills the cache)")
    p.add_argument("--dataset-args", default="{}", help="JSON for data.dataset_args (speed, cache)")
    p.add_argument("--clients-list", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--train-per-class", type=int, default=512, help="memory: shapes images per class")
    p.add_argument("--test-per-class", type=int, default=128, help="memory: shapes test images per class")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lockstep", type=int, default=0, help="lockstep: clients per lock-step group (0 = all)")
    p.add_argument("--reps", type=int, default=5, help="text: interleaved repetitions per path")
    p.add_argument("--n-ctx", type=int, default=16, help="text: context tokens")
    p.add_argument("--naive-text", choices=["old", "new"], default="old",
                   help="speed: the naive path's text pass (old: full length, plain, as the official code bases)")
    p.add_argument("--augment", choices=["method", "dassl", "none"], default="method",
                   help="speed/scaling/image: trainer.augment (default method: the method's own, PromptFL/FedPGP dassl)")
    p.add_argument("--optimizer-state", choices=["method", "chain", "fresh", "per_client"], default="method",
                   help="speed/scaling: trainer.optimizer_state (default method: e.g. chain for the Dassl family)")
    p.add_argument("--drop-last", choices=["method", "dassl", "never"], default="method",
                   help="speed/scaling: trainer.drop_last (default method)")
    p.add_argument("--image-batches", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256],
                   help="image: open_clip encode_image batch sizes swept (the best is the reference)")
    p.add_argument("--classes-list", type=int, nargs="+", default=[10, 25, 50, 100, 200], help="scaling: classes")
    p.add_argument("--shots-list", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="scaling: shots")
    p.add_argument("--scale-clients", type=int, default=10, help="scaling: clients of the classes and shots curves")
    p.add_argument("--scale-classes", type=int, default=20, help="scaling: classes of the clients and shots curves")
    p.add_argument("--per-client", type=int, default=8, help="scaling: training images per client (classes, clients)")
    p.add_argument("--img-size", type=int, default=32, help="scaling: procedural image side")
    p.add_argument("--json", default=None, help="scaling: write the result here")
    p.add_argument("--figure", default=None, help="scaling: write the PNG figure here")
    p.add_argument("--grid-methods", nargs="+", default=list(TABLE1_METHODS), help="grid: the grid's methods")
    p.add_argument("--grid-dataset", default="oxford_pets", help="grid: Table-1 dataset (embedded stand-in on fedlit-toy)")
    p.add_argument("--no-old-floor", dest="old_floor", action="store_false",
                   help="speed: skip the old floor (the text pass before issue 15: slow on a ViT-B-16)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.method = args.method or {"speed": "promptfl", "image": "promptfl", "scaling": "promptfl", "memory": "fedpgp",
                                  "lockstep": "promptfl"}.get(args.which)
    res = {"speed": speed, "image": image, "scaling": scaling, "grid": grid, "memory": memory, "procs": procs,
           "cache": cache, "text": text, "lockstep": lockstep}[args.which](args)
    cmd = " ".join(["python", "benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)])
    print(json.dumps({"machine": machine(), "command": cmd, "result": res}, indent=2))
    return res


if __name__ == "__main__":
    main()
