"""fedlit on Flower (issue 8): a Flower run gives the numbers of the in-process run, only shared tensors travel,
and Flower's byte counts match fedlit's communication accounting.

- The fast tests drive the real ``server_app`` logic (:func:`run_server`, :class:`FedlitStrategy`) and the real
  ``client_app`` with Flower ``Message`` objects through an in-process grid that serialises every message to
  Flower's wire objects and back (what a SuperLink stores and forwards), two SuperNode contexts.
- The slow test starts a real SuperLink and two SuperNodes as separate processes on localhost (insecure mode,
  free ports, bounded time) and ``flwr run``s the generated app for PromptFL and FedPGP.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", minversion="1.21",
                           reason="Flower is an optional extra: pip install 'fedlit[flower]'")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from fedlit.cli import main  # noqa: E402
from fedlit.integrations import flower as fl  # noqa: E402
from fedlit.integrations import flower_deploy as fd  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EMBEDDED = ["--config", str(CONFIGS / "embedded.yaml"), "--trainer.rounds", "2"]
# a Flower run trains clients on several SuperNodes: the Dassl methods' optimiser cannot be chained client to client
FRESH = ["--trainer.optimizer_state", "fresh"]
PROMPTFL = ["--config", str(CONFIGS / "quickstart.yaml"), *EMBEDDED, *FRESH]
FEDPGP = ["--config", str(CONFIGS / "fedpgp.yaml"), *EMBEDDED, *FRESH]
# the fast test's FedPGP: 4 clients with 4 shots, 2 rounds, evaluated after the last one (a minute on 2 cores)
FEDPGP_SMALL = [*FEDPGP, "--data.num_clients", "4", "--data.shots", "4", "--trainer.eval_every", "2"]
NPY_HEADER = 128  # bytes of the .npy header numpy writes for these small float32 tensors


# ------------------------------------------------------------------------------------------------ helpers
def fit_in_process(out: Path, args: list[str]) -> dict:
    assert main(["fit", *args, "--out_dir", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def make_app(tmp: Path, name: str, args: list[str], supernodes: int = 2) -> tuple[Path, Path, dict]:
    """``fedlit flower`` → (app dir, run dir, the app's run_config)."""
    out, app = tmp / name, tmp / f"{name}-app"
    assert main(["flower", *args, "--out_dir", str(out), "--app_dir", str(app),
                 "--supernodes", str(supernodes), "--round_timeout", "600"]) == 0
    run_config = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return app, out, run_config


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def same(a, b) -> bool:
    """Equality with NaN == NaN (failed or empty evaluations)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(flower_dir: Path, ref_dir: Path) -> dict:
    got, ref = (json.loads((d / "results.json").read_text()) for d in (flower_dir, ref_dir))
    for key in ("final", "per_client", "history", "identity", "method", "seed", "dataset", "backbone"):
        assert same(got[key], ref[key]), f"{key}: flower {got[key]} != in-process {ref[key]}"
    s_got, s_ref = scalars(flower_dir), scalars(ref_dir)
    assert s_got.keys() == s_ref.keys()
    for tag in s_ref:  # train/…, transfer/…, eval/…, eval_client/…, train_client/… — bitwise on CPU
        assert s_got[tag] == s_ref[tag], tag
    assert (flower_dir / "config.yaml").exists()
    return got


def assert_bytes_match(results: dict, ref_dir: Path, shared_keys: dict[str, int]) -> None:
    """Per round: the tensor bytes of Flower's records = fedlit's transfer/bytes_*; Flower's count_bytes() adds
    exactly one .npy header and the key name per array and client."""
    ref = scalars(ref_dir)
    per_client_overhead = sum(NPY_HEADER + len(k) for k in shared_keys)
    for entry in results["flower"]["rounds"]:
        r = entry["round"]
        up, down = dict(ref["transfer/bytes_up"])[r], dict(ref["transfer/bytes_down"])[r]
        n_up, n_down = len(entry["clients"]) - len(entry["failed_clients"]), len(entry["clients"])
        assert entry["tensor_bytes_up"] == up and entry["tensor_bytes_down"] == down
        assert entry["bytes_up"] == up + n_up * per_client_overhead
        assert entry["bytes_down"] == down + n_down * per_client_overhead
        assert up == n_up * sum(shared_keys.values())


class InProcessGrid(Grid):
    """A Grid without a SuperLink: every message goes through Flower's wire objects (deflate → bytes →
    inflate) to the real ``client_app`` with one Context per SuperNode, and the reply comes back the same way.
    Replies are returned in reverse order (the server must not depend on it)."""

    def __init__(self, run_config: dict, supernodes: int):
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=dict(run_config),
                                          node_config={"partition-id": i, "num-partitions": supernodes})
                         for i in range(supernodes)}
        self.log: list[dict] = []  # every reply the server received: type, node, raw wire bytes, node state

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in list(messages):
            msg, _ = wire(msg)
            ctx = self.contexts[msg.metadata.dst_node_id]
            reply, raw = wire(fl.client_app(msg, ctx))
            self.log.append({"type": msg.metadata.message_type, "node": ctx.node_id, "reply": reply, "raw": raw,
                             "personal": {k: {n: a.numpy().copy() for n, a in rec.items()}
                                          for k, rec in ctx.state.array_records.items()}})
            replies.append(reply)
        return replies[::-1]


def wire(msg: Message) -> tuple[Message, bytes]:
    """``msg`` as the receiving side gets it, and every byte of its serialised objects."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, dict(contents))
    out.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink assigns
    return out, b"".join(contents.values())


