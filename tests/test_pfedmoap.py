"""pFedMoAP: the gating equations on hand-built tensors, round 1 = CoOp, shared vs personal, the server's expert bank
(selection rules, payloads, checkpoint and resume). Toy backbone, CPU, seconds (the runs: tens of seconds)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedlit import checkpoint as ckpt
from fedlit.client import ClientModule
from fedlit.data.federation import FederatedData
from fedlit.methods import method_class
from fedlit.methods.base import FedMethod, Update
from fedlit.methods.pfedmoap import GatingNet, PFedMoAP, encode_contexts, moap_logits, pool
from fedlit.orchestrator import Orchestrator
from fedlit.prompts import Task
from fedlit.rounds import RoundProtocol
from fedlit.trainer import FedTrainer

TASK = Task("tiny", ("circle", "square", "red_triangle", "star"))


def _direct_gating(gate: GatingNet, f, keys, r: int, s: float) -> torch.Tensor:
    """g[b, c] written out: per class and head, softmax_k(s·⟨W_q pool(f_b), W_k pool(t_k(c))⟩) over the M keys."""
    h = gate.heads
    B, (M, C, _) = f.shape[0], keys.shape
    d = gate.q.out_features
    dk = d // h
    out = torch.zeros(B, C, d)
    for b in range(B):
        q = gate.q.weight @ f[b, ::r] + gate.q.bias
        for c in range(C):
            heads = []
            for j in range(h):
                sl = slice(j * dk, (j + 1) * dk)
                ks = [(gate.k.weight @ keys[m, c, ::r] + gate.k.bias)[sl] for m in range(M)]
                vs = [(gate.v.weight @ keys[m, c, ::r] + gate.v.bias)[sl] for m in range(M)]
                scores = torch.stack([s * torch.dot(q[sl], k) for k in ks])
                a = torch.exp(scores - scores.max())
                a = a / a.sum()
                heads.append(sum(a[m] * vs[m] for m in range(M)))
            out[b, c] = gate.o.weight @ torch.cat(heads) + gate.o.bias
    return out


def test_registered_and_shared_vs_personal(toy):
    assert method_class("pfedmoap") is PFedMoAP
    m = PFedMoAP(gating_dim=32, gating_heads=4)
    module = ClientModule(toy, m)
    shared, personal = module.export()
    assert set(shared) == {"ctx"}
    assert set(personal) == {"own_ctx"} | {f"gate.{n}.{p}" for n in "qkvo" for p in ("weight", "bias")}
    assert module.prompt.ctx.shape == (16, toy.text_width)
    assert sum(v.numel() for k, v in personal.items() if k.startswith("gate.")) == 4 * (32 * 32 + 32)
    assert sum(p.numel() for p in GatingNet(128, 8).parameters()) == 66048  # the official ViT-B/16 gating net


def test_gating_matches_a_direct_computation_on_hand_built_tensors():
    torch.manual_seed(0)
    B, C, M, D, r, s, lam, scale = 3, 4, 3, 16, 2, 10.0, 0.5, 100.0
    gate = GatingNet(D // r, heads=2)
    f = F.normalize(torch.randn(B, D), dim=-1)
    t = F.normalize(torch.randn(M, C, D), dim=-1)  # t[0]: the local prompt, t[1:]: the experts
    assert torch.equal(pool(f, r), f[:, ::2])
    g = gate(pool(f, r), pool(t, r), s)
    with torch.no_grad():
        want_g = _direct_gating(gate, f, t, r, s)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-5)
    z = moap_logits(f, t[0], t[1:], gate, r, s, lam, scale)
    z_loc = scale * f @ t[0].t()
    z_moe = scale * torch.stack([torch.stack([f[b, ::r] @ want_g[b, c] for c in range(C)]) for b in range(B)])
    torch.testing.assert_close(z, lam * z_loc + z_moe, rtol=1e-5, atol=1e-4)
    # the gating is invariant to the order of the experts (the server sends them sorted by client id)
    torch.testing.assert_close(moap_logits(f, t[0], t[1:].flip(0), gate, r, s, lam, scale), z, rtol=1e-5, atol=1e-4)
    # the scale s replaces 1/√d_k: another s, other logits
    assert not torch.allclose(moap_logits(f, t[0], t[1:], gate, r, 1.0, lam, scale), z)


def test_round_one_without_experts_is_plain_coop(toy):
    m = PFedMoAP(gating_dim=32, gating_heads=4)
    module = ClientModule(toy, m)
    module.load_prompt_state(*module.export())  # nothing sent beside the prompt: no experts
    module.train()
    x, y = torch.randn(5, toy.embed_dim), torch.tensor([0, 1, 2, 3, 0])
    logits = module(x, TASK)
    t0 = encode_contexts(toy, TASK, module.prompt.ctx.unsqueeze(0))[0]
    torch.testing.assert_close(logits, toy.logit_scale * F.normalize(x, dim=-1) @ t0.t())
    m.loss(module, x, y, TASK).backward()
    assert module.prompt.ctx.grad is not None
    assert all(p.grad is None for p in module.prompt.gate.parameters())  # the gating net is not trained in round 1


def test_experts_enter_the_logits_without_gradient_and_once_per_download(toy, monkeypatch):
    m = PFedMoAP(gating_dim=32, gating_heads=4, lmbda=0.5)
    module = ClientModule(toy, m)
    shared, personal = module.export()
    experts = torch.randn(2, 16, toy.text_width) * 0.02
    module.load_prompt_state({**shared, "experts": experts}, personal)
    module.train()
    import fedlit.methods.pfedmoap as moap

    calls = []
    real = moap.encode_contexts
    monkeypatch.setattr(moap, "encode_contexts", lambda clip, task, ctx: calls.append(ctx.shape[0]) or real(clip, task, ctx))
    x, y = torch.randn(5, toy.embed_dim), torch.tensor([0, 1, 2, 3, 0])
    logits = module(x, TASK)
    module(x, TASK)
    assert calls == [1, 2, 1]  # the experts' features once, the live local prompt every forward
    with torch.no_grad():
        t0 = real(toy, TASK, module.prompt.ctx.unsqueeze(0))[0]
        te = real(toy, TASK, experts)
        want = moap_logits(F.normalize(x, dim=-1), t0, te, module.prompt.gate, 4, 10.0, 0.5, float(toy.logit_scale))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    m.loss(module, x, y, TASK).backward()
    assert module.prompt.ctx.grad is not None and all(p.grad is not None for p in module.prompt.gate.parameters())
    module.load_prompt_state(shared, personal)  # the next client got no experts: none left over
    assert module.prompt.experts is None and not module.prompt.expert_features


def test_local_prompt_restarts_from_the_global_one_and_evaluation_uses_the_own_copy(toy):
    m = PFedMoAP(gating_dim=32, gating_heads=4)
    module = ClientModule(toy, m)
    _, personal = module.export()
    trained = torch.randn(16, toy.text_width)
    personal = {**personal, "own_ctx": trained}  # the client's last trained prompt
    glob = {"ctx": torch.zeros(16, toy.text_width)}
    module.load_prompt_state(glob, personal)
    assert torch.equal(module.prompt.ctx.detach(), glob["ctx"])  # training starts from p̄
    module.train()
    assert torch.equal(m._context(module.prompt), module.prompt.ctx)
    module.eval()
    assert torch.equal(m._context(module.prompt), trained)  # official: evaluated with its own p_i
    assert torch.equal(PFedMoAP(eval_prompt="global")._context(module.prompt), module.prompt.ctx)
    with torch.no_grad():
        module.prompt.ctx.add_(1.0)
    _, after = module.export()  # export keeps the trained prompt as the client's own copy
    assert torch.equal(after["own_ctx"], glob["ctx"] + 1.0)


def _bank(prompts: dict[int, torch.Tensor]):
    return {c: {"ctx": p} for c, p in prompts.items()}


def test_random_rule_is_one_fixed_order_and_skips_self_and_untrained_clients():
    m = PFedMoAP(num_experts=3)
    m.setup_federation(TASK, 6)
    bank = _bank({c: torch.full((2, 3), float(c)) for c in (0, 1, 2, 4, 5)})  # client 3 never trained
    glob = {"ctx": torch.zeros(2, 3)}
    picks = {c: m.expert_ids(c, glob, bank, seed=7) for c in range(6)}
    for c, ids in picks.items():
        assert len(ids) == 2 and c not in ids and 3 not in ids
    import numpy as np

    order = [j for j in np.random.default_rng([7, 0x40AB]).permutation(6).tolist() if j != 3]
    assert picks[3] == sorted(order[:2])  # the first M−1 trained clients of the run's order
    assert m.expert_ids(0, glob, bank, seed=7) == picks[0]  # not redrawn
    assert m.expert_ids(0, glob, {}, seed=7) == [] and m.server_payload(0, glob, {}, 7) == {}
    payload = m.server_payload(3, glob, bank, 7)
    assert torch.equal(payload["experts"], torch.stack([bank[j]["ctx"] for j in picks[3]]))
    assert PFedMoAP(num_experts=1).server_payload(3, glob, bank, 7) == {}  # M = 1: CoOp


def test_nearest_rule_returns_client_ids_of_the_closest_prompts():
    m = PFedMoAP(num_experts=3, expert_rule="nearest")
    m.setup_federation(TASK, 6)
    # distances from client 5's prompt (value 5): client 4 → 1, client 2 → 3, client 1 → 4, client 0 → 5
    bank = _bank({0: torch.zeros(1), 1: torch.ones(1), 2: torch.full((1,), 2.0), 4: torch.full((1,), 4.0),
                  5: torch.full((1,), 5.0)})
    glob = {"ctx": torch.zeros(1)}
    assert m.expert_ids(5, glob, bank) == [2, 4]  # ids, not positions in the candidate list ([0, 1, 2, 4])
    assert m.expert_ids(0, glob, bank) == [1, 2]
    assert m.expert_ids(3, {"ctx": torch.full((1,), 4.4)}, bank) == [4, 5]  # never trained: distance to p̄


def test_protocol_bank_payloads_comm_bytes_and_no_personal_key_travels(toy):
    m = PFedMoAP(gating_dim=32, gating_heads=4, num_experts=10)
    m.setup_federation(TASK, 3)
    module = ClientModule(toy, m)
    shared, personal = module.export()
    proto = RoundProtocol(m, FedTrainer(rounds=2, progress=False), 0, [4, 4, 8], shared, verbose=False)
    sent = proto.configure(0)
    assert all(set(p) == {"ctx"} for p in sent.values())  # round 1: no experts
    ups = [Update(c, {"ctx": torch.full_like(shared["ctx"], float(c))}, personal, n, 0.0, steps=1)
           for c, n in enumerate([4, 4, 8])]
    proto.aggregate(ups)
    assert sorted(proto.bank) == [0, 1, 2] and torch.equal(proto.bank[2]["ctx"], ups[2].shared["ctx"])
    torch.testing.assert_close(proto.global_state["ctx"], torch.full_like(shared["ctx"], 1.25))  # (0·4+1·4+2·8)/16
    sent = proto.configure(1)
    for c, p in sent.items():
        assert set(p) == {"ctx", "experts"} and not set(p) & set(personal)
        want = torch.stack([ups[j].shared["ctx"] for j in range(3) if j != c])
        assert torch.equal(p["experts"], want)
    scalars = proto.round_scalars([0, 1, 2], ups)
    assert scalars["transfer/bytes_down"] == 3 * 3 * shared["ctx"].numel() * 4  # p̄ + 2 experts per client
    assert scalars["transfer/bytes_up"] == 3 * shared["ctx"].numel() * 4
    assert FedMethod.server_bank is False and m.client_specific


def test_bank_round_trips_through_a_checkpoint(tmp_path):
    bank = {0: {"ctx": torch.ones(2, 3)}, 3: {"ctx": torch.zeros(2, 3)}}
    ckpt.save(tmp_path / "c.safetensors", ckpt.RunState(round=1, global_state={"ctx": torch.ones(2, 3)},
                                                         personal={}, bank=bank))
    state = ckpt.load(tmp_path / "c.safetensors")
    assert sorted(state.bank) == [0, 3] and torch.equal(state.bank[3]["ctx"], bank[3]["ctx"])
    assert state.personal == {}


def _orch(clip, fed, rounds, **kw):
    trainer = FedTrainer(rounds=rounds, local_epochs=1, batch_size=8, checkpoint_every=1, progress=False,
                         augment="none", eval_every=rounds)
    fabric = trainer.make_fabric()
    fabric.launch()
    method = PFedMoAP(gating_dim=32, gating_heads=4, **kw)
    torch.manual_seed(0)  # the initial prompt and gating net (the CLI seeds everything before building)
    return Orchestrator(fabric, clip, fed, method, trainer, 0, {"dataset": "shapes-dark", "backbone": "fedlit-toy"})


def test_two_rounds_train_the_gating_nets_and_a_resume_restores_the_bank(toy, tmp_path):
    fed = FederatedData(dataset="shapes-dark", num_clients=3, shots=2).setup(seed=0)
    ref = _orch(toy, fed, 2)
    a = ref.fit(tmp_path / "ref")
    gate_init = ref.init_personal["gate.q.weight"]
    gates = [ref.protocol.clients[c].personal["gate.q.weight"] for c in range(3)]
    # round 2 downloads the other clients' round-1 prompts, so the gating nets train (each its own way)
    assert all(not torch.equal(g, gate_init) for g in gates) and not torch.equal(gates[0], gates[1])
    assert sorted(ref.protocol.bank) == [0, 1, 2]
    assert all(math.isfinite(v) for v in a["final"].values())

    first = _orch(toy, fed, 1)
    first.bank = ref.bank  # frozen-feature cache (not the expert bank), shared to save time
    first.fit(tmp_path / "run")
    state = ckpt.load(tmp_path / "run" / ckpt.NAME)
    assert sorted(state.bank) == [0, 1, 2] and set(state.bank[0]) == {"ctx"}
    resumed = _orch(toy, fed, 2)
    resumed.bank = ref.bank
    b = resumed.fit(tmp_path / "run", resume=state)
    assert b["final"] == a["final"]
    assert all(torch.equal(resumed.protocol.clients[c].personal["gate.q.weight"], gates[c]) for c in range(3))
    state.bank = {}  # a resume that lost the bank: round 2 without experts, the gating nets stay untrained
    lost = _orch(toy, fed, 2)
    lost.bank = ref.bank
    lost.fit(tmp_path / "lost", resume=state)
    assert all(torch.equal(lost.protocol.clients[c].personal["gate.q.weight"], gate_init) for c in range(3))


def test_gating_keeps_its_own_constant_lr(toy):
    fed = FederatedData(dataset="shapes-dark", num_clients=2, shots=2).setup(seed=0)
    orch = _orch(toy, fed, 1, gating_lr=0.01, lr=0.002)
    opt, _, lr = orch._client_optimizer(orch.protocol.state_of(0))
    assert lr == 0.002 and sorted(g["lr"] for g in opt.param_groups) == [0.002, 0.01]
    assert sum(p.numel() for g in opt.param_groups if g["lr"] == 0.01 for p in g["params"]) == 4 * (32 * 32 + 32)
