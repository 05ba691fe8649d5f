"""DP-FPL and the step-synchronous (FedSGD) round mode: equations on hand-built tensors, calibration against the
spec's worked values and Opacus' accountant, shared vs personal, and step mode == local SGD for one client.

Toy backbone (fedlit-toy, bundled weights) and tiny tasks; CPU, seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedlit import checkpoint as ckpt
from fedlit.cli import main
from fedlit.client import ClientModule
from fedlit.errors import FedlitError
from fedlit.methods import method_class
from fedlit.methods.base import StepPlan
from fedlit.methods.dpfpl import (DPFPL, clip_norm, factorise, legacy_sigma, local_gradient, orthonormal_columns,
                                  rdp_epsilon, rdp_orders)
from fedlit.methods.promptfl import PromptFL
from fedlit.prompts import Task
from fedlit.steps import StepSync, generator, make_stepper, sgd_step, subset
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parents[1]
TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _plan(rounds=100, steps=1, batch=32, clients=10, n=320):
    return StepPlan(rounds=rounds, steps_per_round=steps, batch_size=batch, clients=clients, samples_per_client=n)


def test_registered_and_step_synchronous():
    assert method_class("dpfpl") is DPFPL
    assert DPFPL.sync == "step" and PromptFL.sync == "round"
    assert FedTrainer().sync_of(DPFPL()) == "step" and FedTrainer(sync="step").sync_of(PromptFL()) == "step"
    assert FedTrainer().sync_of(PromptFL()) == "round"


# ============================================================================================ factorisation
def test_orthonormal_columns_is_gram_schmidt_on_a_hand_built_matrix():
    a = torch.tensor([[3.0, 1.0], [4.0, 2.0], [0.0, 5.0]])
    q = orthonormal_columns(a)
    r2 = torch.tensor([1.0, 2.0, 5.0]) - 2.2 * torch.tensor([0.6, 0.8, 0.0])  # a₂ − (a₂·q₁) q₁
    assert torch.allclose(q[:, 0], torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)
    assert torch.allclose(q[:, 1], r2 / r2.norm(), atol=1e-6)


def test_factorise_u_v_orthonormal_and_residual_restores_L():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(16, 32, generator=g) * 0.02
    u, v, R = factorise(L, torch.randn(32, 4, generator=g))
    assert u.shape == (16, 4) and v.shape == (4, 32)
    assert torch.allclose(u.t() @ u, torch.eye(4), atol=1e-5)
    assert torch.allclose(v @ v.t(), torch.eye(4), atol=1e-5)
    assert torch.allclose(R, L - u @ v) and torch.allclose(u @ v + R, L, atol=1e-6)


def test_context_by_factorization_and_dpfpl_context_is_G_plus_L(toy):
    for mode in ("promptfl", "fedotp", "fedpgp", "dplora", "dpfpl"):
        m = DPFPL(n_ctx=4, rank=2, factorization=mode)
        p = m.build(toy).train()
        L0, u0, v0 = p.L.detach().clone(), p.u.detach().clone(), p.v.detach().clone()
        m.prepare_step(p, generator(1, 2))
        ctx = m.context(p).detach()
        G = p.G.detach()
        if mode in ("dplora", "dpfpl"):  # u, v overwritten by the factorisation of L (L itself unchanged)
            assert torch.equal(p.L, L0) and not torch.allclose(p.u, u0)
            assert torch.allclose(p.u.t() @ p.u, torch.eye(2), atol=1e-5)
        else:
            assert torch.equal(p.u, u0) and torch.equal(p.v, v0) and p.residual is None
        expected = {"promptfl": G, "fedotp": G + L0, "fedpgp": G + u0 @ v0, "dplora": G + p.u @ p.v,
                    "dpfpl": G + L0}[mode]
        assert torch.allclose(ctx, expected.detach(), atol=1e-6), mode
    m = DPFPL(n_ctx=4, rank=2)
    p = m.build(toy).eval()  # evaluation: G + L directly
    assert torch.equal(m.context(p), p.G + p.L)


def test_local_gradient_formula_on_hand_built_tensors():
    u, v = torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 3.0]])
    g_u, g_v = torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0, 5.0]])
    # g_u v = [[2,3],[4,6]], u g_v = [[4,5],[0,0]], u uᵀ g_u v = [[2,3],[0,0]]; sum / 10
    assert torch.allclose(local_gradient(u, v, g_u, g_v), torch.tensor([[0.8, 1.1], [0.4, 0.6]]))
    assert torch.allclose(local_gradient(u, v, g_u, g_v, divisor=1.0), torch.tensor([[8.0, 11.0], [4.0, 6.0]]))


def test_dpfpl_gradient_step_without_noise(toy):
    """L gets no autograd gradient (context G + u v + R); client_gradient rebuilds it from g_u, g_v."""
    m = DPFPL(n_ctx=4, rank=2)
    module = ClientModule(toy, m).train()
    m.prepare_step(module.prompt, generator(0))
    x, y = torch.randn(6, toy.embed_dim), torch.arange(6) % len(TASK)
    module.training_step((x, y), 0, TASK).backward()
    grads = {k: p.grad.clone() for k, p in module.prompt.named_parameters() if p.grad is not None}
    assert set(grads) == {"G", "u", "v"}
    out = m.client_gradient(module.prompt, grads, generator(0))
    p = module.prompt
    assert torch.allclose(out["L"], local_gradient(p.u.detach(), p.v.detach(), grads["u"], grads["v"]))
    assert all(torch.equal(out[k], grads[k]) for k in ("G", "u", "v"))  # ε = 0: no clipping, no noise


# ============================================================================================ DP
def test_clip_norm():
    g = torch.tensor([3.0, 4.0])
    assert torch.allclose(clip_norm(g, 1.0), torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(clip_norm(g, 10.0), g)


@pytest.mark.parametrize("eps, sigma, local, server", [(0.4, 84.8, 26.5, 2.65), (0.2, 169.7, 53.0, 5.30),
                                                       (0.1, 339.3, 106.0, 10.6)])
def test_legacy_calibration_matches_the_spec_worked_values(eps, sigma, local, server):
    m = DPFPL(epsilon=eps)
    m.plan_steps(_plan())
    rep = m.run_report()["privacy"]
    assert rep["calibration"] == "dpfpl_legacy" and rep["dp"]
    assert rep["noise_multiplier"] == pytest.approx(sigma, abs=0.06)
    assert rep["local_noise_std"] == pytest.approx(local, abs=0.06)
    assert rep["server_noise_std"] == pytest.approx(server, abs=0.006)
    assert rep["epsilon_closed_form"] == pytest.approx(eps)
    assert legacy_sigma(eps, 1e-5, 100) == pytest.approx(sigma, abs=0.06)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_reported_epsilon_is_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    m = DPFPL(epsilon=0.4)
    plan = _plan(rounds=10, steps=5, batch=8, n=40)
    m.plan_steps(plan)
    rep = m.run_report()["privacy"]
    acc = RDPAccountant()
    acc.history = [(m.noise_multiplier, 8 / 40, 50)]
    assert rep["steps"] == 50 and rep["sample_rate"] == pytest.approx(0.2)
    assert rep["epsilon_rdp"] == pytest.approx(acc.get_epsilon(1e-5, alphas=rdp_orders()), rel=1e-9)
    assert rep["epsilon_rdp"] <= acc.get_epsilon(1e-5) + 1e-12  # Opacus' default orders: a looser bound
    assert rep["epsilon_rdp"] == pytest.approx(rdp_epsilon(m.noise_multiplier, 0.2, 50, 1e-5))


def test_rdp_calibration_spends_the_target_epsilon():
    m = DPFPL(epsilon=2.0, calibration="rdp")
    m.plan_steps(_plan(rounds=10, steps=5, batch=8, n=40))
    rep = m.run_report()["privacy"]
    assert rep["calibration"] == "rdp"
    assert rep["epsilon_rdp"] == pytest.approx(2.0, abs=0.05) and rep["epsilon_rdp"] <= 2.0 + 1e-6
    assert rep["local_noise_std"] == pytest.approx(rep["noise_multiplier"] * 10 / 8)


def test_no_dp_report():
    m = DPFPL()
    m.plan_steps(_plan())
    rep = m.run_report()["privacy"]
    assert not rep["dp"] and "epsilon_rdp" not in rep and m.local_std == 0


@pytest.mark.parametrize("mode, noisy", [("dpfpl", {"u", "v"}), ("fedotp", {"L"}), ("promptfl", {"G"})])
def test_clipping_and_local_noise_std_by_factorization(toy, mode, noisy):
    m = DPFPL(n_ctx=16, rank=8, epsilon=0.4, factorization=mode)
    m.plan_steps(_plan(rounds=100, batch=32))  # σ_loc = 26.5
    p = m.build(toy).train()
    m.prepare_step(p, generator(0))
    zero = {k: torch.zeros_like(v) for k, v in p.state_dict().items()}
    zero["G"] = torch.full_like(p.G, 1.0)  # ‖g_G‖ = sqrt(16·W) > C
    out = m.client_gradient(p, zero, generator(3))
    for k in ("G", "L", "u", "v"):
        if k in noisy:
            assert out[k].std().item() == pytest.approx(26.5, rel=0.1 if out[k].numel() < 500 else 0.05), k
        elif k == "G":
            assert out["G"].norm().item() == pytest.approx(10.0, rel=1e-4)  # clipped to C, no noise
        elif k != "L" or mode != "dpfpl":
            assert torch.equal(out[k], zero[k]), k
    # server: uniform mean of K = 4 clients + N(0, (σ_loc / 4)²)
    grads = [{"G": torch.full((64, 64), float(i))} for i in range(4)]
    g = m.server_gradient(grads, [1, 1, 1, 1], generator(5))["G"]
    assert g.mean().item() == pytest.approx(1.5, abs=0.4)  # 4 standard errors
    assert g.std().item() == pytest.approx(26.5 / 4, rel=0.05)


# ============================================================================================ shared / personal
def test_only_the_global_prompt_is_shared(toy):
    m = DPFPL(n_ctx=4, rank=2)
    module = ClientModule(toy, m)
    shared, personal = module.export()
    assert set(shared) == {"G"} and set(personal) == {"L", "u", "v"}


def test_errors():
    for kw, msg in (({"rank": 17}, "rank=17"), ({"factorization": "svd"}, "factorization"),
                    ({"epsilon": -1}, "epsilon"), ({"delta": 0}, "delta"), ({"clip": 0}, "clip"),
                    ({"calibration": "moments"}, "calibration")):
        with pytest.raises(FedlitError, match=msg):
            DPFPL(**kw)
    with pytest.raises(FedlitError, match="trainer.sync"):
        FedTrainer(sync="async")
    from fedlit.run_plan import RunPlan

    with pytest.raises(FedlitError, match="one process"):
        RunPlan.resolve(FedTrainer(sync="step"), PromptFL(), world_size=2)
    with pytest.raises(FedlitError, match="needs trainer.sync=step"):
        RunPlan.resolve(FedTrainer(sync="round"), DPFPL())
    rt = SimpleNamespace(plan=RunPlan.resolve(FedTrainer(), PromptFL()))
    assert make_stepper(rt, None, None) is None


def test_server_optimiser_state_round_trips_through_the_checkpoint_entries():
    stepper = StepSync.__new__(StepSync)
    stepper.server_optim = {"0/momentum_buffer": torch.ones(3)}
    server = {**stepper.state(), "generator.w": torch.zeros(2)}
    other = StepSync.__new__(StepSync)
    assert set(other.load_state(server)) == {"generator.w"}
    assert set(other.server_optim) == {"0/momentum_buffer"} and torch.equal(other.server_optim["0/momentum_buffer"],
                                                                          torch.ones(3))


def test_step_helpers():
    assert subset(1, 0, 5, 5).tolist() == [0, 1, 2, 3, 4]
    s = subset(1, 0, 10, 4)
    assert len(s) == 4 and s.tolist() == sorted(set(s.tolist())) and torch.equal(
        torch.as_tensor(s), torch.as_tensor(subset(1, 0, 10, 4)))
    assert torch.equal(torch.randn(3, generator=generator(1, 2)), torch.randn(3, generator=generator(1, 2)))
    assert not torch.equal(torch.randn(3, generator=generator(1, 2)), torch.randn(3, generator=generator(2, 1)))
    m = PromptFL(lr=0.1, momentum=0.9, weight_decay=0.0)
    t, st = sgd_step(m, {"a": torch.ones(2), "b": torch.zeros(1)}, {"a": torch.ones(2)}, {})
    assert torch.allclose(t["a"], torch.full((2,), 0.9)) and torch.equal(t["b"], torch.zeros(1))
    t, st = sgd_step(m, t, {"a": torch.ones(2)}, st)  # momentum: buf = 0.9·1 + 1 = 1.9
    assert torch.allclose(t["a"], torch.full((2,), 0.9 - 0.19))


# ============================================================================================ end to end
def _fit(tmp_path, name, config, *args):
    out = tmp_path / name
    rc = main(["fit", "--config", str(ROOT / "configs" / config), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--data.shots", "2", "--data.dataset_args", '{"test_per_class": 4, "train_per_class": 8}',
               "--trainer.batch_size", "4", "--trainer.eval_every", "100", "--out_dir", str(out), *args])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), ckpt.load(out / ckpt.NAME)


def test_promptfl_step_mode_one_client_is_local_sgd(tmp_path):
    """FedSGD with one client and no noise = that client's local SGD for the same steps."""
    common = ["--data.num_clients", "1", "--trainer.rounds", "1", "--trainer.local_epochs", "2"]
    res_r, st_r = _fit(tmp_path, "round", "promptfl.yaml", *common, "--trainer.sync", "round")
    res_s, st_s = _fit(tmp_path, "step", "promptfl.yaml", *common, "--trainer.sync", "step")
    assert res_r["sync"] == "round" and res_s["sync"] == "step"
    assert torch.allclose(st_r.global_state["ctx"], st_s.global_state["ctx"], atol=1e-6, rtol=0)
    assert res_r["final"] == pytest.approx(res_s["final"])


