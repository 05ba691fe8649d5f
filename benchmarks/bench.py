"""Speed and memory, measured as ratios within one run (no timed assertions anywhere in tests).

    python benchmarks/bench.py speed  --method promptfl                  # (a) vs naive, (b) vs compute floor
    python benchmarks/bench.py speed  --method fedtpg                    #     FedTPG's protocol (own classes)
    python benchmarks/bench.py speed  --method fedpgp                    #     FedPGP (two contexts per step)
    python benchmarks/bench.py text   --backbone ViT-B-16 --pretrained none   # one text step: today vs cut vs shared
    python benchmarks/bench.py speed  --backbone ViT-B-16 --pretrained none --clients 2 --shots 1 --batch 12 --rounds 2
    python benchmarks/bench.py memory --method fedpgp --clients-list 10 100 1000   # (c) peak memory vs clients
    python benchmarks/bench.py procs                                   # (d) 1 vs 2 processes (gloo on CPU)
    python benchmarks/bench.py cache                                   # disk feature cache: first vs second run
    python benchmarks/bench.py lockstep --method fedtpg               # clients in lock-step vs one at a time

(a) fedlit's round vs a *naive* round that re-runs the frozen image encoder on every step and deep-copies
    the client model (backbone included) per client (what the official code bases do, spec §9), same
    data order and hyper-parameters, compared at the final accuracy and global state;
(b) fedlit's round vs the *compute floor*: per local step one forward+backward of the method's text side
    over the classes the client trains among, nothing else; plus one image encoding per distinct training
    image, paid once per run. The *old floor* runs that text side as before issue 15 (every class prompt at the
    full context length, the plain path); the *new floor* runs it as fedlit now does (cut at the last EOT, the
    shared ``[SOS][ctx]`` prefix encoded once per context: ``backbone.text_path=shared_prefix``). The naive path
    keeps the old text pass (the official code bases encode all 77 positions of every prompt);
(text) one text step (forward+backward of CoOp's context, n_ctx 16, 50 CoOp-length class names) on the old
    path, the truncated plain path and the shared-prefix path, interleaved, medians;
(c) peak resident memory of whole runs (``fedlit fit``) with 10, 100 and 1,000 clients on the same data
    (FedPGP: every client keeps personal U, V); (d) wall time with 1 and 2 processes;
(lockstep) a round with the clients in lock-step (``trainer.lockstep``: ``--lockstep`` M, 0 = all) vs one at a
    time, interleaved round by round, same start and data order; the final global states compared;
(cache) feature encoding with ``trainer.feature_cache=disk``: a first process encodes and writes the cache,
    a second, fresh process reads it.

``--threads`` sets torch's intra-op threads (default 1: on a 2-core machine shared with other jobs two
spinning OpenMP threads made runs 2-3x slower and erratic; every path is measured with the same setting).
"""

from __future__ import annotations

import argparse
import copy
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


def _orchestrator(args, method, lockstep: int = 1):
    import lightning as L

    from fedlit.backbones import load_backbone
    from fedlit.data.federation import FederatedData
    from fedlit.orchestrator import Orchestrator
    from fedlit.trainer import FedTrainer

    clip = load_backbone(args.backbone, args.pretrained)
    fed = FederatedData(dataset="shapes-dark", num_clients=args.clients, shots=args.shots,
                        dataset_args=json.loads(args.dataset_args)).setup(seed=0)
    # augment none / drop_last never: the naive path and the floor do the same work (exact features, every batch);
    # optimizer_state fresh: lock-step and the sequential loop compare the same optimiser lifecycle
    trainer = FedTrainer(rounds=args.rounds, local_epochs=1, batch_size=args.batch or args.shots * 2,
                         checkpoint_every=0, progress=False, lockstep=lockstep, augment="none", drop_last="never",
                         optimizer_state="fresh",
                         accelerator="cpu" if not torch.cuda.is_available() else "auto")
    fabric = trainer.make_fabric()
    L.seed_everything(0, verbose=False)
    orch = Orchestrator(fabric, clip, fed, method, trainer, seed=0)
    return orch, clip, fed


