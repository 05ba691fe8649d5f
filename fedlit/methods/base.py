"""The method abstraction: what a federated prompt-learning method has to say.

A method is one small subclass of :class:`FedMethod` that overrides a few hooks:

- :meth:`FedMethod.build` — its trainable prompt component (an ``nn.Module``; ``None`` for zero-shot).
- :meth:`FedMethod.is_shared` — which of its tensors go to the server; the others stay personal
  (on the client, never sent).
- :meth:`FedMethod.text_features` / :meth:`FedMethod.logits` — how it classifies (``prepare`` computes
  once per evaluation task what does not depend on the image, e.g. the class text features).
- :attr:`FedMethod.image_input` — what its forward takes: cached ``features`` (image tower untouched),
  cached patch ``tokens`` (FedOTP), or normalised ``images`` (methods that prompt the image tower).
- :meth:`FedMethod.loss` — its local training objective (default: cross-entropy).
- :meth:`FedMethod.aggregate` — how the server combines the shared tensors (default: FedAvg weighted by
  each client's number of training samples, as FedPGP/FedOTP do).
- :meth:`FedMethod.arrange_clients` — the federation it trains on (Central pools the clients' data).
- :meth:`FedMethod.client_state` — what the server sends a given client (default: the global shared
  state; pFedPG sends each client its own generated prompt). Server-side modules live on the method
  and are saved through :meth:`server_state_dict` / :meth:`load_server_state_dict`.

Its constructor arguments are its hyper-parameters; the CLI introspects them, so
``method.init_args.lr`` in a config or ``--method.lr 0.01`` on the command line set them.
The shape follows Flower's Strategy (configure → local update → aggregate), so an adapter stays thin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..aggregation import fedavg, uniform_mean
from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..prompts import Task


@dataclass
class Update:
    """What one client returns after its local steps (personal tensors never leave the client's process
    in a real deployment; in simulation they are kept by the orchestrator's per-client registry)."""

    cid: int
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    steps: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


class FedMethod:
    """Base class of every method.

    Args:
        lr: learning rate of the local optimiser (SGD).
        momentum: SGD momentum.
        weight_decay: SGD weight decay (Dassl's default 5e-4, kept by FedPGP/FedOTP).
        weighted: aggregate with weights ∝ client sample count (FedPGP/FedOTP) instead of uniformly (FedTPG).
    """

    #: short name used by ``--method NAME`` and in results.
    name: str = "base"
    #: False for methods with nothing to train (zero-shot CLIP).
    trainable: bool = True
    #: What ``logits``/``loss`` receive as ``x``: ``features`` (pooled image features; the image tower is
    #: untouched so they are cached exactly), ``tokens`` (all projected output tokens, cached likewise) or
    #: ``images`` (normalised pixels: the method changes the image tower, nothing is cached).
    image_input: str = "features"
    #: ``personalized`` (FedPGP): every client's model is evaluated on Local, Base and Novel;
    #: ``global`` (FedTPG): Base/Novel on the global model, Local on each client's own classes.
    eval_protocol: str = "personalized"
    #: False for methods whose classifier is not text (a linear head, pFedPG/VPT): no novel-class evaluation.
    text_classifier: bool = True
    #: FedProx proximal weight μ: ``μ/2 · Σ‖θ − θ_global‖²`` over the shared tensors is added to the local
    #: loss of any method where μ > 0 (``trainer.prox_mu`` sets it for any method; ``fedprox`` has it built in).
    prox_mu: float = 0.0
    #: Reproduce the official FedOTP-codebase FedProx bug: the term is computed on detached tensors
    #: (``state_dict()``), so it changes the logged loss but contributes no gradient (spec §4.6).
    prox_detached: bool = False
    #: Keep each client's optimiser state (momentum buffers) across the rounds it participates in, as the
    #: official FedTPG client does; the state is personal (never sent) and checkpointed with the client.
    persistent_optimizer: bool = False
    #: ``constant``, or ``cosine``: each client's lr follows ``lr · (1 + cos(π t / schedule_rounds)) / 2`` with
    #: ``t`` = its number of earlier participations (FedTPG's code base: CosineAnnealingLR stepped per participation).
    lr_schedule: str = "constant"
    schedule_rounds: int = 500

    def __init__(self, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.weighted = weighted

    # ----------------------------------------------------------------------------- the component
    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        """Called by the orchestrator once, before :meth:`build`, with the task clients train among and the
        number of clients (linear-head methods size their head from it; pFedPG its client descriptors)."""

    def arrange_clients(self, federation):
        """Called by the orchestrator once, before anything is built: the federation the run trains on (default:
        unchanged). Central pools every client's training data into client 0 here (evaluation sets untouched)."""
        return federation

    def build(self, clip: FrozenCLIP) -> nn.Module | None:
        """The trainable prompt component, built once per process and reused for every client."""
        return None

    def is_shared(self, key: str) -> bool:
        """Whether the tensor ``key`` of the component's state dict is sent to the server."""
        return True

    # ----------------------------------------------------------------------------- classification
    def prepare(self, prompt: nn.Module | None, clip: FrozenCLIP, task: Task):
        """What evaluation can compute once per task before the image batches (default: text features);
        passed to :meth:`logits` as ``prepared``. Return ``None`` when logits need the image (CoCoOp)."""
        return self.text_features(prompt, clip, task)

    def text_features(self, prompt: nn.Module | None, clip: FrozenCLIP, task: Task) -> torch.Tensor:
        """L2-normalised class embeddings ``[C, D]`` for ``task``."""
        raise NotImplementedError(f"abstract hook: {type(self).__name__} must implement text_features() or logits()")

    def logits(self, prompt: nn.Module | None, clip: FrozenCLIP, x: torch.Tensor, task: Task,
               prepared=None) -> torch.Tensor:
        """Logits ``[B, C]``; the default is CLIP's scaled cosine between image features and
        ``prepared`` (or freshly computed) text features."""
        text_features = prepared if prepared is not None else self.text_features(prompt, clip, task)
        image_features = self.image_features(prompt, clip, x)
        img = image_features / image_features.norm(dim=-1, keepdim=True)
        return clip.logit_scale * img @ text_features.to(img.dtype).t()

    def image_features(self, prompt: nn.Module | None, clip: FrozenCLIP, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features from whatever :attr:`image_input` delivers (methods that prompt the image
        tower override this to pass their visual prompts)."""
        if self.image_input == "images":
            return clip.encode_image(x)
        if self.image_input == "tokens":
            return x[:, 0]
        return x

    def loss(self, module, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
        """Local training objective; ``module`` is the :class:`~fedlit.client.ClientModule`."""
        return F.cross_entropy(module(x, task).float(), y)

    # ----------------------------------------------------------------------------- local optimisation
    def configure_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_at(self, participations: int) -> float:
        """Learning rate of a client in its ``participations``-th participation (0-based), see ``lr_schedule``."""
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1.0 + math.cos(math.pi * participations / self.schedule_rounds))
        return self.lr

    def set_client_schedule(self, lr_schedule: str, schedule_rounds: int, persistent_optimizer: bool) -> None:
        """Validate and set the FedTPG-code-base client options (shared by FedTPG, FedVLP and FedKgCoOp)."""
        if lr_schedule not in ("cosine", "constant"):
            raise FedlitError(f"method.init_args.lr_schedule='{lr_schedule}': use 'cosine' or 'constant'")
        if schedule_rounds < 1:
            raise FedlitError(f"method.init_args.schedule_rounds={schedule_rounds}: must be >= 1")
        self.lr_schedule, self.schedule_rounds = lr_schedule, schedule_rounds
        self.persistent_optimizer = persistent_optimizer

    # ----------------------------------------------------------------------------- server side
    def client_state(self, cid: int, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared tensors the server sends to client ``cid`` this round."""
        return global_state

    def server_state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side trainable state beyond the shared tensors (pFedPG's generator), for checkpoints."""
        return {}

    def load_server_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no server-side state")

    def aggregate(self, updates: Sequence[Update], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New global shared state from the successful updates of a round."""
        states = [u.shared for u in updates]
        if not states or not states[0]:
            return global_state
        return fedavg(states, [u.num_samples for u in updates]) if self.weighted else uniform_mean(states)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