#: the fixes of DP-FPL's three official loop quirks (the defaults: round / chain / last_client)
FIXED_LOOP = ("--trainer.step_start", "previous", "--trainer.optimizer_state", "per_client",
              "--trainer.personal_grad", "own")


def test_dpfpl_promptfl_factorization_without_noise_is_promptfl_fedsgd(tmp_path):
    """DP-FPL's own hooks reduce to the generic FedSGD step: factorization promptfl, ε = 0, the loop fixes."""
    common = ["--data.num_clients", "2", "--trainer.rounds", "2", "--trainer.batch_size", "8",
              "--method.init_args.lr", "0.002", "--method.init_args.weighted", "false"]
    _, a = _fit(tmp_path, "pfl", "promptfl.yaml", *common, "--trainer.sync", "step")
    _, b = _fit(tmp_path, "dp", "dpfpl.yaml", *common, "--method.init_args.factorization", "promptfl",
                "--method.init_args.epsilon", "0", *FIXED_LOOP)
    assert torch.allclose(a.global_state["ctx"], b.global_state["G"], atol=1e-6, rtol=0)  # same init G = ctx


def test_dpfpl_run_shares_only_G_reports_privacy(tmp_path):
    common = ["--data.num_clients", "2", "--trainer.rounds", "1", "--method.init_args.n_ctx", "4",
              "--method.init_args.rank", "2", "--trainer.batch_size", "8"]
    res, st = _fit(tmp_path, "dp", "dpfpl.yaml", *common)
    assert set(st.global_state) == {"G"}
    own = [{k for k in p if not k.startswith("optim/")} for p in st.personal.values()]
    assert own == [{"G", "L", "u", "v"}] * 2  # optimizer_state chain: each client's own copy of G too
    priv = res["privacy"]
    assert res["sync"] == "step" and priv["calibration"] == "dpfpl_legacy" and priv["epsilon_target"] == 0.4
    assert priv["steps"] == priv["steps_per_round"] == 3 and math.isfinite(priv["epsilon_rdp"])
    for c, r in res["per_client"].items():  # "neighbor": the other client's half of the base set (equal halves here)
        assert r["base"] == pytest.approx((r["local"] + r["neighbor"]) / 2, abs=1e-4), c
    assert "neighbor" in res["final"]
    rc = main(["fit", "--config", str(ROOT / "configs" / "dpfpl.yaml"), "--config",
               str(ROOT / "configs" / "embedded.yaml"), "--trainer.sync", "round", "--out_dir", str(tmp_path / "r")])
    assert rc == 2 and not (tmp_path / "r" / "results.json").exists()


