"""FedOTP's round before and after issue 25, in one process, on the Table-1 grid's embedded cell.

    python benchmarks/fedotp_round.py [--dataset shapes-noisy] [--rounds 2] [--threads 1]

*before*: the OT iterations in fp32 in the log domain (two log-sum-exps over ``[B·C, M, N]`` an iteration) and the
tower run on every augmented training batch; *after*: the fp64 scaling form (products and sums only, the log
domain kept for out-of-range costs) and the patch tokens of the view bank encoded once. The two runs are built
from the same config and seed, run round by round interleaved (before, after, before, …), and their metrics are
compared (equal up to float rounding: same plans within 1e-6, tokens within batching rounding).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(dataset: str, rounds: int, before: bool):
    from fedlit.experiment import build as build_run, fit_parser, parse_fit

    argv = ["--config", "configs/fedotp.yaml", "--config", "configs/embedded.yaml", "--data.dataset", dataset,
            "--trainer.rounds", str(rounds), "--seed", "1"]
    parser = fit_parser()
    cfg, init = parse_fit(parser, lambda: parser.parse_args(argv))
    orch, _ = build_run(parser, cfg, init)
    if before:
        orch.bank.cache_views = False
    return orch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="shapes-noisy")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from fedlit.methods import fedotp

    new_solvers = dict(fedotp._SOLVERS)
    old_solvers = {**new_solvers, ("cot", "fp32_log"): fedotp.cot_log_domain,
                   ("sinkhorn", "fp32_log"): fedotp.sinkhorn_log_domain}
    runs = {"before": build(a.dataset, a.rounds, True), "after": build(a.dataset, a.rounds, False)}
    times = {k: [] for k in runs}
    metrics = {}
    for rnd in range(a.rounds):
        for name, orch in runs.items():
            fedotp._SOLVERS.update(old_solvers if name == "before" else new_solvers)
            t0 = time.perf_counter()
            orch.train_round(rnd)
            metrics[name] = orch.evaluate(rnd)["mean"]
            times[name].append(time.perf_counter() - t0)
    fedotp._SOLVERS.update(new_solvers)
    out = {"dataset": a.dataset, "threads": a.threads, "round_s": {k: [round(t, 1) for t in v] for k, v in times.items()},
           "speedup_per_round": [round(b / f, 1) for b, f in zip(times["before"], times["after"])],
           "final": metrics, "images_encoded": {k: r.bank.encoded for k, r in runs.items()}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