@pytest.fixture
def task_identity():
    """Message() reads the run/node of the current Flower task (set by Flower's runtime in a real process)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    fl._RUNTIMES.clear()  # the ClientApp's cached backbone/data/features


# ------------------------------------------------------------------------------------------------ fast tests
def test_fedpgp_over_flower_messages_equals_in_process_and_keeps_u_v_on_the_supernodes(tmp_path, task_identity,
                                                                                      monkeypatch):
    ref = tmp_path / "ref"
    fit_in_process(ref, FEDPGP_SMALL)
    app, out, run_config = make_app(tmp_path, "flower", FEDPGP_SMALL)
    builds = []
    build = fl.build_runtime
    monkeypatch.setattr(fl, "build_runtime", lambda text: builds.append(text) or build(text))
    grid = InProcessGrid(run_config, supernodes=2)
    fl.run_server(grid, run_config)
    # backbone, data and features: built once by the server and once for the ClientApp process (cached across
    # the 8 messages its two SuperNodes handled), never per message
    assert len(builds) == 2 and len(grid.log) == 8

    results = assert_same_run(out, ref)  # same final / per-client / history / TensorBoard scalars, bitwise
    assert results["flower"]["partitions"] == {"0": [0, 2], "1": [1, 3]}
    assert [h["round"] for h in results["history"]] == [2]  # eval_every 2: round 1 sends no evaluate message

    # What the server received: only σ, never U or V — neither their names nor their bytes.
    kinds = [e["type"] for e in grid.log]
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 2  # 2 rounds × 2 SuperNodes; 1 evaluation
    personal_seen = 0
    for e in grid.log:
        for key, rec in e["reply"].content.array_records.items():
            assert set(rec.keys()) == {"sigma"}, (key, list(rec.keys()))
        for key, tensors in e["personal"].items():
            assert key.startswith(fl.PERSONAL_PREFIX) and set(tensors) == {"U", "V"}
            for name, arr in tensors.items():
                assert arr.size >= 16
                assert arr.tobytes()[:64] not in e["raw"], f"{key}/{name} found in a message to the server"
                personal_seen += 1
    assert personal_seen > 0
    for entry in results["flower"]["rounds"]:
        assert all(set(v) == {"sigma"} for v in entry["received"].values())
    # each SuperNode holds exactly its own clients' personal state
    for ctx in grid.contexts.values():
        pid = ctx.node_config["partition-id"]
        assert sorted(ctx.state.array_records) == [f"{fl.PERSONAL_PREFIX}{c}" for c in (pid, pid + 2)]

    # Bytes per round: Flower's records carry exactly fedlit's transfer/bytes_up and transfer/bytes_down.
    sigma_bytes = 1 * 16 * 128 * 4  # N × n_ctx × width (fedlit-toy) × float32
    assert_bytes_match(results, ref, {"sigma": sigma_bytes})
    up = dict(scalars(ref)["transfer/bytes_up"])
    assert up == {1: 4 * sigma_bytes, 2: 4 * sigma_bytes}


def _reference_and_grid(tmp_path, config: str):
    """The in-process reference run of ``config`` on the embedded default (4 clients, 2 shots) and the Flower app's
    in-process grid of 2 SuperNodes for the same arguments: ``(ref, out, run_config, grid)``."""
    own = [] if config == "fedtpg.yaml" else FRESH  # FedTPG keeps its per-client optimiser on the SuperNodes
    args = ["--config", str(CONFIGS / config), *EMBEDDED, *own, "--data.num_clients", "4", "--data.shots", "2",
            "--trainer.eval_every", "2"]
    ref = tmp_path / "ref"
    fit_in_process(ref, args)
    _, out, run_config = make_app(tmp_path, "flower", args)
    return ref, out, run_config, InProcessGrid(run_config, supernodes=2)


def test_fedtpg_client_optimizer_state_stays_on_the_supernodes_and_global_protocol_matches(tmp_path, task_identity):
    """FedTPG (global evaluation protocol): each client's momentum buffers and cosine-schedule step are client
    state kept in the SuperNode's Context.state between rounds; the run still equals the in-process one."""
    ref, out, run_config, grid = _reference_and_grid(tmp_path, "fedtpg.yaml")
    fl.run_server(grid, run_config)
    assert_same_run(out, ref)  # includes train/lr: the per-client schedule stepped on the SuperNodes
    lrs = dict(scalars(ref)["train/lr"])
    assert lrs[2] < lrs[1]
    for ctx in grid.contexts.values():
        pid = ctx.node_config["partition-id"]
        assert sorted(ctx.state.array_records) == [f"{fl.OPTIM_PREFIX}{c}" for c in (pid, pid + 2)]
        participations = ctx.state.array_records[f"{fl.OPTIM_PREFIX}{pid}"]["participations"].numpy()
        assert int(participations) == 2
    for e in grid.log:  # momentum buffers never travel
        for rec in e["reply"].content.array_records.values():
            assert not any("/" in k or k == "participations" for k in rec.keys())


