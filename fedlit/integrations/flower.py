"""Run a fedlit method as a real Flower federation (``pip install 'fedlit[flower]'``, Flower >= 1.21).

The fedlit method stays the single source of truth; Flower only carries the messages. The same
``server_app`` / ``client_app`` run in Flower's deployment runtime (a SuperLink and SuperNodes, on separate
machines) and in anything else that drives a Flower ``ServerApp``/``ClientApp``.

Who runs what:

- **ServerApp** (started by the SuperLink, on the server machine): builds the same
  :class:`~fedlit.federation.Orchestrator` as ``fedlit fit`` from the same config (same seed, so the same
  initial tensors), samples each round's clients with fedlit's :func:`~fedlit.federation.sample_clients`, asks
  the method what each client is sent (:meth:`~fedlit.methods.base.FedMethod.client_state`), aggregates the
  replies with the method (:meth:`Orchestrator.apply` → :meth:`FedMethod.aggregate`, updates sorted by client id
  exactly as in-process) and writes ``config.yaml``, ``results.json`` and the TensorBoard scalars of an
  in-process run (through the orchestrator's own logging and :meth:`Orchestrator.evaluate`).
- **ClientApp** (started by each SuperNode): the SuperNode started with ``--node-config "partition-id=i
  num-partitions=n"`` hosts fedlit clients ``i, i+n, i+2n, …`` (fedlit's own round-robin
  :func:`~fedlit.federation.shard`, the split ``--trainer.devices n`` uses). It builds the frozen backbone, the
  data and the method's component once per process (cached, keyed by the run's config; Flower's deployment
  runtime starts one ClientApp process per message, runtimes that keep it alive reuse the cache) and runs
  :meth:`Orchestrator.safe_update` / the orchestrator's evaluator for its clients. Personal tensors (FedPGP's
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
the replies carry exactly the tensor bytes fedlit counts as ``comm/bytes_down`` / ``comm/bytes_up``; Flower's own
count (:meth:`ArrayRecord.count_bytes`) adds the serialisation overhead of each array (its ``.npy`` header,
128 bytes for these tensors, and its key). Both are recorded per round in ``results.json`` (``flower.rounds``).
Evaluation traffic is recorded there too; fedlit's in-process accounting has none (it evaluates in place).

Not supported over Flower: resuming (the personal state lives on the SuperNodes; no checkpoint is written) and
``trainer.devices > 1`` per SuperNode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import FedlitError

try:
    import flwr
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise FedlitError("Flower is not installed (or older than 1.21); install the extra: "
                      "pip install 'fedlit[flower]'") from e

FLWR_MIN = "1.21"
#: run_config keys of the generated Flower app
CONFIG_KEY, OUT_KEY, OVERWRITE_KEY, NODES_KEY, TIMEOUT_KEY = (
    "fedlit-config", "out-dir", "overwrite", "supernodes", "round-timeout")
PERSONAL_PREFIX = "fedlit.personal."  # Context.state record of a client's personal tensors
OPTIM_PREFIX = "fedlit.optim."  # … and of its optimiser state / schedule step (FedTPG's code base), also never sent
#: keys of ``fedlit flower`` that are not part of the fit config
FLOWER_ARGS = ("supernodes", "app_dir", "superlink", "round_timeout", "local", "local_timeout")


# ============================================================================================ tensors ⇄ records
def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of CPU copies of ``tensors`` (numpy serialisation, dtype and shape kept)."""
    rec = ArrayRecord()
    for k, v in tensors.items():
        if v.dtype == torch.bfloat16:
            raise FedlitError(f"tensor '{k}' is bfloat16, which Flower's numpy arrays cannot carry; "
                              f"use --trainer.precision bf16-mixed or 32-true")
        rec[k] = Array(v.detach().cpu().numpy())
    return rec


def from_record(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in rec.items()}