def _client_setup(orch, m, cid: int, rnd: int):
    """What :meth:`Orchestrator.local_update` does before the steps (shared by the naive path and the floor):
    returns (client, task, classes, what the server sent it)."""
    client = orch.fed.clients[cid]
    sent = orch.protocol.payload(cid)
    m.load_prompt_state(sent, orch.protocol.state_of(cid).personal or orch.init_personal)
    task, classes = orch.fed.task_of(cid), orch.fed.held_classes(cid)
    m.train()
    return client, task, classes, {k: v.clone() for k, v in sent.items()}


def _optimizer_for(orch, m, cid: int):
    """The client's optimiser for module ``m``, built by the orchestrator's own rule (fresh, or restored from the
    client's persistent state with its scheduled lr) -> (optimizer, tracked)."""
    saved, orch.module = orch.module, m
    try:
        opt, tracked, _ = orch._client_optimizer(orch.protocol.state_of(cid))
    finally:
        orch.module = saved
    return opt, tracked


def _naive_round(orch, rnd: int) -> None:
    """The official pattern: per client a deep copy of the model, the image encoder re-run every step."""
    from fedlit.methods.base import Update

    updates = []
    for cid in range(len(orch.fed.clients)):
        m = copy.deepcopy(orch.module)  # per-client model copy (backbone included)
        client, task, classes, sent = _client_setup(orch, m, cid, rnd)
        opt, _ = _optimizer_for(orch, m, cid)
        y = torch.as_tensor(client.train_y)
        losses, step = [], 0
        for epoch in range(orch.cfg.local_epochs):
            order = np.random.default_rng([orch.seed, rnd, cid, epoch]).permutation(client.num_samples)  # fedlit's
            for s in range(0, client.num_samples, orch.cfg.batch_size):
                rows = order[s : s + orch.cfg.batch_size]
                x = orch.bank.images("train", client.train_idx[rows])
                with torch.no_grad():
                    feats = m.clip.encode_image(x)  # frozen work, repeated every step
                loss = m.training_step((feats, y[rows]), step, task, classes, sent)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
                step += 1
        shared, personal = m.export()
        optim = orch.optim.finish(opt, orch.protocol.state_of(cid))  # as fedlit keeps it (chain / per client)
        updates.append(Update(cid, shared, personal, client.num_samples, float(np.mean(losses)), step, optim=optim))
    orch.apply(updates)