def test_pfedmoap_expert_payloads_travel_to_the_supernodes_and_the_run_equals_in_process(tmp_path, task_identity):
    """pFedMoAP: the server's bank of client prompts (round protocol) builds each client's expert payload; the
    experts reach the SuperNodes in round 2, the gating nets never leave them, and the run equals the in-process one."""
    ref, out, run_config, grid = _reference_and_grid(tmp_path, "pfedmoap.yaml")
    sent = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda messages, **kw: sent.extend(messages) or send(messages, **kw)
    fl.run_server(grid, run_config)
    results = assert_same_run(out, ref)
    experts = [{k: list(m.content.array_records[k].keys()) for k in m.content.array_records if k.startswith("client.")}
               for m in sent if m.metadata.message_type == "train"]
    assert len(experts) == 4 and all(len(msg) == 2 for msg in experts)  # 2 rounds × 2 SuperNodes × 2 clients
    assert all(keys == ["ctx"] for msg in experts[:2] for keys in msg.values())  # round 1: no expert yet
    assert all(keys == ["ctx", "experts"] for msg in experts[2:] for keys in msg.values())
    for e in grid.log:
        for rec in e["reply"].content.array_records.values():
            assert set(rec.keys()) == {"ctx"}
        for tensors in e["personal"].values():
            assert "gate.q.weight" in tensors and "own_ctx" in tensors
    down = dict(scalars(ref)["transfer/bytes_down"])
    assert [r["tensor_bytes_down"] for r in results["flower"]["rounds"]] == [down[1], down[2]]
    assert down[2] == 4 * down[1]  # p̄ + 3 expert prompts per client


