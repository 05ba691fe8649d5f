"""Run a fedlit method as a real Flower federation (``pip install 'fedlit[flower]'``, Flower >= 1.21).

The fedlit method stays the single source of truth; Flower only carries the messages. The same
``server_app`` / ``client_app`` run in Flower's deployment runtime (a SuperLink and SuperNodes, on separate
machines) and in anything else that drives a Flower ``ServerApp``/``ClientApp``.

Who runs what:

- **ServerApp** (started by the SuperLink, on the server machine): builds the same
  :class:`~fedlit.orchestrator.Orchestrator` as ``fedlit fit`` from the same config (same seed, so the same
  initial tensors), samples each round's clients with fedlit's :class:`~fedlit.rounds.RoundProtocol` (the one
  the in-process loop uses: client sampling, what each client is sent, failure policy, aggregation sorted by client
  id through :meth:`FedMethod.aggregate`, evaluation cadence) and writes ``config.yaml``, ``results.json`` and the TensorBoard scalars of an
  in-process run (through the orchestrator's own logging and :meth:`Orchestrator.evaluate`).
- **ClientApp** (started by each SuperNode): the SuperNode started with ``--node-config "partition-id=i
  num-partitions=n"`` hosts fedlit clients ``i, i+n, i+2n, …`` (fedlit's own round-robin
  :func:`~fedlit.rounds.shard`, the split ``--trainer.devices n`` uses). It builds the frozen backbone, the
  data and the method's component once per process (cached, keyed by the run's config; Flower's deployment
  runtime starts one ClientApp process per message, runtimes that keep it alive reuse the cache) and runs
  :class:`fedlit.engine.Clients` (the client engine) / the evaluator for its clients. Personal tensors (FedPGP's
  U/V, FedOTP's local prompt, pFedPG's and VPT's heads, CoOp's context) and a client's optimiser state (FedTPG's
  persistent momentum and schedule step) live in Flower's per-node ``Context.state`` (``fedlit.personal.<cid>``,
  ``fedlit.optim.<cid>``) and never leave the SuperNode: only the method's shared tensors travel (the server
  also refuses any returned tensor the method does not share).

Messages (``RecordDict`` keys):

=========  =====================================================  ==============================================
type       server → SuperNode                                     SuperNode → server
=========  =====================================================  ==============================================
query      (empty)                                                ``node``: partition-id, num-partitions
train      ``config`` (server-round, fedlit-round, cids);         ``update.<cid>``: ArrayRecord of the shared
           ``client.<cid>``: ArrayRecord, what client cid is      tensors; ``metrics.<cid>``: num-examples,
           sent (one per selected client)                         loss, steps, lr; ``error.<cid>`` if it failed
evaluate   ``config`` (cids); ``global``: ArrayRecord;            ``eval.<cid>``: MetricRecord (local, base,
           ``client.<cid>`` for client-specific methods (pFedPG)  novel …) of each hosted client
=========  =====================================================  ==============================================

Reproducibility: every random draw of fedlit is a function of ``(seed, round, client)`` and aggregation sorts
updates by client id, so a Flower run gives the numbers of ``fedlit fit`` with the same config and seed,
whatever order the replies arrive in (tested on CPU: results.json metrics and every TensorBoard scalar
bitwise equal, for PromptFL and FedPGP over a real SuperLink + 2 SuperNodes, and for FedPGP, FedTPG, FedOTP
and pFedPG through Flower's message objects).

Communication: per round, the ``client.<cid>`` records of the train messages and the ``update.<cid>`` records of
the replies carry exactly the tensor bytes fedlit counts as ``transfer/bytes_down`` / ``transfer/bytes_up``; Flower's own
count (:meth:`ArrayRecord.count_bytes`) adds the serialisation overhead of each array (its ``.npy`` header,
128 bytes for these tensors, and its key). Both are recorded per round in ``results.json`` (``flower.rounds``).
Evaluation traffic is recorded there too; fedlit's in-process accounting has none (it evaluates in place).

Not supported over Flower: resuming (the personal state lives on the SuperNodes; no checkpoint is written) and
``trainer.devices > 1`` per SuperNode.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from .. import experiment
from ..errors import FedlitError
from ..methods.base import Update
from ..rounds import ClientState
from .flower_records import (  # noqa: F401  (re-exported: the generated app, flower_deploy and tests use them)
    CONFIG_KEY,
    FLOWER_ARGS,
    FLWR_MIN,
    NODES_KEY,
    OPTIM_PREFIX,
    OUT_KEY,
    OVERWRITE_KEY,
    PERSONAL_PREFIX,
    TIMEOUT_KEY,
    ArrayRecord,
    ClientApp,
    ConfigRecord,
    Context,
    Grid,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    Runtime,
    ServerApp,
    Strategy,
    build_runtime,
    discover_partitions,
    flwr,
    from_record,
    hosted_clients,
    partition_of,
    restore_clients,
    tensor_bytes,
    to_record,
)


# ============================================================================================ the runtime
_RUNTIMES: dict[str, Runtime] = {}


def node_runtime(config_text: str) -> Runtime:
    """The SuperNode's runtime for a config, built once per process (backbone, data, features cached) and reused
    for every message of the run. (Flower's deployment runtime starts one ``flwr-clientapp`` process per
    message, so there the cache lives as long as that message; runtimes that keep the ClientApp process
    alive between messages reuse it.)"""
    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run at a time per process: drop the previous backbone
        _RUNTIMES[key] = build_runtime(config_text)
    return _RUNTIMES[key]


# ============================================================================================ ClientApp
client_app = ClientApp()


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode is (the server maps fedlit clients to nodes with it)."""
    pid, n = partition_of(context)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)