def test_dpfpl_official_loop_is_the_default_and_each_quirk_is_a_named_policy(tmp_path, monkeypatch):
    """Issue 21 item 10. Official (default): every step of a round starts from the round's weights, one optimiser
    state chained over every client (each client's own G copy), personal tensors stepped with the LAST client's
    gradient. ``step_loop`` in results.json records it. The fixes, one at a time, change what they name."""
    common = ["--data.num_clients", "2", "--trainer.rounds", "1", "--method.init_args.n_ctx", "4",
              "--method.init_args.rank", "2", "--trainer.batch_size", "4", "--method.init_args.epsilon", "0",
              "--method.init_args.factorization", "fedotp"]  # L stepped by SGD directly (no re-factorisation)
    seen = []
    real = StepSync.client_step

    def spy(self, cid, rnd, epoch, step, shared, own, rows):
        seen.append((cid, step, shared["G"].clone(), own["L"].clone()))
        return real(self, cid, rnd, epoch, step, shared, own, rows)

    monkeypatch.setattr(StepSync, "client_step", spy)
    res, a = _fit(tmp_path, "official", "dpfpl.yaml", *common)
    assert res["step_loop"] == {"step_start": "round", "optimizer_state": "chain", "personal_grad": "last_client"}
    g0 = [g for c, s, g, _ in seen if c == 0]
    assert len(g0) >= 2 and all(torch.equal(g, g0[0]) for g in g0)  # every step from the round's weights
    ga, gb = a.personal[0]["G"], a.personal[1]["G"]  # chain: one momentum, stepped client 0 then client 1
    assert not torch.allclose(ga, gb) and torch.equal(a.global_state["G"], gb)
    seen.clear()
    res, b = _fit(tmp_path, "previous", "dpfpl.yaml", *common, "--trainer.step_start", "previous")
    g0 = [g for c, s, g, _ in seen if c == 0]
    assert res["step_loop"]["step_start"] == "previous" and not torch.equal(g0[0], g0[-1])
    # last_client without the chain: both clients' L start equal and get the same gradient → stay equal
    _, c = _fit(tmp_path, "last", "dpfpl.yaml", *common, "--trainer.optimizer_state", "per_client")
    assert "G" not in c.personal[0] and torch.allclose(c.personal[0]["L"], c.personal[1]["L"], atol=1e-7)
    _, d = _fit(tmp_path, "own", "dpfpl.yaml", *common, *FIXED_LOOP)
    assert not torch.allclose(d.personal[0]["L"], d.personal[1]["L"], atol=1e-5)