def tensor_bytes(rec: ArrayRecord) -> int:
    """Bytes of the tensors a record carries (``numel · element size``: fedlit's accounting)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in rec.values())


# ============================================================================================ the runtime
@dataclass
class Runtime:
    """Everything ``fedlit fit`` builds before its round loop, built the same way (same RNG order)."""

    parser: object
    cfg: object
    init: object
    orchestrator: object
    identity: dict = field(default_factory=dict)


def _parse(parser, parse):
    from jsonargparse import ArgumentError

    from .. import cli

    try:
        cfg = parse()
    except ArgumentError as e:
        raise FedlitError(cli._friendly(parser, e)) from None
    try:
        init = parser.instantiate(cfg)
    except FedlitError:
        raise
    except Exception as e:  # jsonargparse wraps constructor errors
        cause = e.__cause__ or e.__context__
        if isinstance(cause, FedlitError):
            raise cause from None
        raise FedlitError(cli._friendly(parser, e)) from None
    return cfg, init


def build_runtime(config_text: str) -> Runtime:
    """Parse a resolved fit config and build backbone, federation, method and orchestrator in ``fedlit fit``'s
    order (seed, backbone, data, orchestrator), so the initial shared and personal tensors are the same."""
    import lightning as L

    from .. import cli
    from ..backbones import load_backbone
    from ..federation import Orchestrator

    parser = cli._fit_parser()
    cfg, init = _parse(parser, lambda: parser.parse_string(config_text))
    method, data, trainer = init.method, init.data, init.trainer
    if trainer.devices * trainer.num_nodes > 1:
        raise FedlitError(f"trainer.devices={trainer.devices}, trainer.num_nodes={trainer.num_nodes}: a Flower run "
                          f"uses one process per SuperNode; scale out with more SuperNodes (--supernodes)")
    fabric = trainer.make_fabric()
    fabric.launch()
    L.seed_everything(cfg.seed, verbose=False)
    clip = load_backbone(init.backbone.name, init.backbone.pretrained, device=fabric.device)
    federation = data.setup(cfg.seed)
    identity = {"method": method.name, "backbone": f"{init.backbone.name}:{init.backbone.pretrained}",
                "dataset": data.dataset, "seed": cfg.seed, "config_digest": cli._config_digest(parser, cfg)}
    meta = {"dataset": data.dataset, "backbone": init.backbone.name, "identity": identity}
    orch = Orchestrator(fabric, clip, federation, method, trainer, cfg.seed, meta)
    return Runtime(parser, cfg, init, orch, identity)


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


def hosted_clients(partition: int, num_partitions: int, num_clients: int) -> list[int]:
    """fedlit clients SuperNode ``partition`` hosts: fedlit's round-robin shard (``partition, partition+n, …``)."""
    from ..federation import shard

    return shard(list(range(num_clients)), partition, num_partitions)