def _instruction(msg: Message, context: Context) -> tuple[Runtime, int, list[int]]:
    rt = node_runtime(str(context.run_config[CONFIG_KEY]))
    cfg = msg.content.config_records["config"]
    rnd, cids = int(cfg["fedlit-round"]), [int(c) for c in cfg["cids"]]
    pid, n = partition_of(context)
    foreign = [c for c in cids if c % n != pid]
    if foreign:
        raise FedlitError(f"SuperNode partition {pid}/{n} was sent clients {foreign} it does not host; every "
                          f"SuperNode of the run must be started with num-partitions={n}")
    return rt, rnd, cids


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Local update of each hosted client the server sampled; returns only the method's shared tensors."""
    rt, rnd, cids = _instruction(msg, context)
    received = {cid: from_record(msg.content.array_records[f"client.{cid}"]) for cid in cids}
    reply = RecordDict()
    for cid in cids:
        restore_clients(rt.states, context, [cid])
        update = rt.clients.update(cid, rnd, received[cid], rt.states.state_of(cid))
        metrics = {"num-examples": int(update.num_samples), "loss": float(update.loss), "steps": int(update.steps)}
        if update.lr is not None:  # the client's learning rate this round (per-client schedules)
            metrics["lr"] = float(update.lr)
        reply[f"metrics.{cid}"] = MetricRecord(metrics)
        if not update.ok:
            reply[f"error.{cid}"] = ConfigRecord({"error": str(update.error)})
            continue
        leaked = [k for k in update.shared if not rt.clients.rt.method.is_shared(k)]
        if leaked:  # cannot happen through ClientModule.export; a guard for custom methods
            raise FedlitError(f"client {cid} would send personal tensors {leaked}")
        reply[f"update.{cid}"] = to_record(update.shared)
        kept = ClientState().after(update)  # personal tensors, momentum / schedule step: on this SuperNode only
        for tensors, prefix in ((kept.personal, PERSONAL_PREFIX), (kept.optim, OPTIM_PREFIX)):
            if tensors:
                context.state[f"{prefix}{cid}"] = to_record(tensors)
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Local / Base / Novel of each hosted client's own model (global ∪ its personal state)."""
    rt, rnd, cids = _instruction(msg, context)
    arrays = msg.content.array_records
    rt.states.receive(from_record(arrays["global"]), {cid: from_record(arrays[f"client.{cid}"]) for cid in cids
                                                      if f"client.{cid}" in arrays})
    restore_clients(rt.states, context, cids)
    per_client = rt.evaluate_clients(cids)
    reply = RecordDict({f"eval.{cid}": MetricRecord({k: float(v) for k, v in res.items()})
                        for cid, res in sorted(per_client.items())})
    return Message(reply, reply_to=msg)


