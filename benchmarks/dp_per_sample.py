"""DP per-sample gradients: one text forward + one batched backward (fedlit.privacy) against B one-sample
forward + backward passes (the loop it replaced), on the embedded default (fedlit-toy, shapes-dark base classes,
DP-FPL n_ctx 16 rank 8, client 0's task), batch 32 by default. Prints both timings (wall and process CPU time: the
CPU time is the robust one on shared cores), the speed-up and the largest
per-sample gradient difference.

    python benchmarks/dp_per_sample.py [--batch 32] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fedlit.backbones import load_backbone
    from fedlit.client import ClientModule
    from fedlit.data.federation import FederatedData
    from fedlit.methods.dpfpl import DPFPL
    from fedlit.privacy import per_sample_gradients
    from fedlit.steps import generator

    clip = load_backbone("fedlit-toy")
    fed = FederatedData(num_clients=6).setup(1)  # the embedded default's data
    task = fed.task_of(0)
    method = DPFPL(epsilon=0.4, clipping="per_sample")
    module = ClientModule(clip, method).train()
    with torch.no_grad():
        method.prepare_step(module.prompt, generator(0))
    g = torch.Generator().manual_seed(0)
    dim = method.text_features(module.prompt, clip, task).shape[1]
    x = torch.randn(args.batch, dim, generator=g)
    y = torch.randint(0, len(task.classnames), (args.batch,), generator=g)

    def loop():
        out = []
        for i in range(args.batch):
            module.training_step((x[i : i + 1], y[i : i + 1]), 0, task).backward()
            out.append({k: p.grad.clone() for k, p in module.prompt.named_parameters() if p.grad is not None})
            module.prompt.zero_grad(set_to_none=True)
        return {k: torch.stack([o[k] for o in out]) for k in out[0]}

    def batched():
        return per_sample_gradients(module, x, y, task)[0]

    times = {"loop": [], "batched": []}
    cpu = {"loop": [], "batched": []}
    for _ in range(args.repeats):
        for name, fn in (("loop", loop), ("batched", batched)):
            t, c = time.perf_counter(), time.process_time()
            res = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if name == "loop":
                ref = res
    diff = max(float((res[k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)
    lo, ba = min(times["loop"]), min(times["batched"])
    print(f"classes {len(task.classnames)}  batch {args.batch}  threads {args.threads}  (best of {args.repeats})")
    print(f"wall: loop (B one-sample passes) {lo * 1e3:.1f} ms, batched {ba * 1e3:.1f} ms, speed-up {lo / ba:.1f}x")
    lo, ba = min(cpu["loop"]), min(cpu["batched"])
    print(f"CPU time: loop {lo * 1e3:.1f} ms, batched {ba * 1e3:.1f} ms, speed-up {lo / ba:.1f}x")
    print(f"largest per-sample gradient difference, relative to the tensor's largest entry: {diff:.1e}")


if __name__ == "__main__":
    main()
