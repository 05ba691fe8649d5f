"""The spine: aggregation and sampling (pure functions), the round loop end to end, outputs, FedProx."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlit.aggregation import fedavg, uniform_mean, weighted_mean
from fedlit.cli import main
from fedlit.rounds import sample_clients, shard
from fedlit.evaluation import mean_with_hm
from fedlit.metrics import harmonic_mean

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


# ------------------------------------------------------------------------------- pure functions
def test_fedavg_weighted_by_samples_hand_computed():
    a = {"ctx": torch.tensor([1.0, 2.0])}
    b = {"ctx": torch.tensor([3.0, 6.0])}
    out = fedavg([a, b], [1, 3])  # (1·[1,2] + 3·[3,6]) / 4
    assert torch.allclose(out["ctx"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(uniform_mean([a, b])["ctx"], torch.tensor([2.0, 4.0]))
    assert out["ctx"].dtype == torch.float32


def test_weighted_mean_rejects_mismatches():
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([{"a": torch.ones(1)}, {"b": torch.ones(1)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_mean([{"a": torch.ones(1)}], [0])


def test_harmonic_mean_matches_fedpgp_average_row():
    # FedPGP Table 1, average row: Local 95.67, Base 85.69, Novel 81.75 -> HM 87.33
    assert harmonic_mean([95.67, 85.69, 81.75]) == pytest.approx(87.33, abs=0.01)  # the paper rounds from unrounded inputs
    assert harmonic_mean([50.0, 0.0]) == 0.0


def test_summarize_means_over_clients_then_hm():
    per = {0: {"local": 80.0, "base": 60.0, "novel": 40.0}, 1: {"local": 100.0, "base": 60.0, "novel": 60.0}}
    s = mean_with_hm(list(per.values()))
    assert s["local"] == 90.0 and s["base"] == 60.0 and s["novel"] == 50.0
    assert s["hm"] == pytest.approx(3 / (1 / 90 + 1 / 60 + 1 / 50))


def test_client_sampling_is_a_pure_function_of_seed_and_round():
    assert sample_clients(0, 0, 10, 0.3) == list(range(10))  # round 0: everyone (FedPGP/FedOTP)
    r1 = sample_clients(0, 1, 10, 0.3)
    assert len(r1) == 3 and r1 == sorted(set(r1))
    assert r1 == sample_clients(0, 1, 10, 0.3)
    assert len(sample_clients(0, 0, 10, 0.3, first_round_all=False)) == 3
    draws = {tuple(sample_clients(0, r, 10, 0.3)) for r in range(1, 20)}
    assert len(draws) > 5  # rounds differ
    assert sample_clients(0, 5, 100, 0.001) and len(sample_clients(0, 5, 100, 0.001)) == 1  # max(int(.), 1)


def test_shard_partitions_clients_over_ranks():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert all(len(p) in (2, 3) for p in parts)


# ------------------------------------------------------------------------------- end to end
def _run(tmp_path, name, *args) -> dict:
    out = tmp_path / name
    rc = main(["fit", "--config", QUICK, "--out_dir", str(out), *args])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tensorboard").rglob("events.out.tfevents*"))
    assert files, "no TensorBoard event file written"
    out: dict = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_quickstart_promptfl_beats_zeroshot_by_5_points_and_writes_outputs(tmp_path):
    zs = _run(tmp_path, "zs", "--method", "zeroshot")
    pf = _run(tmp_path, "pf", "--method", "promptfl")
    for k in ("local", "base", "novel", "hm"):
        assert 0 <= pf["final"][k] <= 100 and 0 <= zs["final"][k] <= 100
    assert pf["method"] == "promptfl" and zs["method"] == "zeroshot"
    assert pf["final"]["local"] >= zs["final"]["local"] + 5.0, (pf["final"], zs["final"])
    assert len(pf["history"]) == 10 and len(pf["per_client"]) == 6
    # frozen image work is done once: each train/test image encoded at most once over 10 rounds
    assert pf["images_encoded"] <= 6 * 4 * 16 + 48 * 32

    run = tmp_path / "pf"
    assert (run / "config.yaml").exists()
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"]["class_path"].endswith("PromptFL") and cfg["data"]["dataset"] == "shapes-dark"
    tags = _scalars(run)
    for k in ("local", "base", "novel", "hm"):
        steps = [s for s, _ in tags[f"eval/{k}"]]
        assert steps == list(range(1, 11)), (k, steps)
        assert f"eval_client/{k}/client_000" in tags
    assert "train/loss" in tags and "transfer/bytes_up" in tags
    final_tb = dict(tags["eval/local"])[10]
    assert final_tb == pytest.approx(pf["statistics"]["last_round"]["local"], abs=1e-3)


def test_same_seed_same_numbers_and_coop_keeps_personal_state(tmp_path):
    a = _run(tmp_path, "a", "--method", "coop", "--trainer.rounds", "2")
    b = _run(tmp_path, "b", "--method", "coop", "--trainer.rounds", "2")
    assert a["final"] == b["final"] and a["per_client"] == b["per_client"]
    c = _run(tmp_path, "c", "--method", "coop", "--trainer.rounds", "2", "--seed", "1")
    assert c["final"] != a["final"]
    # CoOp is local only: clients' models differ, so their base accuracies differ
    bases = {round(v["base"], 4) for v in a["per_client"].values()}
    assert len(bases) > 1


def test_promptfl_clients_share_one_model(tmp_path):
    r = _run(tmp_path, "p", "--trainer.rounds", "1")
    bases = {round(v["base"], 6) for v in r["per_client"].values()}
    assert len(bases) == 1  # no personal state: every client evaluates the same global context


def test_fedprox_term_has_a_gradient_and_official_flag_has_none():
    from fedlit.backbones import load_backbone
    from fedlit.client import ClientModule
    from fedlit.methods.fedprox import FedProx

    clip = load_backbone("fedlit-toy")
    for detached, expect_grad in ((False, True), (True, False)):
        m = ClientModule(clip, FedProx(mu=2.0, n_ctx=4, prox_detached=detached))
        g = {k: torch.zeros_like(v) for k, v in m.prompt.state_dict().items()}
        with torch.no_grad():
            m.prompt.ctx.fill_(0.5)
        term = m.proximal_term(2.0, g, detached=detached)
        # μ/2 · Σ (0.5 − 0)² over n_ctx × width entries
        assert term.item() == pytest.approx(0.5 * 2.0 * 0.25 * m.prompt.ctx.numel(), rel=1e-5)
        m.prompt.ctx.grad = None
        if expect_grad:
            term.backward()
            assert torch.allclose(m.prompt.ctx.grad, torch.full_like(m.prompt.ctx, 2.0 * 0.5))
        else:
            assert not term.requires_grad


def test_finished_run_is_never_overwritten(tmp_path, capsys):
    r = _run(tmp_path, "done", "--method", "zeroshot")
    before = (tmp_path / "done" / "results.json").read_bytes()
    rc = main(["fit", "--config", QUICK, "--method", "promptfl", "--out_dir", str(tmp_path / "done")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err
    assert (tmp_path / "done" / "results.json").read_bytes() == before
    assert r["method"] == "zeroshot"


def test_dirichlet_partition_runs(tmp_path):
    r = _run(tmp_path, "dir", "--trainer.rounds", "1", "--data.partition", "dirichlet", "--data.beta", "0.5",
             "--data.shots", "-1", "--data.min_samples", "5")
    assert len(r["per_client"]) == 6 and np.isfinite(r["final"]["hm"])


def test_round_loss_is_the_mean_over_clients_that_took_a_step():
    """Central's data-less clients return an update with no step and a NaN loss: the round's loss ignores them."""
    from fedlit.methods.base import Update
    from fedlit.methods.promptfl import PromptFL
    from fedlit.rounds import RoundProtocol
    from fedlit.trainer import FedTrainer

    protocol = RoundProtocol(PromptFL(), FedTrainer(), 0, [4, 0, 4], {"ctx": torch.zeros(2, 3)})
    updates = [Update(0, {}, {}, 4, 1.0, 2), Update(1, {}, {}, 0, float("nan"), 0), Update(2, {}, {}, 4, 3.0, 2)]
    scalars = protocol.round_scalars([0, 1, 2], updates)
    assert scalars["train/loss"] == 2.0 and scalars["train/failed_clients"] == 0
    assert scalars["transfer/bytes_up"] == 3 * 2 * 3 * 4  # every successful client uploads, stepped or not