# ============================================================================================ the strategy
class FedlitStrategy(Strategy):
    """A Flower strategy whose every decision is the fedlit method's (sampling, what each client is sent,
    aggregation, evaluation summary); it only turns them into messages.

    Args:
        orchestrator: the server's orchestrator (holds the global state, the method, the logger).
        nodes: partition id → Flower node id (from :func:`discover_partitions`).
    """

    def __init__(self, orchestrator, nodes: dict[int, int]):
        if orchestrator.plan.optimizer_state == "chain":
            raise FedlitError(f"trainer.optimizer_state=chain ({orchestrator.method.name}'s official optimiser, handed "
                              f"from client to client) cannot cross SuperNodes; use --trainer.optimizer_state fresh")
        self.orch = orchestrator
        self.nodes = dict(sorted(nodes.items()))
        self.n = len(self.nodes)
        self.num_clients = len(orchestrator.fed.clients)
        self.metrics: dict = {}
        self.rounds: list[dict] = []  # traffic and what the server received, per round
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._expected: dict[int, list[int]] = {}
        self._eval_expected: dict[int, list[int]] = {}
        self._selected: list[int] = []

    # ------------------------------------------------------------------------------------ helpers
    def node_of(self, cid: int) -> int:
        return self.nodes[cid % self.n]

    def _config(self, config: ConfigRecord, server_round: int, cids: list[int]) -> ConfigRecord:
        return ConfigRecord({**dict(config.items()), "server-round": server_round, "fedlit-round": server_round - 1,
                             "cids": list(cids)})

    def summary(self) -> None:
        import logging

        m, log = self.orch.method, logging.getLogger("flwr")
        log.info("\t├──> fedlit method: %s (shared: %s)", m.name, sorted(self.orch.global_state) or "nothing")
        log.info("\t└──> %d clients on %d SuperNodes (client c on partition c mod %d)",
                 self.num_clients, self.n, self.n)

    # ------------------------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """The protocol's round: its clients, each sent its payload (``method.payload_for(cid, global)``)."""
        o, rnd = self.orch, server_round - 1
        self._sent, self._expected = {}, {}
        if not o.method.trainable:
            return []
        self._sent = o.protocol.configure(rnd)
        self._selected = list(self._sent)
        for cid in self._selected:
            self._expected.setdefault(self.node_of(cid), []).append(cid)
        messages, down, down_tensors = [], 0, 0
        for node, cids in self._expected.items():
            content = RecordDict({"config": self._config(config, server_round, cids)})
            for cid in cids:
                rec = to_record(self._sent[cid])
                content[f"client.{cid}"] = rec
                down, down_tensors = down + rec.count_bytes(), down_tensors + tensor_bytes(rec)
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self.rounds.append({"round": server_round, "clients": list(self._selected), "bytes_down": down,
                            "tensor_bytes_down": down_tensors})
        return messages

    def aggregate_train(self, server_round: int, replies):
        """Replies → fedlit ``Update``s → the protocol's failure policy and aggregation (the method's aggregate, in
        client order) → the orchestrator's round logging (train/…, transfer/…)."""
        o, rnd = self.orch, server_round - 1
        if not o.method.trainable:
            return None, None
        shared_keys = set(o.global_state)
        updates, seen, received = [], set(), {}
        up, up_tensors = 0, 0
        for msg in replies:
            node = msg.metadata.src_node_id
            expected = self._expected.get(node, [])
            if msg.has_error():
                for cid in expected:
                    seen.add(cid)
                    updates.append(o.protocol.failed(cid, f"SuperNode {node}: {msg.error.reason}"))
                continue
            content = msg.content
            for key, rec in content.array_records.items():
                received[key] = {k: list(a.shape) for k, a in rec.items()}
            for cid in expected:
                seen.add(cid)
                m = content.metric_records.get(f"metrics.{cid}")
                err = content.config_records.get(f"error.{cid}")
                rec = content.array_records.get(f"update.{cid}")
                if err is not None or rec is None or m is None:
                    reason = str(err["error"]) if err is not None else "the reply holds no update"
                    updates.append(o.protocol.failed(cid, reason, int(m["num-examples"]) if m is not None else None))
                    continue
                extra_keys = set(rec) - shared_keys
                if extra_keys:
                    raise FedlitError(f"client {cid} returned tensors the method does not share: {sorted(extra_keys)}")
                up, up_tensors = up + rec.count_bytes(), up_tensors + tensor_bytes(rec)
                lr = float(m["lr"]) if "lr" in m else None
                updates.append(Update(cid, from_record(rec), {}, int(m["num-examples"]), float(m["loss"]),
                                      int(m["steps"]), lr=lr))
        for node, cids in self._expected.items():
            updates += [o.protocol.failed(cid, f"no reply from SuperNode {node} within the round timeout")
                        for cid in cids if cid not in seen]
        o.protocol.check(updates, rnd)
        updates = o.protocol.aggregate(updates)
        failed = [u for u in updates if not u.ok]
        o.log_round(rnd, self._selected, updates)
        self.rounds[-1].update({"bytes_up": up, "tensor_bytes_up": up_tensors, "received": received,
                                "failed_clients": [u.cid for u in failed]})
        ok = [u for u in updates if u.ok]
        metrics = MetricRecord({"train-loss": float(np.mean([u.loss for u in ok])) if ok else float("nan"),
                                "clients": len(self._selected)})
        return to_record(o.global_state), metrics

    # ------------------------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Every SuperNode evaluates its clients (personal state never leaves it); evaluation rounds as in-process."""
        o = self.orch
        self._eval_expected = {}
        if not o.protocol.eval_due(server_round - 1):
            return []
        specific = o.method.client_specific
        messages, down = [], 0
        glob = to_record(o.global_state)
        for pid, node in self.nodes.items():
            cids = hosted_clients(pid, self.n, self.num_clients)
            if not cids:
                continue
            self._eval_expected[node] = cids
            content = RecordDict({"config": self._config(config, server_round, cids), "global": glob})
            down += glob.count_bytes()
            if specific:
                for cid in cids:
                    content[f"client.{cid}"] = rec = to_record(o.protocol.payload(cid))
                    down += rec.count_bytes()
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE,
                                    group_id=str(server_round)))
        self._eval_bytes_down = down
        return messages

    def aggregate_evaluate(self, server_round: int, replies):
        """The SuperNodes' per-client results → the server's ``Orchestrator.evaluate`` (summary, history,
        eval/… and eval_client/… scalars, the per-client figure) → the run's metrics."""
        if not self._eval_expected:
            return None
        o = self.orch
        per_client: dict[int, dict[str, float]] = {}
        up = 0
        for msg in replies:
            if msg.has_error():
                raise FedlitError(f"evaluation failed on SuperNode {msg.metadata.src_node_id}: {msg.error.reason}")
            for key, rec in msg.content.metric_records.items():
                if key.startswith("eval."):
                    per_client[int(key.split(".", 1)[1])] = {k: float(v) for k, v in rec.items()}
                    up += rec.count_bytes()
        missing = sorted(set(range(self.num_clients)) - set(per_client))
        if missing:
            nodes = sorted({self.node_of(c) for c in missing})
            raise FedlitError(f"no evaluation of clients {missing} (SuperNodes {nodes} did not answer within the "
                              f"round timeout)")
        self.metrics = o.record_evaluation(per_client, server_round - 1)
        entry = next((r for r in self.rounds if r["round"] == server_round), None)
        if entry is None:
            entry = {"round": server_round}
            self.rounds.append(entry)
        entry.update({"eval_bytes_down": self._eval_bytes_down, "eval_bytes_up": up})
        return MetricRecord({k: float(v) for k, v in self.metrics["mean"].items()})

    def report(self) -> dict:
        return {"flwr_version": flwr.__version__, "supernodes": self.n,
                "partitions": {str(p): hosted_clients(p, self.n, self.num_clients) for p in self.nodes},
                "node_ids": {str(p): n for p, n in self.nodes.items()}, "rounds": self.rounds}