def test_dpfpl_sensitivity_batch_and_dplora_evaluation_refactorisation(toy):
    """σ_loc from the configured batch (official) or the one used; dplora's evaluation draws a fresh Ω each forward
    (official) or keeps the last training factorisation."""
    plan = StepPlan(rounds=100, steps_per_round=1, batch_size=5, clients=2, samples_per_client=5, configured_batch=32)
    off, fix = DPFPL(epsilon=0.4), DPFPL(epsilon=0.4, sensitivity_batch="used")
    off.plan_steps(plan)
    fix.plan_steps(plan)
    assert off.local_std == pytest.approx(off.noise_multiplier * 10 / 32)
    assert fix.local_std == pytest.approx(fix.noise_multiplier * 10 / 5)
    assert off.run_report()["privacy"]["sensitivity_b"] == 32
    m = DPFPL(n_ctx=4, rank=2, factorization="dplora")
    p = m.build(toy).train()
    m.prepare_step(p, generator(0))
    p.eval()
    assert m.prepare(p, toy, TASK) is None  # recomputed per evaluation batch
    c1, c2 = m.context(p), m.context(p)
    assert not torch.allclose(c1, c2)  # a fresh Ω each forward: another rank-2 approximation of L
    k = DPFPL(n_ctx=4, rank=2, factorization="dplora", eval_refactorise=False)
    assert torch.equal(k.context(p), p.G + p.u @ p.v) and k.prepare(p, toy, TASK) is not None