def _partition(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise FedlitError("this SuperNode has no partition: start it with "
                          "--node-config \"partition-id=I num-partitions=N\" (I = 0 … N-1)")
    return int(nc["partition-id"]), int(nc["num-partitions"])


def _serve_received(method, received: dict[int, dict[str, torch.Tensor]]) -> None:
    """On a SuperNode, what the server sent client ``cid`` *is* its state: the method's server-side hook
    (pFedPG's generator) must not run here, so ``client_state`` returns the received tensors."""

    def client_state(cid: int, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return received.get(cid, global_state)

    method.client_state = client_state


def _load_state(context: Context, prefix: str, cids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for cid in cids:
        rec = context.state.array_records.get(f"{prefix}{cid}")
        if rec is not None:
            out[cid] = from_record(rec)
    return out


def _restore_clients(orch, context: Context, cids: list[int]) -> None:
    """Load the per-client state the orchestrator keeps between rounds — personal tensors and, where the
    orchestrator has it, the client's optimiser state — from this SuperNode's ``Context.state``."""
    orch.personal = _load_state(context, PERSONAL_PREFIX, cids)
    if hasattr(orch, "client_optim"):
        orch.client_optim = _load_state(context, OPTIM_PREFIX, cids)


# ============================================================================================ ClientApp
client_app = ClientApp()


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    """Which partition this SuperNode is (the server maps fedlit clients to nodes with it)."""
    pid, n = _partition(context)
    return Message(RecordDict({"node": ConfigRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)


def _instruction(msg: Message, context: Context) -> tuple[Runtime, int, list[int]]:
    rt = node_runtime(str(context.run_config[CONFIG_KEY]))
    cfg = msg.content.config_records["config"]
    rnd, cids = int(cfg["fedlit-round"]), [int(c) for c in cfg["cids"]]
    pid, n = _partition(context)
    foreign = [c for c in cids if c % n != pid]
    if foreign:
        raise FedlitError(f"SuperNode partition {pid}/{n} was sent clients {foreign} it does not host; every "
                          f"SuperNode of the run must be started with num-partitions={n}")
    return rt, rnd, cids


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Local update of each hosted client the server sampled; returns only the method's shared tensors."""
    rt, rnd, cids = _instruction(msg, context)
    orch = rt.orchestrator
    received = {cid: from_record(msg.content.array_records[f"client.{cid}"]) for cid in cids}
    _serve_received(orch.method, received)
    reply = RecordDict()
    for cid in cids:
        orch.global_state = received[cid]
        _restore_clients(orch, context, [cid])
        update = orch.safe_update(cid, rnd)
        metrics = {"num-examples": int(update.num_samples), "loss": float(update.loss), "steps": int(update.steps)}
        if "lr" in update.extra:  # the client's learning rate this round (per-client schedules)
            metrics["lr"] = float(update.extra["lr"])
        reply[f"metrics.{cid}"] = MetricRecord(metrics)
        if not update.ok:
            reply[f"error.{cid}"] = ConfigRecord({"error": str(update.error)})
            continue
        leaked = [k for k in update.shared if not orch.method.is_shared(k)]
        if leaked:  # cannot happen through ClientModule.export; a guard for custom methods
            raise FedlitError(f"client {cid} would send personal tensors {leaked}")
        reply[f"update.{cid}"] = to_record(update.shared)
        if update.personal:  # kept on this SuperNode only
            context.state[f"{PERSONAL_PREFIX}{cid}"] = to_record(update.personal)
        if update.extra.get("optim"):  # momentum buffers / schedule step: kept on this SuperNode only
            context.state[f"{OPTIM_PREFIX}{cid}"] = to_record(update.extra["optim"])
    return Message(reply, reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Local / Base / Novel of each hosted client's own model (global ∪ its personal state)."""
    rt, rnd, cids = _instruction(msg, context)
    orch = rt.orchestrator
    arrays = msg.content.array_records
    orch.global_state = from_record(arrays["global"])
    _serve_received(orch.method, {cid: from_record(arrays[f"client.{cid}"]) for cid in cids
                                  if f"client.{cid}" in arrays})
    _restore_clients(orch, context, cids)
    per_client = _evaluate_clients(orch, cids)
    reply = RecordDict({f"eval.{cid}": MetricRecord({k: float(v) for k, v in res.items()})
                        for cid, res in sorted(per_client.items())})
    return Message(reply, reply_to=msg)


def _evaluate_clients(orch, cids: list[int]) -> dict[int, dict[str, float]]:
    """The orchestrator's per-client evaluation, restricted to ``cids`` (the protocol dispatch of
    :meth:`Orchestrator.evaluate`, without its logging; ``hm`` is added by the server's ``evaluate``)."""
    if orch.method.eval_protocol == "global":
        return orch.evaluator.global_(cids)
    return orch.evaluator.personalized(cids, lambda cid: cid in orch.personal)


class _RemoteResults:
    """Stands in for the server's evaluator: the per-client results were computed on the SuperNodes, and the
    server's :meth:`Orchestrator.evaluate` summarises and logs them exactly as in-process."""

    def __init__(self, results: dict[int, dict[str, float]]):
        self.results = results

    def personalized(self, cids, has_personal=None):
        return {c: dict(self.results[c]) for c in cids}

    def global_(self, cids):
        return {c: dict(self.results[c]) for c in cids}


# ============================================================================================ the strategy
class FedlitStrategy(Strategy):
    """A Flower strategy whose every decision is the fedlit method's (sampling, what each client is sent,
    aggregation, evaluation summary); it only turns them into messages.

    Args:
        orchestrator: the server's orchestrator (holds the global state, the method, the logger).
        nodes: partition id → Flower node id (from :func:`discover_partitions`).
    """

    def __init__(self, orchestrator, nodes: dict[int, int]):
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

    def _client_specific(self) -> bool:
        from ..methods.base import FedMethod

        return type(self.orch.method).client_state is not FedMethod.client_state

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
        """The method's round: fedlit's client sampling; client cid is sent ``method.client_state(cid, global)``."""
        from ..federation import sample_clients

        o, rnd = self.orch, server_round - 1
        self._sent, self._expected = {}, {}
        if not o.method.trainable:
            return []
        self._selected = sample_clients(o.seed, rnd, self.num_clients, o.cfg.participation, o.cfg.first_round_all)
        for cid in self._selected:
            self._sent[cid] = o.method.client_state(cid, o.global_state)
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
        """Replies → fedlit ``Update``s (sorted by client) → ``Orchestrator.apply`` (the method's aggregate) and
        the orchestrator's round logging (train/…, comm/…)."""
        from ..methods.base import Update

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
                    updates.append(Update(cid, {}, {}, o.fed.clients[cid].num_samples, float("nan"),
                                          error=f"SuperNode {node}: {msg.error.reason}"))
                continue
            content = msg.content
            for key, rec in content.array_records.items():
                received[key] = {k: list(a.shape) for k, a in rec.items()}
            for cid in expected:
                seen.add(cid)
                m = content.metric_records.get(f"metrics.{cid}")
                err = content.config_records.get(f"error.{cid}")
                rec = content.array_records.get(f"update.{cid}")
                n = int(m["num-examples"]) if m is not None else o.fed.clients[cid].num_samples
                if err is not None or rec is None or m is None:
                    reason = str(err["error"]) if err is not None else "the reply holds no update"
                    updates.append(Update(cid, {}, {}, n, float("nan"), error=reason))
                    continue
                extra_keys = set(rec) - shared_keys
                if extra_keys:
                    raise FedlitError(f"client {cid} returned tensors the method does not share: {sorted(extra_keys)}")
                up, up_tensors = up + rec.count_bytes(), up_tensors + tensor_bytes(rec)
                sent = self._sent[cid]
                extra = {"sent": sent} if sent is not o.global_state else {}
                if "lr" in m:
                    extra["lr"] = float(m["lr"])
                updates.append(Update(cid, from_record(rec), {}, n, float(m["loss"]), int(m["steps"]), extra=extra))
        for node, cids in self._expected.items():
            for cid in cids:
                if cid not in seen:
                    updates.append(Update(cid, {}, {}, o.fed.clients[cid].num_samples, float("nan"),
                                          error=f"no reply from SuperNode {node} within the round timeout"))
        updates.sort(key=lambda u: u.cid)
        failed = [u for u in updates if not u.ok]
        if failed and o.cfg.on_client_failure == "stop":
            u = failed[0]
            raise FedlitError(f"client {u.cid} failed in round {server_round}: {u.error} "
                              f"(trainer.on_client_failure=skip leaves such clients out instead)")
        o.apply(updates)
        o._log_round(rnd, self._selected, updates)
        self.rounds[-1].update({"bytes_up": up, "tensor_bytes_up": up_tensors, "received": received,
                                "failed_clients": [u.cid for u in failed]})
        ok = [u for u in updates if u.ok]
        metrics = MetricRecord({"train-loss": float(np.mean([u.loss for u in ok])) if ok else float("nan"),
                                "clients": len(self._selected)})
        return to_record(o.global_state), metrics

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_due(self, rnd: int) -> bool:
        c, m = self.orch.cfg, self.orch.method
        return (rnd + 1) % c.eval_every == 0 or rnd == c.rounds - 1 or not m.trainable

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Every SuperNode evaluates its clients (personal state never leaves it); evaluation rounds as in-process."""
        o = self.orch
        self._eval_expected = {}
        if not self._eval_due(server_round - 1):
            return []
        specific = self._client_specific()
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
                    content[f"client.{cid}"] = rec = to_record(o.method.client_state(cid, o.global_state))
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
        own = o.evaluator
        o.evaluator = _RemoteResults(per_client)
        try:
            self.metrics = o.evaluate(server_round - 1)
        finally:
            o.evaluator = own
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


def discover_partitions(grid: Grid, supernodes: int, timeout: float = 300.0) -> dict[int, int]:
    """Wait for ``supernodes`` SuperNodes, ask each its partition id; returns partition id → node id."""
    deadline = time.time() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= supernodes:
            break
        if time.time() > deadline:
            raise FedlitError(f"only {len(ids)} of {supernodes} SuperNodes connected within {timeout:.0f} s; start "
                              f"them with flower-supernode … --node-config \"partition-id=I num-partitions="
                              f"{supernodes}\"")
        time.sleep(1.0)
    messages = [Message(content=RecordDict(), dst_node_id=i, message_type=MessageType.QUERY) for i in ids]
    replies = list(grid.send_and_receive(messages, timeout=max(deadline - time.time(), 60.0)))
    nodes: dict[int, int] = {}
    for msg in replies:
        if msg.has_error():
            raise FedlitError(f"SuperNode {msg.metadata.src_node_id} did not report its partition: {msg.error.reason}")
        rec = msg.content.config_records["node"]
        pid, n = int(rec["partition-id"]), int(rec["num-partitions"])
        if n != supernodes:
            raise FedlitError(f"SuperNode {msg.metadata.src_node_id} was started with num-partitions={n}, but the "
                              f"run expects {supernodes} SuperNodes (fedlit flower --supernodes {supernodes})")
        if pid in nodes:
            raise FedlitError(f"two SuperNodes report partition-id={pid}; give each a distinct id 0 … {n - 1}")
        nodes[pid] = msg.metadata.src_node_id
    if sorted(nodes) != list(range(supernodes)):
        raise FedlitError(f"SuperNodes report partitions {sorted(nodes)}; expected 0 … {supernodes - 1}")
    return nodes


# ============================================================================================ ServerApp
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config) -> dict:
    """The whole server side of a run: build, discover SuperNodes, the rounds (Flower's ``Strategy.start`` loop
    over :class:`FedlitStrategy`), then ``results.json`` — as ``fedlit fit`` writes it, plus a ``flower`` section."""
    from lightning.fabric.loggers import TensorBoardLogger

    from .. import cli
    from ..federation import format_final, write_json_atomic

    t0 = time.time()
    rt = build_runtime(str(run_config[CONFIG_KEY]))  # the server's own (never the node cache: separate method)
    o, method, data = rt.orchestrator, rt.init.method, rt.init.data
    out = str(run_config.get(OUT_KEY, "")) or None
    run_dir, resume = cli._run_dir(out, method.name, data.dataset, rt.cfg.seed,
                                   bool(run_config.get(OVERWRITE_KEY, False)))
    if resume is not None:
        raise FedlitError(f"{run_dir} holds an unfinished in-process run; Flower runs do not resume (the personal "
                          f"state lives on the SuperNodes): choose another --out_dir")
    rt.parser.save(rt.cfg, str(run_dir / "config.yaml"), skip_validation=True, overwrite=True)
    o.run_dir = run_dir
    o.logger = TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    timeout = float(run_config.get(TIMEOUT_KEY, 3600))
    nodes = discover_partitions(grid, int(run_config.get(NODES_KEY, 2)), timeout=min(timeout, 600.0))
    print(f"fedlit: {method.name} on {data.dataset} — {len(o.fed.clients)} clients on {len(nodes)} SuperNodes, "
          f"run dir {run_dir}", flush=True)
    strategy = FedlitStrategy(o, nodes)
    strategy.start(grid, initial_arrays=to_record(o.global_state),
                   num_rounds=o.cfg.rounds if method.trainable else 1, timeout=timeout)
    results = o._finish(strategy.metrics, time.time() - t0)
    results["flower"] = strategy.report()
    write_json_atomic(run_dir / "results.json", results)
    print(format_final(results), flush=True)
    return results


# ============================================================================================ the app on disk
APP_MODULE = "fedlit_flower_app"


def config_text(parser, cfg) -> str:
    """The resolved fit config as YAML, without run-location keys (those travel separately)."""
    import yaml

    d = yaml.safe_load(parser.dump(cfg, skip_validation=True))
    for key in ("config", "out_dir", "overwrite", *FLOWER_ARGS):
        d.pop(key, None)
    return yaml.safe_dump(d, sort_keys=False)


def write_app(app_dir: str | Path, text: str, out_dir: str | Path, supernodes: int, overwrite: bool = False,
              round_timeout: float = 3600.0, name: str = "fedlit-run") -> Path:
    """A Flower app directory for ``flwr run``: ``pyproject.toml`` (the fedlit config in ``[tool.flwr.app.config]``)
    and a two-line module pointing at :data:`server_app` / :data:`client_app`. fedlit[flower] must be installed
    on every machine; Flower installs nothing (``dependencies = []``)."""
    import tomli_w

    from .. import __version__

    app = Path(app_dir)
    app.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": __version__, "description": "A fedlit federation as a Flower app "
                    "(generated by `fedlit flower`)", "license": "Apache-2.0", "dependencies": []},
        "tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                 "flwr": {"app": {"publisher": "fedlit",
                                  "components": {"serverapp": f"{APP_MODULE}:server_app",
                                                 "clientapp": f"{APP_MODULE}:client_app"},
                                  "config": {CONFIG_KEY: text, OUT_KEY: str(out_dir), OVERWRITE_KEY: bool(overwrite),
                                             NODES_KEY: int(supernodes), TIMEOUT_KEY: float(round_timeout)}}}},
    }
    (app / "pyproject.toml").write_text("# Generated by `fedlit flower`; the fedlit config is fedlit-config below.\n"
                                        + tomli_w.dumps(project, multiline_strings=True))
    (app / f"{APP_MODULE}.py").write_text(
        '"""Flower app of a fedlit run (generated by `fedlit flower`; the logic is fedlit.integrations.flower)."""\n'
        "from fedlit.integrations import flower as _flower\n\n"
        "server_app = _flower.server_app\n"
        "client_app = _flower.client_app\n")
    return app


def _http_cli() -> bool:
    """Whether the installed Flower has the HTTP deployment CLI (``flower-superlink --port``; ~1.2x and later)
    rather than the gRPC one (``--fleet-api-address``)."""
    import importlib.util
    from importlib.metadata import entry_points

    try:
        ep = next(e for e in entry_points(group="console_scripts") if e.name == "flower-superlink")
        spec = importlib.util.find_spec(ep.module)
        files = ([Path(spec.origin)] if not spec.submodule_search_locations
                 else list(Path(next(iter(spec.submodule_search_locations))).glob("*.py")))
        return any('"--port"' in f.read_text() for f in files)
    except Exception:
        return True


def deployment_commands(app_dir: str | Path, supernodes: int, superlink: str = "SERVER:9091",
                        connection: str = "fedlit") -> str:
    """The commands of a real multi-machine deployment for the installed Flower version."""
    host, _, port = superlink.rpartition(":")
    host, port = host or superlink, port or "9091"
    app_dir = Path(app_dir).resolve()
    lines = ["# fedlit on Flower: the same numbers as `fedlit fit` with this config and seed.",
             "# Every machine: the same Python environment with `pip install 'fedlit[flower]'` (and the dataset,",
             "# at data.root / $FEDLIT_DATA, on the SuperNodes). --insecure: a trusted network only; see Flower's",
             "# TLS and SuperNode-authentication guides for production.", ""]
    if _http_cli():
        lines += ["# 1. Server machine: the SuperLink (it starts the ServerApp, which writes the run directory)",
                  f"flower-superlink --insecure --host 0.0.0.0 --port {port} --disable-runtime-dependency-installation",
                  "", f"# 2. Client machines: one SuperNode each; partition i hosts fedlit clients i, i+{supernodes}, "
                  f"i+{2 * supernodes}, …",
                  "#    (several on one machine: give each a distinct --port for its local runtime API)"]
        lines += [f"flower-supernode --insecure --superlink {host}:{port} --port {9094 + i} "
                  f"--node-config \"partition-id={i} num-partitions={supernodes}\"" for i in range(supernodes)]
        lines += ["", "# 3. Anywhere with this app directory: a SuperLink connection in the Flower configuration "
                  "file, then the run", f"#    ${{FLWR_HOME:-~/.flwr}}/config.toml:",
                  f"#      [superlink.{connection}]", f"#      address = \"{host}:{port}\"", "#      insecure = true",
                  f"flwr run {app_dir} {connection} --stream"]
    else:
        lines += ["# 1. Server machine: the SuperLink (it starts the ServerApp, which writes the run directory)",
                  "flower-superlink --insecure --serverappio-api-address 0.0.0.0:9091 "
                  "--fleet-api-address 0.0.0.0:9092 --control-api-address 0.0.0.0:9093",
                  "", "# 2. Client machines: one SuperNode each; partition i hosts fedlit clients "
                  f"i, i+{supernodes}, …"]
        lines += [f"flower-supernode --insecure --superlink {host}:9092 --clientappio-api-address 0.0.0.0:{9094 + i} "
                  f"--node-config \"partition-id={i} num-partitions={supernodes}\"" for i in range(supernodes)]
        lines += ["", "# 3. Anywhere with this app directory: add to its pyproject.toml",
                  f"#      [tool.flwr.federations.{connection}]", f"#      address = \"{host}:9093\"",
                  "#      insecure = true", f"flwr run {app_dir} {connection} --stream"]
    return "\n".join(lines) + "\n"


# ============================================================================================ localhost deployment
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise FedlitError(f"{proc.args[0]} exited with status {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FedlitError(f"{proc.args[0]} did not open port {port} within {timeout:.0f} s; see {log}")


class LocalDeployment:
    """A real Flower deployment on localhost: a SuperLink and ``supernodes`` SuperNodes as separate processes
    (insecure mode, free ports, one ``FLWR_HOME`` each under ``workdir``), for trying a run and for tests.
    Use as a context manager; every process it started (and their children) is ended on exit."""

    CONNECTION = "fedlit-local"

    def __init__(self, workdir: str | Path, supernodes: int = 2, env: dict | None = None):
        if not _http_cli():
            raise FedlitError("the localhost deployment needs Flower's HTTP deployment CLI (flower-superlink --port); "
                              "with this Flower version start the printed commands by hand")
        self.workdir, self.n = Path(workdir), supernodes
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, **(env or {})}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"  # SuperExec spawns flwr-* from PATH
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.procs: list[subprocess.Popen] = []
        self.port = 0

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        home = self.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([str(self.bin / args[0]), *args[1:]], stdout=f, stderr=subprocess.STDOUT,
                                    env={**self.env, "FLWR_HOME": str(home)}, cwd=self.workdir,
                                    start_new_session=True)  # its own process group: ended with its children
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.port = _free_port()
            link = self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                             str(self.port), "--disable-runtime-dependency-installation"])
            _wait_port(self.port, link, self.workdir / "superlink.log", 120)
            for i in range(self.n):
                self._spawn(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink",
                                               f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port",
                                               str(_free_port()), "--node-config",
                                               f"partition-id={i} num-partitions={self.n}"])
            cli_home = self.workdir / "home-cli"
            cli_home.mkdir(parents=True, exist_ok=True)
            (cli_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
                f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        except BaseException:
            self.close()
            raise
        return self

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``flwr`` CLI against this SuperLink."""
        return subprocess.run([str(self.bin / "flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, "FLWR_HOME": str(self.workdir / "home-cli")}, cwd=self.workdir)

    def run(self, app_dir: str | Path, results: str | Path, timeout: float = 1800) -> dict:
        """``flwr run`` the app, wait until ``results`` (the run's results.json) exists or the run fails;
        returns the run's ``flwr ls`` entry (status, Flower's network-traffic counters)."""
        res = self.flwr("run", str(Path(app_dir).resolve()), self.CONNECTION, "--format", "json")
        try:
            run_id = json.loads(res.stdout[res.stdout.index("{"):])["run-id"]
        except (ValueError, KeyError, TypeError):
            raise FedlitError(f"flwr run failed: {(res.stdout + res.stderr)[-2000:]}") from None
        deadline, results, last_check = time.time() + timeout, Path(results), time.time()
        while True:
            if results.exists():  # written last by the ServerApp: wait for it to exit, for Flower's final counters
                info = self.status(run_id)
                for _ in range(30):
                    if str(info.get("status", "")).startswith("finished"):
                        break
                    time.sleep(2.0)
                    info = self.status(run_id)
                return info
            if time.time() - last_check > 20:
                info, last_check = self.status(run_id), time.time()
                status = str(info.get("status", ""))
                if status.startswith("finished") and not results.exists():
                    log = self.workdir / "serverapp.log"
                    log.write_text(self.flwr("log", str(run_id), self.CONNECTION, "--show").stdout)
                    raise FedlitError(f"Flower run {run_id} ended {status}: {info.get('status-details')} "
                                      f"(ServerApp log: {log})")
            if time.time() > deadline:
                raise FedlitError(f"Flower run {run_id} did not finish within {timeout:.0f} s; logs in {self.workdir}")
            time.sleep(1.0)

    def status(self, run_id) -> dict:
        res = self.flwr("ls", self.CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout[res.stdout.index("{"):]).get("runs", [])
            return runs[0] if runs else {}
        except ValueError:
            return {}

    def close(self) -> None:
        """End every process group this deployment started (SIGTERM, then SIGKILL after 10 s)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may outlive its leader (SuperExec, flwr-*app children)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        self.procs = []

    def __exit__(self, *exc) -> None:
        self.close()


# ============================================================================================ `fedlit flower`
def _default_out_dir(method: str, dataset: str, seed: int) -> Path:
    """``runs/<method>-<dataset>-seed<seed>[-N]`` (the name ``fedlit fit`` would pick), absolute."""
    base = Path("runs") / f"{method}-{dataset}-seed{seed}"
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path.resolve()


def main(argv: list[str]) -> int:
    """``fedlit flower --config CONFIG… [fit overrides] [--supernodes N] [--app_dir DIR] [--superlink HOST:PORT]
    [--local true]``: write the Flower app of a fedlit config and print the deployment commands."""
    from .. import cli
    from ..federation import format_final

    parser = cli._fit_parser()
    parser.prog = "fedlit flower"
    parser.description = ("Turn a fedlit config into a Flower app (SuperLink + SuperNodes + flwr run) that gives the "
                          "numbers of `fedlit fit` with the same config and seed.")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="Number of SuperNodes; partition i hosts fedlit clients i, i+N, i+2N, …")
    parser.add_argument("--app_dir", type=str | None, default=None,
                        help="Where to write the Flower app (default: <out_dir>-flower-app).")
    parser.add_argument("--superlink", type=str, default="SERVER:9091",
                        help="host:port of the SuperLink as the other machines reach it (for the printed commands).")
    parser.add_argument("--round_timeout", type=float, default=3600.0,
                        help="Seconds the server waits for a round's replies (missing ones count as failed clients).")
    parser.add_argument("--local", type=bool, default=False,
                        help="Also run it here: a SuperLink and --supernodes SuperNodes as local processes.")
    parser.add_argument("--local_timeout", type=float, default=3600.0, help="Time limit of a --local run (s).")
    cfg, init = _parse(parser, lambda: parser.parse_args(cli._rewrite_method_shortcut(argv)))
    if cfg.supernodes < 1:
        raise FedlitError(f"--supernodes {cfg.supernodes}: needs at least 1")
    if init.trainer.devices * init.trainer.num_nodes > 1:
        raise FedlitError("trainer.devices/num_nodes > 1: a Flower run uses one process per SuperNode; "
                          "use --supernodes instead")
    method, data = init.method, init.data
    out_dir = Path(cfg.out_dir).resolve() if cfg.out_dir else _default_out_dir(method.name, data.dataset, cfg.seed)
    if (out_dir / "results.json").exists() and not cfg.overwrite:
        raise FedlitError(f"{out_dir} already holds a finished run; choose another --out_dir or pass --overwrite true")
    app_dir = Path(cfg.app_dir) if cfg.app_dir else out_dir.with_name(out_dir.name + "-flower-app")
    if app_dir.resolve() == out_dir:
        raise FedlitError("--app_dir and --out_dir must differ (the run directory is written by the ServerApp)")
    clients = data.num_clients
    write_app(app_dir, config_text(parser, cfg), out_dir, cfg.supernodes, cfg.overwrite, cfg.round_timeout)
    commands = deployment_commands(app_dir, cfg.supernodes, cfg.superlink)
    (app_dir / "README.md").write_text(f"# fedlit run as a Flower app\n\n{method.name} on {data.dataset}, "
                                       f"{clients} clients on {cfg.supernodes} SuperNodes; results in {out_dir}.\n\n"
                                       f"```bash\n{commands}```\n")
    print(f"fedlit flower: {method.name} on {data.dataset} — {clients} clients on {cfg.supernodes} SuperNodes; "
          f"Flower app in {app_dir}; the ServerApp writes {out_dir}\n")
    print(commands, end="")
    if not cfg.local:
        return 0
    work = app_dir.with_name(app_dir.name + "-local")
    if work.exists():
        shutil.rmtree(work)
    print(f"\nrunning it on localhost (logs in {work}) …", flush=True)
    with LocalDeployment(work, cfg.supernodes) as dep:
        info = dep.run(app_dir, out_dir / "results.json", timeout=cfg.local_timeout)
    results = json.loads((out_dir / "results.json").read_text())
    traffic = info.get("network-traffic", {})
    print(format_final(results))
    if traffic:
        print(f"Flower network traffic of the run: {traffic.get('total-bytes')} bytes")
    return 0


__all__ = ["FedlitStrategy", "LocalDeployment", "build_runtime", "client_app", "config_text", "deployment_commands",
           "discover_partitions", "from_record", "hosted_clients", "main", "node_runtime", "run_server",
           "server_app", "tensor_bytes", "to_record", "write_app"]