# ============================================================================================ ServerApp
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config) -> dict:
    """The whole server side of a run: build, discover SuperNodes, the rounds (Flower's ``Strategy.start`` loop
    over :class:`FedlitStrategy`), then ``results.json`` — as ``fedlit fit`` writes it, plus a ``flower`` section."""
    t0 = time.time()
    rt = build_runtime(str(run_config[CONFIG_KEY]))  # the server's own (never the node cache: separate method)
    o, method, data = rt.orchestrator, rt.init.method, rt.init.data
    if o.stepper is not None:
        raise FedlitError(f"trainer.sync=step ({method.name}: gradients exchanged every batch step) is not available "
                          f"under Flower yet; run it with fedlit fit")
    if o.cfg.privacy is not None:  # the DP step counts stay in the clients' state on the SuperNodes
        raise FedlitError("trainer.privacy is not available under Flower yet (the server cannot report the clients' "
                          "ε); run it with fedlit fit")
    out = str(run_config.get(OUT_KEY, "")) or None
    run_dir, resume = experiment.run_dir(out, method.name, data.label, rt.cfg.seed,
                                         bool(run_config.get(OVERWRITE_KEY, False)))
    try:  # run_dir holds the directory's lock until the run ends
        return _serve(rt, o, method, data, run_dir, resume, grid, run_config, t0)
    finally:
        experiment.unlock_run_dir(run_dir)


def _serve(rt, o, method, data, run_dir, resume, grid, run_config, t0) -> dict:
    from ..atomic import write_json_atomic
    from ..orchestrator import format_final

    if resume is not None:
        raise FedlitError(f"{run_dir} holds an unfinished in-process run; Flower runs do not resume (the personal "
                          f"state lives on the SuperNodes): choose another --out_dir")
    rt.parser.save(rt.cfg, str(run_dir / "config.yaml"), skip_validation=True, overwrite=True)
    o.open_run(run_dir)
    timeout = float(run_config.get(TIMEOUT_KEY, 3600))
    nodes = discover_partitions(grid, int(run_config.get(NODES_KEY, 2)), timeout=min(timeout, 600.0))
    print(f"fedlit: {method.name} on {data.label} — {len(o.fed.clients)} clients on {len(nodes)} SuperNodes, "
          f"run dir {run_dir}", flush=True)
    strategy = FedlitStrategy(o, nodes)
    strategy.start(grid, initial_arrays=to_record(o.global_state),
                   num_rounds=o.protocol.rounds, timeout=timeout)
    results = o.finish(strategy.metrics, time.time() - t0)
    results["flower"] = strategy.report()
    write_json_atomic(run_dir / "results.json", results)
    print(format_final(results), flush=True)
    return results
