"""Client-side DP-SGD as a trainer option (``trainer.privacy``, :mod:`fedlit.dp_sgd`, issue 22): the mechanism on
hand-built gradients, equality with the ordinary step without noise, PromptFL / FedPGP / PromptFolio (with and
without FedProx's term) by configuration alone with Opacus' ε per client, refusals, and ε across a resume.

Toy backbone (fedlit-toy, bundled weights), 2 clients with 8 training images, 1–2 rounds; CPU, seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlit import checkpoint as ckpt
from fedlit.cli import main
from fedlit.client import ClientModule
from fedlit.dp_sgd import (STEPS_KEY, PrivacySettings, noise_generator, privacy_report, private_backward,
                           private_gradients, sigma_of)
from fedlit.errors import FedlitError
from fedlit.engine import text_side
from fedlit.privacy import rdp_epsilon
from fedlit.methods.fedpgp import FedPGP
from fedlit.methods.promptfl import PromptFL
from fedlit.methods.promptfolio import PromptFolio
from fedlit.prompts import Task
from fedlit.rounds import ClientState
from fedlit.trainer import FedTrainer

ROOT = Path(__file__).resolve().parents[1]
TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))
DP = ("--trainer.privacy.clip", "1.0", "--trainer.privacy.noise_multiplier", "1.0")


# ============================================================================================ the mechanism by hand
def test_joint_clip_sum_and_mean_on_hand_built_gradients():
    """3 samples, C = 1. Sample 0: (a, b) = ((3, 0), 4), joint norm 5 → scaled by 1/(5 + 1e-6); sample 1: norm 0.5,
    kept; sample 2: zero. σ = 0: (0.6 + 0.3, 0) / 3 and (0.8 + 0.4) / 3. ``c`` is not noised: its plain mean."""
    grads = {"a": torch.tensor([[3.0, 0.0], [0.3, 0.0], [0.0, 0.0]]), "b": torch.tensor([[4.0], [0.4], [0.0]]),
             "c": torch.tensor([[10.0], [20.0], [30.0]])}
    out = private_gradients(grads, ["a", "b"], clip=1.0, sigma=0.0, gen=noise_generator(0, 0, 0, 0))
    f = 1.0 / (5.0 + 1e-6)
    assert torch.allclose(out["a"], torch.tensor([(3 * f + 0.3) / 3, 0.0]), atol=1e-7, rtol=0)
    assert torch.allclose(out["b"], torch.tensor([(4 * f + 0.4) / 3]), atol=1e-7, rtol=0)
    assert torch.equal(out["c"], torch.tensor([20.0]))
    # clipping a alone (norm 3 → 1) would give a[0] = (1 + 0.3) / 3: the joint norm is what bounds a sample
    assert not torch.allclose(out["a"][0], torch.tensor(1.3 / 3), atol=1e-3)


def test_noise_has_std_sigma_c_over_b_and_is_keyed_by_seed_round_client_step():
    b, sigma, clip = 4, 2.0, 0.5
    zeros = {"w": torch.zeros(b, 200, 100)}
    out = private_gradients(zeros, ["w"], clip, sigma, noise_generator(1, 2, 3, 4))["w"]
    assert out.std().item() == pytest.approx(sigma * clip / b, rel=0.02)  # 20 000 draws
    assert abs(out.mean().item()) < 0.01
    again = private_gradients(zeros, ["w"], clip, sigma, noise_generator(1, 2, 3, 4))["w"]
    other = private_gradients(zeros, ["w"], clip, sigma, noise_generator(1, 2, 3, 5))["w"]
    assert torch.equal(out, again) and not torch.allclose(out, other)


def _module(toy, method):
    m = ClientModule(toy, method)
    m.train()
    return m


def _batch(toy, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, toy.embed_dim, generator=g), torch.randint(0, len(TASK.classnames), (n,), generator=g)


def _ordinary(module, batch, received=None):
    """The ordinary batch gradient and loss."""
    module.prompt.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0, TASK, None, received)
    loss.backward()
    out = {k: p.grad.clone() for k, p in module.prompt.named_parameters() if p.grad is not None}
    module.prompt.zero_grad(set_to_none=True)
    return out, loss.detach()


def _private(module, batch, settings, sigma=0.0, received=None, side=False):
    loss = private_backward(module, batch, 0, TASK, None, received, settings, sigma, noise_generator(0, 0, 0, 0),
                            text_side=side)
    out = {k: p.grad.clone() for k, p in module.prompt.named_parameters() if p.grad is not None}
    module.prompt.zero_grad(set_to_none=True)
    return out, loss


@pytest.mark.parametrize("make", [lambda: PromptFL(n_ctx=4), lambda: FedPGP(n_ctx=4, rank=2, num_prompts=1),
                                  lambda: PromptFolio(n_ctx=4)], ids=["promptfl", "fedpgp", "promptfolio"])
def test_no_noise_and_huge_clip_is_the_ordinary_gradient(toy, make):
    """σ = 0, C huge: the DP-SGD gradient is the batch's ordinary gradient (fp32 rounding), on both per-sample paths
    (B one-sample passes; one text forward + one batched backward where the method allows it), with and without
    FedProx's term (anchored away from the current tensors, so it has a gradient)."""
    method = make()
    module = _module(toy, method)
    batch = _batch(toy, n=3)
    huge = PrivacySettings(clip=1e9, noise_multiplier=0.0)
    received = {k: v.detach() + 0.05 for k, v in module.prompt.named_parameters() if method.is_shared(k)}
    assert text_side(method) == (not isinstance(method, FedPGP))  # FedPGP's loss has its contrastive term
    for mu in (0.0, 0.1):
        method.prox_mu = mu
        want, loss_want = _ordinary(module, batch, received)
        for side in (False, True) if text_side(method) else (False,):
            got, loss = _private(module, batch, huge, received=received, side=side)
            assert set(got) == set(want)
            for k in want:  # fp32 sums in another order: relative to the gradient's norm
                assert (got[k] - want[k]).norm() <= 1e-5 * want[k].norm(), (mu, side, k)
            assert loss.item() == pytest.approx(loss_want.item(), abs=1e-5)