@pytest.mark.slow
def test_step_mode_sigkill_then_resume_gives_identical_state(tmp_path):
    """The server's momentum and each client's optimiser state are checkpointed: a killed step-mode run resumed
    from its round-1 checkpoint ends where the uninterrupted run does (noise included: its streams are keyed)."""
    import os
    import subprocess
    import sys

    args = ["--config", str(ROOT / "configs" / "dpfpl.yaml"), "--config", str(ROOT / "configs" / "embedded.yaml"),
            "--data.num_clients", "2", "--data.shots", "2", "--trainer.batch_size", "8", "--trainer.rounds", "3",
            "--data.dataset_args", '{"test_per_class": 4, "train_per_class": 8}', "--trainer.progress", "false"]

    def fit(out, fault=None):
        env = {k: v for k, v in os.environ.items() if k != "FEDLIT_FAULT"}
        if fault:
            env["FEDLIT_FAULT"] = fault
        return subprocess.run([sys.executable, "-m", "fedlit.cli", "fit", *args, "--out_dir", str(out)],
                              capture_output=True, text=True, timeout=900, env=env)

    assert fit(tmp_path / "ref").returncode == 0
    assert fit(tmp_path / "run", "checkpoint-write:2").returncode != 0
    assert ckpt.load(tmp_path / "run" / ckpt.NAME).round == 1
    assert fit(tmp_path / "run").returncode == 0
    a, b = ckpt.load(tmp_path / "ref" / ckpt.NAME), ckpt.load(tmp_path / "run" / ckpt.NAME)
    assert any(k.startswith("sync/") for k in a.server)
    for x, y in ((a.global_state, b.global_state), (a.server, b.server), *zip(a.personal.values(), b.personal.values())):
        assert set(x) == set(y) and all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ref", "run"))
    assert ra["final"] == pytest.approx(rb["final"]) and ra["privacy"] == rb["privacy"]


