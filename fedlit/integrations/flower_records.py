"""Flower plumbing of the fedlit apps (:mod:`fedlit.integrations.flower`): the Flower import guard, the run-config
keys, tensors ⇄ ``ArrayRecord``, the runtime (everything ``fedlit fit`` builds, built the same way), which
clients a SuperNode hosts, and SuperNode discovery."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import experiment
from ..errors import FedlitError
from ..rounds import ClientState, RoundProtocol, shard

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
    orchestrator: object  #: the server side (round protocol, logging); a SuperNode uses the three below
    identity: dict = field(default_factory=dict)

    @property
    def clients(self):
        """The client engine (:class:`fedlit.engine.Clients`) a SuperNode trains its clients with."""
        return self.orchestrator.clients

    @property
    def states(self):
        """Where a SuperNode keeps its clients' state and what the server sent them (the node's round protocol)."""
        return self.orchestrator.protocol

    def evaluate_clients(self, cids: list[int]) -> dict[int, dict[str, float]]:
        """Local / Base / Novel of the hosted clients ``cids`` (each its own model)."""
        return self.orchestrator.evaluate_clients(cids)


def build_runtime(config_text: str) -> Runtime:
    """Parse a resolved fit config and build everything with ``fedlit fit``'s own builder
    (:func:`fedlit.experiment.build`), so the initial shared and personal tensors are the same."""
    parser = experiment.fit_parser()
    cfg, init = experiment.parse_fit(parser, lambda: parser.parse_string(config_text))
    trainer = init.trainer
    if trainer.devices * trainer.num_nodes > 1:
        raise FedlitError(f"trainer.devices={trainer.devices}, trainer.num_nodes={trainer.num_nodes}: a Flower run "
                          f"uses one process per SuperNode; scale out with more SuperNodes (--supernodes)")
    orch, identity = experiment.build(parser, cfg, init)
    return Runtime(parser, cfg, init, orch, identity)


def hosted_clients(partition: int, num_partitions: int, num_clients: int) -> list[int]:
    """fedlit clients SuperNode ``partition`` hosts: fedlit's round-robin shard (``partition, partition+n, …``)."""
    return shard(list(range(num_clients)), partition, num_partitions)


def partition_of(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise FedlitError("this SuperNode has no partition: start it with "
                          "--node-config \"partition-id=I num-partitions=N\" (I = 0 … N-1)")
    return int(nc["partition-id"]), int(nc["num-partitions"])


def restore_clients(protocol: RoundProtocol, context: Context, cids: list[int]) -> None:
    """Load each hosted client's :class:`ClientState` (personal tensors, optimiser state) from ``Context.state``."""
    for cid in cids:
        recs = [context.state.array_records.get(f"{prefix}{cid}") for prefix in (PERSONAL_PREFIX, OPTIM_PREFIX)]
        protocol.load(cid, ClientState(*(from_record(r) if r is not None else {} for r in recs)))


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