def test_shared_tensors_only_noise_what_is_sent(toy):
    """``tensors: shared`` (FedPGP: only σ is sent): σ's gradient is clipped and noised, U and V keep their plain
    mean gradient; ``all`` noises them too."""
    module = _module(toy, FedPGP(n_ctx=4, rank=2, num_prompts=1))
    batch = _batch(toy)
    plain, _ = _ordinary(module, batch)
    shared, _ = _private(module, batch, PrivacySettings(clip=1.0, noise_multiplier=1.0, tensors="shared"), 1.0)
    every, _ = _private(module, batch, PrivacySettings(clip=1.0, noise_multiplier=1.0), 1.0)
    assert not torch.allclose(shared["sigma"], plain["sigma"], atol=1e-3)
    for k in ("U", "V"):
        assert torch.allclose(shared[k], plain[k], atol=1e-6, rtol=0)
        assert not torch.allclose(every[k], plain[k], atol=1e-3)


def test_accountant_grows_with_steps_and_falls_with_sigma():
    import dataclasses

    def report(tr, sizes, states):
        sigma = sigma_of(tr.privacy, tr, tuple(sizes.values()), lambda n: tr.batch_starts(n, "dassl"))
        return privacy_report(tr, sizes, states, sigma)

    sizes = {0: 8, 1: 16}
    st = {0: ClientState({}, {STEPS_KEY: torch.tensor(4)}), 1: ClientState({}, {STEPS_KEY: torch.tensor(8)})}
    tr = FedTrainer(rounds=2, batch_size=4, privacy=PrivacySettings(clip=1.0, noise_multiplier=1.0))
    rep = report(tr, sizes, st)["privacy"]
    assert rep["steps_per_client"] == {"0": 4, "1": 8} and rep["sample_rate_per_client"] == {"0": 0.5, "1": 0.25}
    assert rep["epsilon"] == max(rep["epsilon_per_client"].values())
    more = report(tr, sizes, {0: ClientState({}, {STEPS_KEY: torch.tensor(8)})})["privacy"]
    assert more["epsilon_per_client"]["0"] > rep["epsilon_per_client"]["0"] and more["epsilon_per_client"]["1"] == 0
    assert rep["epsilon_per_client"]["1"] == pytest.approx(rdp_epsilon(1.0, 0.25, 8, 1e-5), rel=1e-12)  # Opacus'
    tr = dataclasses.replace(tr, privacy=PrivacySettings(clip=1.0, noise_multiplier=0.7))
    assert report(tr, sizes, st)["privacy"]["epsilon"] > rep["epsilon"]
    # target ε: σ calibrated for the client that needs most noise; it then spends at most ε over the run
    tr = dataclasses.replace(tr, privacy=PrivacySettings(clip=1.0, target_epsilon=3.0))
    full = {0: ClientState({}, {STEPS_KEY: torch.tensor(4)}), 1: ClientState({}, {STEPS_KEY: torch.tensor(8)})}
    cal = report(tr, sizes, full)["privacy"]
    assert cal["noise_multiplier"] > 0 and cal["calibrated"]
    assert 2.9 <= cal["epsilon"] <= 3.0