# ============================================================================================ per-sample clipping
def test_per_sample_clipping_on_hand_built_gradients(toy):
    """``clipping: per_sample``: every sample's JOINT (G, u, v) gradient clipped to C, then the mean, then the local
    noise on u, v (issue 21 item 11: each tensor clipped to C separately let one sample reach √3·C)."""
    m = DPFPL(n_ctx=4, rank=2, epsilon=0.4, clipping="per_sample")
    m.plan_steps(_plan(rounds=100, batch=3))
    assert m.per_sample_gradients and m.local_std == pytest.approx(legacy_sigma(0.4, 1e-5, 100) * 10 / 3)
    p = m.build(toy).train()
    m.prepare_step(p, generator(0))
    w = toy.text_width
    g_G = torch.stack([torch.full((4, w), 0.01), torch.full((4, w), 5.0), torch.zeros(4, w)])
    g_u = torch.stack([torch.zeros(4, 2), torch.zeros(4, 2), torch.full((4, 2), 100.0)])
    per = {"G": g_G, "u": g_u, "v": torch.zeros(3, 2, w)}
    out = m.client_gradient(p, per, generator(7))
    # sample 0: joint norm < C, kept; sample 1: ‖g_G‖ = 5·√(4w) > C, scaled; sample 2: only u, norm 100·√8 > C
    n1, n2 = float(g_G[1].norm()), float(g_u[2].norm())
    want_G = (g_G[0] + g_G[1] * 10.0 / (n1 + 1e-6)) / 3
    assert torch.allclose(out["G"], want_G, atol=1e-6)  # G: clipped, no local noise (the server adds it)
    noise = torch.randn(4, 2, generator=generator(7)) * m.local_std  # the noise stream of client_gradient
    assert torch.allclose(out["u"], g_u[2] * 10.0 / (n2 + 1e-6) / 3 + noise, atol=1e-4)
    assert m.run_report()["privacy"]["clipping"] == "per_sample"


