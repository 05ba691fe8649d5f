"""GPU benchmark (issue 15): image tower images/s, text steps/s, FedTPG cross-class at real scale vs its FLOP floor.

    python benchmarks/gpu.py                       # on one lent GPU: ViT-B/16 (random weights), ≤ 8 min
    python benchmarks/gpu.py --tiny                # CPU smoke scale (fedlit-toy, 3 small datasets; the test suite)

Sections (one JSON document on stdout):

* ``image_tower``: frozen image-tower forward, images/s, bf16 autocast on CUDA (fp32 on CPU), batch ``--img-batch``.
* ``text_step``: forward+backward of CoOp's context (n_ctx 16, 50 class names) and of FedTPG's step (generator +
  20 own classes, n_ctx 4) through the text tower on the default shared-prefix path, steps/s.
* ``fedtpg_cross_class``: FedTPG's seen/unseen-classes protocol at real scale through fedlit's own orchestrator —
  9 procedural datasets with the real class counts (Caltech101 100, Flowers 102, Aircraft 100, UCF101 101, Pets 37,
  Food101 101, DTD 47, Cars 196, SUN397 397), base half dealt 20 classes per client → 30 clients, 8 shots, batch
  200 (1 step per client and round), official FedTPG arguments. As many rounds as fit in the time budget, then
  extrapolated to 500: ``first round (feature cache fill) + 499 × median later round``. Evaluation is not timed.
* ``promptfl_defaults``: PromptFL at the defaults (Dassl augmentation through the view bank, optimiser chain,
  Dassl's last-batch rule; ``--augment none`` for exact features), 10 clients × 5 base classes × 16 shots of a
  100-class procedural dataset, 10 rounds (10 views per image), through fedlit's own round loop; round 1 includes
  the view-bank fill (every view of the run encoded once, batched), so its images/s are reported.
* ``flop_floor``: the arithmetic work that cannot be avoided — one forward of the image tower per distinct training
  image, and per local step one forward+backward of the text side (as fedlit runs it: cut at the last EOT, shared
  prefix) — counted with ``torch.utils.flop_counter`` on real calls, divided by the device's *measured* dense matmul
  rate (bf16 on CUDA, fp32 on CPU). ``fraction_of_floor`` = floor time / extrapolated time.

Images are random (procedural noise at ``--img-size`` px, resized to the tower's input by fedlit as any dataset is);
weights are random — both irrelevant to time. Reference: FedTPG's official log for this setting took 10 h 26 min.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def _sibling(name: str):
    """``benchmarks/<name>.py`` loaded by path: the name ``benchmarks`` may be another package (opacus' wheel
    installs a top-level ``benchmarks``), so it is never imported by that name."""
    import importlib.util

    key = f"fedlit_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


FEDTPG_CLASSES = {"caltech101": 100, "oxford_flowers": 102, "fgvc_aircraft": 100, "ucf101": 101, "oxford_pets": 37,
                  "food101": 101, "dtd": 47, "stanford_cars": 196, "sun397": 397}
TINY_CLASSES = {"a": 10, "b": 13, "c": 8}
_ADJ = ("red", "small", "golden", "wild", "striped", "northern", "giant", "spotted", "common", "black", "little",
        "royal", "desert", "snowy", "green", "great", "silver", "old", "eastern", "long tailed")
_NOUN = ("retriever", "sparrow", "cathedral", "orchid", "pickup truck", "lasagna", "canyon", "harbor", "violin",
         "jellyfish", "lighthouse", "tulip", "airliner", "waffle", "marsh", "beetle", "kayak", "pagoda", "terrier",
         "dumpling", "glacier", "fern", "locomotive", "sushi", "vineyard")


def class_names(n: int, salt: int) -> list[str]:
    """``n`` distinct CoOp-length class names (1–4 BPE tokens each), deterministic per ``salt``."""
    combos = [f"{a} {b}" for a in _ADJ for b in _NOUN]
    order = np.random.default_rng(salt).permutation(len(combos))
    return [combos[i] for i in order[:n]]


def register_datasets(counts: dict[str, int], img_size: int, train_per_class: int, test_per_class: int = 1) -> list[str]:
    """Register procedural noise datasets ``gpu-<name>`` with the given class counts (``test_per_class`` test images
    per class: a Dirichlet partition gives every client test images); returns their names."""
    from fedlit.data import registry
    from fedlit.data.registry import ClassificationData, TensorImageSplit

    names = []
    for k, (name, n) in enumerate(counts.items()):
        full = f"gpu-{name}"

        def build(root, seed, _n=n, _k=k, _full=full, **kw):
            """Procedural noise images (benchmarks/gpu.py): any class count, no data root."""
            g = torch.Generator().manual_seed(1000 * _k + seed)

            def split(per: int):
                y = np.repeat(np.arange(_n), per)
                return TensorImageSplit(y, data=torch.randint(0, 256, (len(y), 3, img_size, img_size),
                                                              dtype=torch.uint8, generator=g))

            return ClassificationData(_full, class_names(_n, _k), split(train_per_class), split(1),
                                      split(test_per_class), img_size)

        if full not in registry._FACTORIES:
            registry.register_dataset(full)(build)
        names.append(full)
    return names


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def matmul_rate(device, seconds: float) -> float:
    """Measured dense matmul FLOP/s (bf16 on CUDA, fp32 on CPU): the roof the floor is divided by."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if iters % 10 == 0:
            _sync(device)
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def timed(fn, device, seconds: float, min_iters: int = 3) -> tuple[float, int]:
    """(median seconds per call, calls) over at least ``min_iters`` calls and ``seconds`` of wall time."""
    fn()
    _sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def image_tower(clip, device, batch: int, seconds: float) -> dict:
    x = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)

    def run():
        with torch.no_grad(), _autocast(device):
            clip.encode_image(x)

    per, n = timed(run, device, seconds)
    return {"batch": batch, "dtype": "bf16" if device.type == "cuda" else "fp32", "images_per_s": round(batch / per, 1),
            "calls": n, "flops_per_image": count_flops(run) // batch}


def text_steps(clip, device, seconds: float) -> dict:
    from fedlit.methods.fedtpg import FedTPG
    from fedlit.prompts import ContextPrompt, Task

    COOP50 = _sibling("bench").COOP50

    out = {"text_path": clip.text_path}
    torch.manual_seed(0)
    coop = ContextPrompt(clip, n_ctx=16).to(device)
    task50 = Task("coop50", COOP50)

    def coop_step():
        with _autocast(device):
            f = coop.text_features(clip, task50)
        f.float().sum().backward()

    method = FedTPG()
    gen = method.build(clip).to(device)
    task20 = Task("own20", tuple(class_names(20, 99)))

    def tpg_step():
        with _autocast(device):
            f = method.text_features(gen, clip, task20)
        f.float().sum().backward()

    for key, fn in (("coop_nctx16_50_classes", coop_step), ("fedtpg_nctx4_20_classes", tpg_step)):
        per, n = timed(fn, device, seconds)
        out[key] = {"steps_per_s": round(1 / per, 2), "calls": n, "flops_per_step": count_flops(fn)}
    return out


def fedtpg_cross_class(args, clip, device, budget_s: float) -> dict:
    import lightning as L

    from fedlit.data.federation import FederatedData
    from fedlit.data.task import client_task
    from fedlit.methods.fedtpg import FedTPG
    from fedlit.orchestrator import Orchestrator
    from fedlit.trainer import FedTrainer

    counts = TINY_CLASSES if args.tiny else FEDTPG_CLASSES
    cpc, shots = (4, 2) if args.tiny else (20, 8)
    t_setup = time.perf_counter()
    names = register_datasets(counts, args.img_size, shots)
    fed = FederatedData(dataset=names, partition="contiguous", classes_per_client=cpc, shots=shots,
                        subsample="base").setup(seed=43)
    trainer = FedTrainer(rounds=500, local_epochs=1, batch_size=200, checkpoint_every=0, progress=False,
                         eval_every=500, accelerator="auto" if device.type == "cuda" else "cpu",
                         lockstep=args.lockstep)
    fabric = trainer.make_fabric()
    L.seed_everything(43, verbose=False)
    torch.manual_seed(43)
    method = FedTPG()
    orch = Orchestrator(fabric, clip, fed, method, trainer, seed=43)
    setup_s = time.perf_counter() - t_setup
    n_clients = len(fed.clients)
    rounds: list[float] = []
    t_loop = time.perf_counter()
    while not rounds or (len(rounds) < args.max_rounds and time.perf_counter() - t_loop + float(np.median(rounds[1:] or rounds)) < budget_s):
        t0 = time.perf_counter()
        rnd = len(rounds)
        orch.apply(orch.train_clients(list(range(n_clients)), rnd, orch.protocol.configure(rnd)))
        _sync(device)
        rounds.append(time.perf_counter() - t0)
    steady = float(np.median(rounds[1:])) if len(rounds) > 1 else rounds[0]
    total_500 = rounds[0] + 499 * steady
    steps = sum(-(-c.num_samples // trainer.batch_size) for c in fed.clients)
    # the floor: one image forward per distinct training image + per step the text side's fwd+bwd, counted on
    # one real client step (generator included) and scaled by the clients' class counts
    m = orch.module
    text_flops = 0
    for c in fed.clients:
        own = client_task(fed.task_of(c.cid), fed.held_classes(c.cid), torch.as_tensor(c.train_y))[0]

        def step(own=own):
            with fabric.autocast():
                f = method.text_features(m.prompt, clip, own)
            f.float().sum().backward()

        text_flops += count_flops(step) * -(-c.num_samples // trainer.batch_size)
    m.prompt.zero_grad(set_to_none=True)
    distinct = len({int(i) for c in fed.clients for i in c.train_idx})
    img = torch.randn(1, 3, clip.image_size, clip.image_size, device=device)
    with torch.no_grad():
        img_flops = count_flops(lambda: clip.encode_image(img)) * distinct
    return {"datasets": len(names), "class_counts": list(counts.values()), "clients": n_clients,
            "lockstep": args.lockstep,
            "classes_per_client": cpc, "shots": shots, "local_steps_per_round": steps, "train_images": distinct,
            "setup_s": round(setup_s, 2), "rounds_run": len(rounds), "round_s": [round(t, 3) for t in rounds],
            "first_round_s (incl. feature cache fill)": round(rounds[0], 3), "steady_round_s (median)": round(steady, 4),
            "extrapolated_500_rounds_s": round(total_500, 1),
            "extrapolated_vs_official_10h26m": round((10 * 3600 + 26 * 60) / total_500, 1),
            "floor_flops": {"image_once": img_flops, "text_per_round": text_flops,
                            "total_500_rounds": img_flops + 500 * text_flops}}


def promptfl_defaults(args, clip, device, budget_s: float) -> dict:
    """PromptFL through fedlit's own round loop at the DEFAULTS (``trainer.augment: method`` = Dassl random-resized
    crops through the view bank, ``optimizer_state: method`` = chain, ``drop_last: method`` = dassl): a procedural
    dataset of ``--promptfl-classes`` classes (base half dealt to ``--promptfl-clients`` disjoint clients),
    ``--promptfl-shots`` shots, batch 32, ``--promptfl-rounds`` rounds (so ``E`` = that many views per image). The
    first round fills the view bank (every view of the run, once, batched); later rounds read it. As many rounds
    as fit in the budget, the rest extrapolated; the image forwards and the floor's (one per (image, view)) counted."""
    import lightning as L

    from fedlit.data.federation import FederatedData
    from fedlit.methods.promptfl import PromptFL
    from fedlit.orchestrator import Orchestrator
    from fedlit.trainer import FedTrainer

    n_cls, clients, shots, R = ((8, 2, 2, 3) if args.tiny else
                                (args.promptfl_classes, args.promptfl_clients, args.promptfl_shots, args.promptfl_rounds))
    names = register_datasets({f"promptfl{n_cls}-{shots}": n_cls}, args.img_size, shots, test_per_class=1)
    fed = FederatedData(dataset=names[0], partition="disjoint", num_clients=clients, shots=shots,
                        subsample="base").setup(seed=1)
    trainer = FedTrainer(rounds=R, local_epochs=1, batch_size=32, checkpoint_every=0, progress=False, eval_every=R,
                         augment=args.augment, accelerator="auto" if device.type == "cuda" else "cpu")
    fabric = trainer.make_fabric()
    L.seed_everything(1, verbose=False)
    torch.manual_seed(1)
    orch = Orchestrator(fabric, clip, fed, PromptFL(), trainer, seed=1, callbacks=[])
    rounds: list[float] = []
    t_loop = time.perf_counter()
    while len(rounds) < R and (not rounds or time.perf_counter() - t_loop + float(np.median(rounds[1:] or rounds)) < budget_s):
        t0 = time.perf_counter()
        orch.train_round(len(rounds))
        _sync(device)
        rounds.append(time.perf_counter() - t0)
    steady = float(np.median(rounds[1:])) if len(rounds) > 1 else rounds[0]
    distinct = len({int(i) for c in fed.clients for i in c.train_idx})
    views = orch.plan.epoch_views or 1
    return {"plan": orch.plan.describe(), "classes": n_cls, "clients": len(fed.clients), "shots": shots,
            "train_images": distinct, "rounds_planned": R, "rounds_run": len(rounds),
            "round_s": [round(t, 3) for t in rounds], "first_round_s (incl. view bank fill)": round(rounds[0], 3),
            "steady_round_s (median)": round(steady, 4),
            "extrapolated_all_rounds_s": round(rounds[0] + (R - 1) * steady, 2),
            "image_forwards": {"fedlit": orch.bank.encoded, "floor (one per distinct (image, view))": distinct * views},
            "view_fill_images_per_s": round(orch.bank.encoded / max(rounds[0] - steady, 1e-9), 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke scale: fedlit-toy, 3 small datasets, 2 rounds")
    p.add_argument("--backbone", default=None, help="default ViT-B-16 (random weights); fedlit-toy with --tiny")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the FedTPG rounds (default 300; tiny 5)")
    p.add_argument("--max-rounds", type=int, default=500)
    p.add_argument("--lockstep", type=int, default=1,
                   help="FedTPG rounds: trainer.lockstep (1: one client at a time; 0: all 30 clients in lock-step)")
    p.add_argument("--section-s", type=float, default=None, help="seconds per timed micro-benchmark (default 10)")
    p.add_argument("--img-batch", type=int, default=None, help="image-tower batch (default 256; tiny 8)")
    p.add_argument("--img-size", type=int, default=32, help="procedural image side before resizing to the tower")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--augment", choices=["method", "dassl", "none"], default="method",
                   help="promptfl_defaults: trainer.augment (default method: Dassl crops through the view bank)")
    p.add_argument("--promptfl-classes", type=int, default=100)
    p.add_argument("--promptfl-clients", type=int, default=10)
    p.add_argument("--promptfl-shots", type=int, default=16)
    p.add_argument("--promptfl-rounds", type=int, default=10, help="promptfl_defaults: rounds (= views per image)")
    p.add_argument("--promptfl-budget-s", type=float, default=None, help="seconds for PromptFL (default 120; tiny 5)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    args.backbone = args.backbone or ("fedlit-toy" if tiny else "ViT-B-16")
    budget = args.budget_s if args.budget_s is not None else (5.0 if tiny else 300.0)
    sec = args.section_s if args.section_s is not None else (0.2 if tiny else 10.0)
    if tiny:
        args.max_rounds = min(args.max_rounds, 2)
    from fedlit.backbones import load_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    clip = load_backbone(args.backbone, "default" if args.backbone == "fedlit-toy" else "none", device=device)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "backbone": f"{args.backbone} ({'bundled' if args.backbone == 'fedlit-toy' else 'random'} weights)",
           "load_s": round(time.perf_counter() - t0, 1)}
    rate = matmul_rate(device, sec)
    out["matmul_flops_per_s (measured roof)"] = round(rate)
    out["image_tower"] = image_tower(clip, device, args.img_batch or (8 if tiny else 256), sec)
    out["text_step"] = text_steps(clip, device, sec)
    tpg = fedtpg_cross_class(args, clip, device, budget)
    floor_s = tpg["floor_flops"]["total_500_rounds"] / rate
    tpg["floor_500_rounds_s"] = round(floor_s, 2)
    tpg["fraction_of_floor"] = round(floor_s / tpg["extrapolated_500_rounds_s"], 4)
    out["fedtpg_cross_class"] = tpg
    pf_budget = args.promptfl_budget_s if args.promptfl_budget_s is not None else (5.0 if tiny else 120.0)
    out["promptfl_defaults"] = promptfl_defaults(args, clip, device, pf_budget)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