@pytest.mark.parametrize("kw, says", [({"clip": 1.0}, "neither"),
                                      ({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "both"),
                                      ({"clip": 0.0, "noise_multiplier": 1.0}, "clip=0.0"),
                                      ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta")])
def test_bad_settings_one_line(kw, says):
    with pytest.raises(FedlitError, match=says) as e:
        PrivacySettings(**kw)
    assert "\n" not in str(e.value)


# ============================================================================================ by configuration alone
def test_settings_parse_from_yaml_and_dotted_flags(tmp_path, capsys):
    yaml = tmp_path / "dp.yaml"
    yaml.write_text("trainer:\n  privacy:\n    clip: 0.5\n    target_epsilon: 2.0\n    tensors: shared\n")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(yaml),
              "--trainer.privacy.delta", "1e-6", "--print_config"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert "privacy:\n    clip: 0.5\n    noise_multiplier: null\n    target_epsilon: 2.0\n" in out
    assert "delta: 1.0e-06\n    tensors: shared" in out
    from fedlit.experiment import fit_parser

    parser = fit_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "quickstart.yaml"), *DP])
    settings = parser.instantiate(cfg).trainer.privacy
    assert settings == PrivacySettings(clip=1.0, noise_multiplier=1.0)


def _fit(out: Path, config: str, *args, rounds: int = 2) -> tuple[int, dict | None]:
    rc = main(["fit", "--config", str(ROOT / "configs" / config), "--config", str(ROOT / "configs" / "embedded.yaml"),
               "--data.num_clients", "2", "--data.shots", "1", "--method.init_args.n_ctx", "4",
               "--data.dataset_args", '{"test_per_class": 1, "train_per_class": 2}', "--trainer.batch_size", "4",
               "--trainer.rounds", str(rounds), "--trainer.eval_every", "100", "--trainer.augment", "none",
               "--trainer.progress", "false", "--out_dir", str(out), *args])
    res = out / "results.json"
    return rc, json.loads(res.read_text()) if res.exists() else None



#: the default suite runs PromptFL's; FedPGP's (B one-sample passes) and PromptFolio's are ``slow`` (~10 s each)
@pytest.mark.parametrize("config", ["promptfl.yaml", pytest.param("fedpgp.yaml", marks=pytest.mark.slow),
                                    pytest.param("promptfolio.yaml", marks=pytest.mark.slow)])