def test_strategy_rejects_a_reply_carrying_personal_tensors(tmp_path, task_identity):
    """The server refuses any returned tensor the method does not share (a guard against a rogue client)."""
    import torch

    app, out, run_config = make_app(tmp_path, "flower", FEDPGP + ["--trainer.rounds", "1"])
    rt = fl.build_runtime(run_config[fl.CONFIG_KEY])
    strategy = fl.FedlitStrategy(rt.orchestrator, {0: 100, 1: 101})
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    msgs = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)
    assert [m.metadata.dst_node_id for m in msgs] == [100, 101]
    assert sorted(msgs[0].content.array_records) == ["client.0", "client.2", "client.4"]
    assert all(list(r.keys()) == ["sigma"] for r in msgs[0].content.array_records.values())
    msg, _ = wire(msgs[0])
    content = RecordDict({"update.0": fl.to_record({"sigma": torch.zeros(1, 16, 128), "U": torch.zeros(1, 16, 8)}),
                          "metrics.0": MetricRecord({"num-examples": 64, "loss": 1.0, "steps": 4})})
    with pytest.raises(fl.FedlitError, match="does not share: \\['U'\\]"):
        strategy.aggregate_train(1, [Message(content, reply_to=msg)])


def test_fedlit_flower_writes_the_app_and_prints_the_deployment(tmp_path, capsys):
    app, out, run_config = make_app(tmp_path, "run", PROMPTFL, supernodes=3)
    text = capsys.readouterr().out
    assert "flower-superlink --insecure" in text and "flwr run" in text
    for i in range(3):
        assert f'--node-config "partition-id={i} num-partitions=3"' in text
    assert (app / "fedlit_flower_app.py").exists() and (app / "README.md").exists()
    assert run_config[fl.NODES_KEY] == 3 and run_config[fl.OUT_KEY] == str(out.resolve())
    assert "fedlit.methods.PromptFL" in run_config[fl.CONFIG_KEY] and "out_dir" not in run_config[fl.CONFIG_KEY]
    assert not out.exists()  # the ServerApp creates the run directory
    assert main(["flower", *PROMPTFL, "--supernodes", "0"]) == 2
    assert "--supernodes 0" in capsys.readouterr().err
    chained = [a for a in PROMPTFL if a not in FRESH] + ["--trainer.optimizer_state", "chain"]  # (the quickstart
    # itself trains fresh; PromptFL's official optimiser is chained client to client)
    assert main(["flower", *chained, "--out_dir", str(tmp_path / "chained")]) == 2
    assert "--trainer.optimizer_state fresh" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real deployment
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_real_superlink_and_two_supernodes_reproduce_the_in_process_runs(tmp_path):
    """SuperLink + 2 SuperNodes as separate processes (insecure, localhost); 2 rounds of PromptFL and FedPGP
    on the embedded default; results equal to the in-process runs; only shared tensors received; bytes match."""
    cases = {"promptfl": (PROMPTFL, {"ctx": 4 * 128 * 4}), "fedpgp": (FEDPGP, {"sigma": 16 * 128 * 4})}
    with fd.LocalDeployment(tmp_path / "deployment", supernodes=2) as dep:
        for name, (args, shared) in cases.items():
            ref = tmp_path / f"{name}-ref"
            fit_in_process(ref, args)
            app, out, _ = make_app(tmp_path, name, args)
            info = dep.run(app, out / "results.json", timeout=600)
            assert info["status"] == "finished:completed", info
            results = assert_same_run(out, ref)
            for entry in results["flower"]["rounds"]:
                assert all(set(v) == set(shared) for v in entry["received"].values()), entry["received"]
            assert_bytes_match(results, ref, shared)
            assert info["network-traffic"]["total-bytes"] > sum(
                e["bytes_up"] + e["bytes_down"] for e in results["flower"]["rounds"])