def _floor_round(orch, mode: str = "new") -> tuple[float, int]:
    """Per local step, one forward+backward of the method's text side over the classes the client trains
    among (FedTPG: its own classes), on the live module, with the ``old`` or ``new`` text pass (see
    :func:`text_mode`); returns (seconds, steps)."""
    from fedlit.data.task import client_task

    m, method, clip = orch.module, orch.method, orch.clip
    steps, t = 0, 0.0
    for cid in range(len(orch.fed.clients)):
        client, task, classes, _ = _client_setup(orch, m, cid, 0)
        if method.name == "fedtpg":
            task = client_task(task, classes, torch.as_tensor(client.train_y))[0]
        n_steps = -(-client.num_samples // orch.cfg.batch_size) * orch.cfg.local_epochs
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
    """The three paths interleaved round by round (fedlit, naive, floor), so that load from other jobs on a
    shared machine hits them alike; steady state = median over rounds 2..R (round 1 also fills fedlit's cache)."""
    R = args.rounds
    orch, clip, fed = _orchestrator(args, _method(args.method))
    orch2, _, _ = _orchestrator(args, _method(args.method))  # naive: same start, data order, hyper-parameters
    t_fedlit, t_naive, t_floor, t_old_floor = [], [], [], []
    for r in range(R):
        t0 = time.perf_counter()
        orch.apply([orch.safe_update(c, r) for c in range(len(fed.clients))])
        t_fedlit.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with text_mode(clip, args.naive_text):
            _naive_round(orch2, r)
        t_naive.append(time.perf_counter() - t0)
        t, steps = _floor_round(orch, "new")
        t_floor.append(t)
        t_old_floor.append(_floor_round(orch, "old")[0])
    acc_fedlit = orch.evaluate(R - 1)["mean"]
    acc_naive = orch2.evaluate(R - 1)["mean"]
    state_fedlit = orch.global_state
    distinct = sorted({int(i) for c in fed.clients for i in c.train_idx})
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(distinct), 256):
            clip.encode_image(orch.bank.images("train", distinct[s : s + 256]))
    t_img = time.perf_counter() - t0

    steady = lambda ts: float(np.median(ts[1:])) if len(ts) > 1 else ts[0]  # noqa: E731
    fl, nv, fo, old = steady(t_fedlit), steady(t_naive), steady(t_floor), steady(t_old_floor)
    return {
        "method": args.method, "backbone": f"{args.backbone}:{args.pretrained}", "image_size": clip.image_size,
        "clients": len(fed.clients), "train_images": len(distinct), "batch": orch.cfg.batch_size,
        "steps_per_round": steps, "rounds": R,
        "fedlit_round_s": [round(t, 3) for t in t_fedlit], "naive_round_s": [round(t, 3) for t in t_naive],
        "fedlit_steady_round_s": round(fl, 3), "naive_steady_round_s": round(nv, 3),
        "speedup_vs_naive": round(nv / fl, 2),
        "floor_round_s": [round(t, 3) for t in t_floor], "floor_steady_round_s": round(fo, 3),
        "fedlit_over_floor": round(fl / fo, 2),
        "old_floor_round_s": [round(t, 3) for t in t_old_floor], "old_floor_steady_round_s": round(old, 3),
        "fedlit_over_old_floor": round(fl / old, 2), "old_floor_over_new_floor": round(old / fo, 2),
        "best_of_rounds (min over rounds 2..R)": {
            "fedlit_s": round(min(t_fedlit[1:] or t_fedlit), 3), "naive_s": round(min(t_naive[1:] or t_naive), 3),
            "floor_s": round(min(t_floor[1:] or t_floor), 3),
            "speedup_vs_naive": round(min(t_naive[1:] or t_naive) / min(t_fedlit[1:] or t_fedlit), 2),
            "fedlit_over_floor": round(min(t_fedlit[1:] or t_fedlit) / min(t_floor[1:] or t_floor), 2)},
        "image_encoding_once_s": round(t_img, 3),
        "acc_fedlit": {k: round(v, 2) for k, v in acc_fedlit.items()},
        "acc_naive": {k: round(v, 2) for k, v in acc_naive.items()},
        "max_acc_diff_points": round(max(abs(acc_fedlit[k] - acc_naive[k]) for k in acc_fedlit), 3),
        "state_max_abs_diff": float(max((state_fedlit[k] - orch2.global_state[k]).abs().max() for k in state_fedlit)),
    }


def lockstep(args) -> dict:
    """Rounds with the clients in lock-step vs one at a time (interleaved; steady = median over rounds 2..R)."""
    seq, clip, fed = _orchestrator(args, _method(args.method))
    lock, _, _ = _orchestrator(args, _method(args.method), lockstep=args.lockstep)
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
        "steps_per_client_round": [len(seq.cfg.batch_starts(c.num_samples, seq.cfg.drop_last_of(seq.method))) for c in fed.clients],
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["speed", "memory", "procs", "cache", "text", "lockstep"])
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
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.method = args.method or {"speed": "promptfl", "memory": "fedpgp", "lockstep": "promptfl"}.get(args.which)
    res = {"speed": speed, "memory": memory, "procs": procs, "cache": cache, "text": text,
           "lockstep": lockstep}[args.which](args)
    print(json.dumps({"machine": machine(), "command": " ".join(["python", *sys.argv]), "result": res}, indent=2))


if __name__ == "__main__":
    main()