def test_per_sample_sensitivity_is_C_over_B_on_adversarial_gradients(toy):
    """Replacing one sample of the batch by an adversarial one (G, u, v gradients each far above C, pointing
    against the others) moves everything released with noise (the client's g_G and its noisy g_u, g_v) by at most
    2C/B in joint ℓ₂ norm, so Opacus' ε for the noise multiplier holds. Same noise stream for both batches."""
    m = DPFPL(n_ctx=4, rank=2, epsilon=0.4, clipping="per_sample", clip=1.0)
    m.plan_steps(_plan(rounds=100, batch=4))
    p = m.build(toy).train()
    m.prepare_step(p, generator(0))
    w, g = toy.text_width, torch.Generator().manual_seed(3)
    base = {"G": torch.randn(4, 4, w, generator=g), "u": torch.randn(4, 4, 2, generator=g),
            "v": torch.randn(4, 2, w, generator=g)}
    adv = {k: v.clone() for k, v in base.items()}
    for k in adv:  # sample 0 replaced: huge, opposite to sample 0's own direction in every tensor
        adv[k][0] = -1e3 * base[k][0] / base[k][0].norm()
    a, b = m.client_gradient(p, base, generator(9)), m.client_gradient(p, adv, generator(9))
    moved = math.sqrt(sum(float((a[k] - b[k]).norm()) ** 2 for k in ("G", "u", "v")))
    assert moved <= 2 * m.clip / 4 * (1 + 1e-5)


def test_per_sample_gradients_average_to_the_batch_gradient(tmp_path, monkeypatch):
    """Without noise, the mean of the per-sample gradients is the batch gradient: the per-sample path of the step
    loop trains like the batch path; it takes them from ONE text forward per client step (fedlit.privacy), not B."""
    import fedlit.steps

    calls, texts, inside = [], [], []
    real, real_text = fedlit.steps.per_sample_gradients, DPFPL.text_features

    def counted(module, x, y, task):
        calls.append(len(y))
        inside.append(True)
        try:
            return real(module, x, y, task)
        finally:
            inside.pop()

    def text(self, *a, **k):
        texts.extend([1] if inside else [])
        return real_text(self, *a, **k)

    monkeypatch.setattr(fedlit.steps, "per_sample_gradients", counted)
    monkeypatch.setattr(DPFPL, "text_features", text)
    common = ["--data.num_clients", "2", "--trainer.rounds", "1", "--method.init_args.n_ctx", "4",
              "--method.init_args.rank", "2", "--trainer.batch_size", "8", "--method.init_args.epsilon", "0"]
    _, a = _fit(tmp_path, "batch", "dpfpl.yaml", *common)
    assert calls == []
    _, b = _fit(tmp_path, "per", "dpfpl.yaml", *common, "--method.init_args.clipping", "per_sample")
    assert calls and set(calls) == {8} and len(texts) == len(calls)  # one text forward per client step
    assert torch.allclose(a.global_state["G"], b.global_state["G"], atol=1e-6, rtol=0)
    for c in a.personal:
        assert torch.allclose(a.personal[c]["L"], b.personal[c]["L"], atol=1e-6, rtol=0)