def test_methods_run_private_by_configuration_with_and_without_fedprox(tmp_path, config):
    rc, res = _fit(tmp_path / "dp", config, *DP, rounds=1)
    assert rc == 0
    priv = res["privacy"]
    assert priv["mechanism"] == "dp-sgd" and priv["noise_multiplier"] == 1.0 and priv["tensors"] == "all"
    assert set(priv["epsilon_per_client"]) == {"0", "1"}
    assert all(math.isfinite(e) and e > 0 for e in priv["epsilon_per_client"].values())
    assert priv["epsilon"] == max(priv["epsilon_per_client"].values())
    sizes = {c: round(4 / q) for c, q in priv["sample_rate_per_client"].items()}  # n = B / q
    assert priv["steps_per_client"] == {c: n // 4 for c, n in sizes.items()}  # 1 round × full batches (dassl)
    rc, prox = _fit(tmp_path / "prox", config, *DP, "--trainer.prox_mu", "0.1", rounds=1)
    assert rc == 0 and prox["privacy"]["epsilon"] == pytest.approx(priv["epsilon"])
    a, b = (ckpt.load(tmp_path / d / ckpt.NAME) for d in ("dp", "prox"))
    # same seeds and noise streams: only μ's (small, μ(θ − θ_global)) gradient differs
    assert any(not torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)


@pytest.mark.slow
def test_no_noise_run_equals_the_ordinary_run_and_epsilon_is_none(tmp_path):
    args = ("--trainer.optimizer_state", "per_client")
    rc, plain = _fit(tmp_path / "plain", "promptfl.yaml", *args, rounds=1)
    rc2, dp = _fit(tmp_path / "dp", "promptfl.yaml", *args, "--trainer.privacy.clip", "1e9",
                   "--trainer.privacy.noise_multiplier", "0", rounds=1)
    assert rc == rc2 == 0 and "privacy" not in plain and dp["privacy"]["epsilon"] is None
    a, b = (ckpt.load(tmp_path / d / ckpt.NAME) for d in ("plain", "dp"))
    assert torch.allclose(a.global_state["ctx"], b.global_state["ctx"], atol=1e-6, rtol=0)
    assert any(k.endswith(STEPS_KEY) for k in b.personal[0]) and not any(k.endswith(STEPS_KEY) for k in a.personal[0])


@pytest.mark.slow
def test_resume_keeps_the_epsilon_accounting(tmp_path):
    """A 2-round run = 1 round + a resumed round: same steps, same ε (more than after 1 round), same tensors."""
    rc, full = _fit(tmp_path / "full", "promptfl.yaml", *DP)
    rc1, one = _fit(tmp_path / "run", "promptfl.yaml", *DP, rounds=1)
    (tmp_path / "run" / "results.json").unlink()  # an unfinished run: the next command resumes its checkpoint
    rc2, two = _fit(tmp_path / "run", "promptfl.yaml", *DP)
    assert rc == rc1 == rc2 == 0
    assert two["privacy"]["steps_per_client"] == full["privacy"]["steps_per_client"]
    assert two["privacy"]["epsilon_per_client"] == pytest.approx(full["privacy"]["epsilon_per_client"])
    assert two["privacy"]["epsilon"] > one["privacy"]["epsilon"]
    a, b = (ckpt.load(tmp_path / d / ckpt.NAME) for d in ("full", "run"))
    assert torch.allclose(a.global_state["ctx"], b.global_state["ctx"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("config, extra, says", [
    ("promptfl.yaml", ("--trainer.lockstep", "2", "--trainer.optimizer_state", "fresh"), "lock-step"),
    ("promptfl.yaml", ("--trainer.sync", "step"), "sync=step"),
    ("promptfl.yaml", ("--trainer.precision", "16-mixed"), "fp16"),
    ("dpfpl.yaml", ("--method.init_args.rank", "2"), "own DP"),
    ("promptfl.yaml", ("--trainer.privacy.target_epsilon", "1.0"), "both"),
    ("promptfl.yaml", ("--trainer.privacy.clip", "-1"), "clip=-1"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys, config, extra, says):
    rc, res = _fit(tmp_path / "r", config, *DP, *extra, rounds=1)
    err = capsys.readouterr().err
    assert rc == 2 and res is None and says in err, err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_flower_server_refuses_privacy_in_one_line(tmp_path):
    """Under Flower the DP step counts stay with the clients on the SuperNodes: the server cannot report ε yet."""
    pytest.importorskip("flwr", minversion="1.21")
    import tomllib

    from fedlit.integrations import flower as fl

    app = tmp_path / "app"
    assert main(["flower", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.optimizer_state", "fresh",
                 *DP, "--out_dir", str(tmp_path / "run"), "--app_dir", str(app)]) == 0
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    with pytest.raises(FedlitError, match="not available under Flower") as e:
        fl.run_server(None, run_config)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "results.json").exists()
