"""Speed and memory, measured as ratios within one run (no timed assertions anywhere in tests).

    python benchmarks/bench.py speed  --backbone fedlit-toy            # (a) vs naive, (b) vs compute floor
    python benchmarks/bench.py speed  --backbone ViT-B-16 --pretrained none --image-size 224
    python benchmarks/bench.py memory --clients 10 100 1000            # (c) peak memory vs number of clients
    python benchmarks/bench.py procs                                   # (d) 1 vs 2 processes (gloo on CPU)

(a) fedlit's round vs a *naive* round that re-runs the frozen image encoder on every step and deep-copies
    the client model per client (what the official code bases do, spec §9), at identical final accuracy;
(b) fedlit's round vs the *compute floor*: one text-encoder forward+backward over the client's class
    prompts per step, plus one image encoding per distinct image;
(c) peak resident memory of whole runs with 10, 100 and 1,000 clients (CoOp: every client keeps a
    personal context); (d) wall time with 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def _orchestrator(backbone: str, pretrained: str, method, num_clients: int, shots: int, image_size: int | None,
                  run_dir: Path):
    import lightning as L

    from fedlit.backbones import load_backbone
    from fedlit.data.federation import FederatedData
    from fedlit.federation import FedTrainer, Orchestrator

    clip = load_backbone(backbone, pretrained)
    fed = FederatedData(dataset="shapes-dark", num_clients=num_clients, shots=shots).setup(seed=0)
    trainer = FedTrainer(rounds=2, local_epochs=1, batch_size=shots * 2, checkpoint_every=0, progress=False,
                         accelerator="cpu" if not torch.cuda.is_available() else "auto")
    fabric = trainer.make_fabric()
    L.seed_everything(0, verbose=False)
    orch = Orchestrator(fabric, clip, fed, method, trainer, seed=0)
    return orch, clip, fed


def _naive_round(orch, rnd: int) -> None:
    """The official pattern: per client a deep copy of the model, the image encoder re-run every step."""
    from fedlit.methods.base import Update

    base = orch.module
    updates = []
    for cid in range(len(orch.fed.clients)):
        m = copy.deepcopy(base)  # per-client model copy (backbone included)
        m.load_prompt_state(orch.global_state, orch.personal.get(cid, orch.init_personal))
        client = orch.fed.clients[cid]
        opt = m.configure_optimizers()
        y = torch.as_tensor(client.train_y)
        m.task, m.cid = orch.fed.train_task, cid
        order = np.random.default_rng([orch.seed, rnd, cid, 0]).permutation(client.num_samples)  # fedlit's order
        for s in range(0, client.num_samples, orch.cfg.batch_size):
            rows = order[s : s + orch.cfg.batch_size]
            x = orch.bank.images("train", client.train_idx[rows])
            with torch.no_grad():
                feats = m.clip.encode_image(x)  # frozen work, repeated every step
            loss = m.method.loss(m, feats, y[rows], m.task)
            loss.backward()
            opt.step()
            opt.zero_grad()
        shared, personal = m.export()
        updates.append(Update(cid, shared, personal, client.num_samples, float(loss)))
    orch.apply(updates)


def speed(args) -> dict:
    from fedlit.methods.promptfl import PromptFL
    from fedlit.prompts import prompt_template

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        method = PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01)
        orch, clip, fed = _orchestrator(args.backbone, args.pretrained, method, args.clients, args.shots,
                                        args.image_size, Path(tmp))
        if args.image_size and clip.image_size != args.image_size:
            raise SystemExit(f"backbone image size is {clip.image_size}")
        # fedlit: two rounds (the first fills the feature cache, the second is steady state)
        t0 = time.perf_counter()
        for r in range(2):
            updates = [orch.safe_update(c, r) for c in range(len(fed.clients))]
            orch.apply(updates)
        t_fedlit_2 = time.perf_counter() - t0
        t0 = time.perf_counter()
        orch.apply([orch.safe_update(c, 2) for c in range(len(fed.clients))])
        t_fedlit = time.perf_counter() - t0
        acc_fedlit = orch.evaluate(2)["mean"]
        state_fedlit = {k: v.clone() for k, v in orch.global_state.items()}

        # naive: same start, same data order within a client (sequential batches)
        orch2, _, _ = _orchestrator(args.backbone, args.pretrained, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01),
                                    args.clients, args.shots, args.image_size, Path(tmp))
        t0 = time.perf_counter()
        _naive_round(orch2, 0)
        t_naive = time.perf_counter() - t0
        for r in (1, 2):
            _naive_round(orch2, r)
        acc_naive = orch2.evaluate(2)["mean"]

        # compute floor: per step one text fwd+bwd over the task's prompts; one encoding per distinct image
        task = fed.train_task
        tpl = prompt_template(clip, task, 4)
        ctx = torch.zeros(4, clip.text_width, requires_grad=True)
        steps = sum(-(-c.num_samples // orch.cfg.batch_size) for c in fed.clients)
        t0 = time.perf_counter()
        for _ in range(steps):
            f = clip.encode_text_embeddings(tpl.splice(ctx), tpl.eot)
            f.sum().backward()
        t_text = time.perf_counter() - t0
        distinct = sorted({int(i) for c in fed.clients for i in c.train_idx})
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(distinct), 256):
                clip.encode_image(orch.bank.images("train", distinct[s : s + 256]))
        t_img = time.perf_counter() - t0
    res = {
        "backbone": args.backbone, "clients": args.clients, "shots": args.shots, "steps_per_round": steps,
        "fedlit_round_s": round(t_fedlit, 3), "fedlit_first_two_rounds_s": round(t_fedlit_2, 3),
        "naive_round_s": round(t_naive, 3), "speedup_vs_naive": round(t_naive / t_fedlit, 2),
        "floor_round_s (text fwd+bwd per step)": round(t_text, 3), "image_encoding_once_s": round(t_img, 3),
        "fedlit_over_floor": round(t_fedlit / t_text, 2),
        "acc_fedlit": {k: round(v, 2) for k, v in acc_fedlit.items()},
        "acc_naive": {k: round(v, 2) for k, v in acc_naive.items()},
        "state_equal_within_1e-4": bool(all(torch.allclose(state_fedlit[k], orch2.global_state[k], atol=1e-4)
                                            for k in state_fedlit)),
    }
    return res


def _peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    kb = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident" in line)
    return kb / 1024, time.perf_counter() - t0


def memory(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients_list:
            cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", "configs/quickstart.yaml", "--method", "coop",
                   "--data.subsample", "all", "--data.partition", "dirichlet", "--data.beta", "100",
                   "--data.shots", "-1", "--data.min_samples", "1", "--data.num_clients", str(n),
                   "--trainer.rounds", "1", "--trainer.checkpoint_every", "0", "--trainer.batch_size", "64",
                   "--out_dir", f"{tmp}/m{n}"]
            mb, wall = _peak_rss_of(cmd)
            out[n] = {"peak_rss_mb": round(mb, 1), "wall_s": round(wall, 1)}
    return out


def procs(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in (1, 2):
            cmd = [sys.executable, "-m", "fedlit.cli", "fit", "--config", "configs/quickstart.yaml", "--method", "coop",
                   "--trainer.rounds", "3", "--trainer.devices", str(d), "--trainer.accelerator", "cpu",
                   "--out_dir", f"{tmp}/p{d}"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            r = json.loads(Path(f"{tmp}/p{d}/results.json").read_text())
            out[d] = {"wall_s": round(time.perf_counter() - t0, 1), "loop_s": r["wall_time_s"], "final": r["final"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["speed", "memory", "procs"])
    p.add_argument("--backbone", default="fedlit-toy")
    p.add_argument("--pretrained", default="default")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--clients-list", type=int, nargs="+", default=[10, 100, 1000])
    args = p.parse_args()
    res = {"speed": speed, "memory": memory, "procs": procs}[args.which](args)
    print(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "result": res}, indent=2))


if __name__ == "__main__":
    main()
