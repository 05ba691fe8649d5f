"""The reported statistic (issue 21 item 2): every statistic the papers use is kept in results.json, ``selection``
names the one ``final`` holds (per-method default: the paper's), and ``eval_last`` makes them computable."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedlit.errors import FedlitError
from fedlit.metrics import harmonic_mean, history_statistics, statistic_of
from fedlit.orchestrator import Orchestrator, format_final
from fedlit.rounds import RoundProtocol
from fedlit.trainer import FedTrainer

# 6 evaluated rounds; Local peaks at round 4 (tied by round 2, earlier: the later round wins, FedPGP's `>=`)
HISTORY = [{"round": r, "local": lo, "base": b, "novel": n} for r, lo, b, n in
           [(1, 10.0, 20.0, 5.0), (2, 40.0, 30.0, 6.0), (3, 30.0, 35.0, 7.0), (4, 40.0, 25.0, 8.0),
            (5, 20.0, 40.0, 9.0), (6, 30.0, 30.0, 10.0)]]


def test_history_statistics_by_hand():
    s = history_statistics(HISTORY)
    assert s["last_round"] == {"round": 6, "local": 30.0, "base": 30.0, "novel": 10.0}
    assert s["best_local"] == {"round": 4, "local": 40.0, "base": 25.0, "novel": 8.0}  # the later of the two 40s
    assert s["max"]["local"] == 40.0 and s["max"]["base"] == 40.0 and s["max"]["novel"] == 10.0
    assert s["max"]["hm"] == pytest.approx(harmonic_mean([40.0, 40.0, 10.0]))
    assert s["last5_rounds"] == [2, 3, 4, 5, 6]
    assert s["last5_mean"]["local"] == pytest.approx(32.0)  # (40 + 30 + 40 + 20 + 30) / 5
    # np.std (population, ddof 0) as federated_main.py:430: deviations 8, -2, 8, -12, -2 → sqrt(280 / 5)
    assert s["last5_std"]["local"] == pytest.approx(56 ** 0.5)
    assert s["last5_mean"]["hm"] == pytest.approx(harmonic_mean([32.0, 32.0, 8.0]))  # HM of the means
    assert history_statistics([]) == {}


def test_each_method_defaults_to_its_papers_statistic():
    assert statistic_of("fedpgp") == "best_local" and statistic_of("promptfl") == "best_local"  # FedPGP Table 1
    assert statistic_of("fedtpg") == "last_round" and statistic_of("pfedpg") == "last_round"
    assert statistic_of("fedpgp", "last5_mean") == "last5_mean"  # an explicit setting wins
    with pytest.raises(FedlitError, match="trainer.statistic"):
        FedTrainer(statistic="best")


def _finish(method: str, statistic: str = "method") -> dict:
    """Orchestrator.finish on a hand-made history (rank 1: nothing written)."""
    per = {r: {"round": r, "mean": h, "per_client": {0: {"local": h["local"]}}} for r, h in
           ((h["round"], h) for h in HISTORY)}
    from fedlit.methods import method_class
    from fedlit.run_plan import RunPlan

    cfg = FedTrainer(rounds=6, statistic=statistic)
    fake = SimpleNamespace(history=HISTORY, best_eval=per[4], meta={}, seed=1, run_dir="x",
                           method=SimpleNamespace(name=method, run_report=lambda: {}, sync="round"),
                           cfg=cfg, plan=RunPlan.resolve(cfg, method_class(method)()),
                           fabric=SimpleNamespace(global_rank=1),
                           bank=SimpleNamespace(encoded=0), client_groups=lambda: {}, ood=None)
    return Orchestrator.finish(fake, per[6], 1.0)


def test_results_final_is_the_selected_statistic_with_every_statistic_kept():
    r = _finish("fedpgp")
    assert r["selection"] == "best_local" and r["final_round"] == 4
    assert r["final"] == {"local": 40.0, "base": 25.0, "novel": 8.0}
    assert r["per_client_round"] == 4 and r["per_client"] == {"0": {"local": 40.0}}  # the best round's clients
    assert set(r["statistics"]) >= {"last_round", "best_local", "max", "last5_mean", "last5_std"}
    line = format_final(r)
    assert line.startswith("fedpgp: Local 40.00  Base 25.00  Novel 8.00")
    assert "best-Local round 4; last round 6: Local 30.00" in line  # the last round beside the paper's statistic
    last = _finish("fedpgp", "last_round")
    assert last["final"] == {"local": 30.0, "base": 30.0, "novel": 10.0} and last["per_client_round"] == 6
    assert "last round" not in format_final(last)
    assert _finish("fedtpg")["selection"] == "last_round"
    assert _finish("fedpgp", "last5_mean")["final"]["local"] == pytest.approx(32.0)


def test_eval_last_evaluates_every_one_of_the_final_rounds():
    def due(**kw) -> list[int]:
        p = SimpleNamespace(cfg=FedTrainer(rounds=30, eval_every=10, **kw), method=SimpleNamespace(trainable=True))
        return [r + 1 for r in range(30) if RoundProtocol.eval_due(p, r)]

    assert due() == [10, 20, 30]  # the CIFAR overlays before: one evaluation in the last 10 rounds
    assert due(eval_last=5) == [10, 20, 26, 27, 28, 29, 30]


@pytest.mark.parametrize("name", ["cifar10_dirichlet", "cifar100_dirichlet"])
def test_cifar_overlays_evaluate_each_of_the_last_10_rounds(name):
    """The official CIFAR runs (>= 50 clients) evaluate every one of their last 10 rounds and only those."""
    from pathlib import Path

    import yaml

    t = yaml.safe_load((Path(__file__).parents[1] / "configs/protocols" / f"{name}.yaml").read_text())["trainer"]
    p = SimpleNamespace(cfg=FedTrainer(**{k: t[k] for k in ("rounds", "eval_every", "eval_last")}),
                        method=SimpleNamespace(trainable=True))
    assert [r + 1 for r in range(t["rounds"]) if RoundProtocol.eval_due(p, r)] == list(range(141, 151))
