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
- :meth:`FedMethod.payload_for` — what the server sends a given client (default: the global shared
  state; pFedPG sends each client its own generated prompt). Server-side modules live on the method
  and are saved through :meth:`server_state_dict` / :meth:`load_server_state_dict`.
- :meth:`FedMethod.server_payload` / :meth:`FedMethod.receive_payload` — extra tensors the server builds for a client
  beside its shared state (pFedMoAP's expert prompts, chosen from the round protocol's bank of every client's last
  upload, kept when :attr:`FedMethod.server_bank` is set) and how the client takes them in.

Its constructor arguments are its hyper-parameters; the CLI introspects them, so
``method.init_args.lr`` in a config or ``--method.lr 0.01`` on the command line set them.
The shape follows Flower's Strategy (configure → local update → aggregate), so an adapter stays thin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import FrozenCLIP
from ..errors import FedlitError
from ..data.task import Task
from .roles import ClientPolicy, FedAvg, ServerAlgorithm, fold_legacy_flags, legacy_property


def fp32(t: torch.Tensor):
    """Autocast off on ``t``'s device: what runs inside computes in the dtype of its inputs (callers pass fp32).
    Every method computes its logits, losses and softmax this way, so ``bf16-mixed`` changes only the towers."""
    return torch.autocast(device_type=t.device.type, enabled=False)


@dataclass
class Update:
    """What one client returns after its local steps. Only ``shared`` (and the numbers) reach the server in a
    real deployment; ``personal`` and ``optim`` stay with the client (:class:`fedlit.rounds.ClientState`)."""

    cid: int
    shared: dict[str, torch.Tensor]
    personal: dict[str, torch.Tensor]
    num_samples: int
    loss: float
    steps: int = 0
    error: str | None = None
    #: the client's optimiser state / schedule step after this round (``None``: the method keeps none)
    optim: dict[str, torch.Tensor] | None = None
    #: the learning rate the client used this round (per-client schedules)
    lr: float | None = None
    #: what the server sent this client this round (filled in by the round protocol before ``aggregate``;
    #: pFedPG's server step needs it)
    sent: dict[str, torch.Tensor] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StepPlan:
    """What a step-synchronous (FedSGD) run will do, told to :meth:`FedMethod.plan_steps` before it starts
    (:mod:`fedlit.steps`): ``rounds`` × ``steps_per_round`` synchronous steps, each client's batches of
    ``batch_size`` drawn from its ``samples_per_client`` training samples, ``clients`` per step."""

    rounds: int
    steps_per_round: int
    batch_size: int
    clients: int
    samples_per_client: int
    configured_batch: int = 0  #: ``trainer.batch_size`` (``batch_size`` is min(it, samples_per_client)); 0: the same

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round

    @property
    def sample_rate(self) -> float:
        return min(self.batch_size / max(self.samples_per_client, 1), 1.0)


#: short name → method class: every subclass of :class:`FedMethod` that sets its own ``name``
METHODS: dict[str, type[FedMethod]] = {}


def local_image_input(local_features: str) -> str:
    """The cached input kind of a ``local_features`` setting: ``value`` → ``value_tokens``, ``output`` → ``tokens``."""
    kinds = {"value": "value_tokens", "output": "tokens"}
    if local_features not in kinds:
        raise FedlitError(f"method.init_args.local_features={local_features!r}: use one of value, output")
    return kinds[local_features]


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
    #: untouched so they are cached exactly), ``tokens`` (all projected output tokens, cached likewise),
    #: ``value_tokens`` (the pooled feature, then every patch through the last block's value path: LoCoOp) or
    #: ``images`` (normalised pixels: the method changes the image tower, nothing is cached).
    image_input: str = "features"
    #: ``personalized`` (FedPGP): every client's model is evaluated on Local, Base and Novel;
    #: ``global`` (FedTPG): Base/Novel on the global model, Local on each client's own classes.
    eval_protocol: str = "personalized"
    #: False for methods whose classifier is not text (a linear head, pFedPG/VPT): no novel-class evaluation.
    text_classifier: bool = True
    #: Which test sets give Base and Novel (:meth:`fedlit.data.federation.FederatedData.setup`): ``full_split`` (the
    #: whole base / novel test splits) or ``official_client0`` (every client is scored on client 0's test split and
    #: on client 0's share of the novel classes: FedDnC's released code). Recorded in the run plan.
    global_eval_set: str = "full_split"

    def encodes_any_label(self, classnames) -> bool:
        """Whether the method can build class text features for these names (the OOD protocol's NegLabel words);
        FedMVP needs attribute phrases for every class."""
        return self.text_classifier
    #: How its clients train (:class:`~fedlit.methods.roles.ClientPolicy`): the official loop's optimiser lifecycle
    #: (``chain`` for the Dassl code bases, ``per_client`` for FedTPG's), training order, last-batch rule,
    #: augmentation, restart rule, lr schedule, proximal term, round or step mode. ``trainer.*: method`` resolves to
    #: it (:mod:`fedlit.run_plan`); the legacy flags below read and write it.
    policy: ClientPolicy = ClientPolicy()
    official_optimizer_state = legacy_property("optimizer_state", "the official optimiser lifecycle (policy)")
    train_order = legacy_property("train_order", "the order a chained round trains its clients in (policy)")
    default_drop_last = legacy_property("drop_last", "``trainer.drop_last: method`` (policy)")
    default_augment = legacy_property("augment", "``trainer.augment: method`` (policy)")
    restart_personal = legacy_property("restart_personal", "local training from the initial personal tensors")
    lr_schedule = legacy_property("lr_schedule", "``constant`` or ``cosine`` over participations (policy)")
    schedule_rounds = legacy_property("schedule_rounds", "the cosine schedule's length (policy)")
    prox_mu = legacy_property("prox_mu", "FedProx's μ (policy; ``trainer.prox_mu`` overrides it)")
    prox_detached = legacy_property("prox_detached", "the official zero-gradient FedProx term (policy)")
    sync = legacy_property("sync", "``round`` or ``step`` under ``trainer.sync: method`` (policy)")

    @property
    def loop_defaults(self) -> dict:
        """The official step-mode loop policies (``trainer.step_start`` / ``optimizer_state`` / ``personal_grad``)."""
        return dict(self.policy.step_loop)

    @property
    def persistent_optimizer(self) -> bool:
        """Each client keeps its optimiser state across its participations (FedTPG's client): ``per_client``."""
        return self.policy.optimizer_state == "per_client"

    @persistent_optimizer.setter
    def persistent_optimizer(self, value: bool) -> None:
        if value:
            self.policy = self.policy.replace(optimizer_state="per_client")
        elif self.policy.optimizer_state == "per_client":
            self.policy = self.policy.replace(optimizer_state="fresh")

    @property
    def server(self) -> ServerAlgorithm:
        """How uploads combine (:class:`~fedlit.methods.roles.FedAvg`, weighted by sample count or uniform)."""
        return FedAvg(self.weighted)

    def __init_subclass__(cls, **kwargs):
        """A subclass that sets its own ``name`` is registered under it (:func:`fedlit.methods.method_class`)."""
        super().__init_subclass__(**kwargs)
        fold_legacy_flags(cls)  # ``official_optimizer_state = "chain"`` … on the class → its policy
        if "client_state" in cls.__dict__:  # the hook's old name (it collided with rounds.ClientState)
            cls.payload_for = cls.__dict__["client_state"]
        if "name" in cls.__dict__:
            other = METHODS.get(cls.name)
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise FedlitError(f"method name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}")
            METHODS[cls.name] = cls

    def __init__(self, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, weighted: bool = True):
        for key, value, low in (("lr", lr, "> 0"), ("momentum", momentum, ">= 0"), ("weight_decay", weight_decay, ">= 0")):
            if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
                raise FedlitError(f"method.init_args.{key}={value}: must be a finite number {low}")
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.weighted = weighted

    # ----------------------------------------------------------------------------- the component
    def setup_federation(self, train_task: Task, num_clients: int) -> None:
        """Called by the orchestrator once, before :meth:`build`, with the task clients train among and the
        number of clients (linear-head methods size their head from it; pFedPG its client descriptors)."""

    def plan_rounds(self, trainer, num_samples: Sequence[int]) -> None:
        """Called by the orchestrator once, before the first round, with the trainer settings and every client's
        number of training samples (FedSEPT calibrates each client's DP noise from them)."""

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
        with fp32(image_features):  # logits in fp32 whatever the autocast (bf16 logits flip close top-2 pairs)
            img = image_features.float()
            img = img / img.norm(dim=-1, keepdim=True)
            return clip.logit_scale * img @ text_features.float().t()

    def image_features(self, prompt: nn.Module | None, clip: FrozenCLIP, x: torch.Tensor) -> torch.Tensor:
        """Pooled image features from whatever :attr:`image_input` delivers (methods that prompt the image
        tower override this to pass their visual prompts)."""
        if self.image_input == "images":
            return clip.encode_image(x)
        if self.image_input in ("tokens", "value_tokens"):
            return x[:, 0]
        return x

    def loss(self, module, x: torch.Tensor, y: torch.Tensor, task: Task,
             classes: Sequence[int] | None = None) -> torch.Tensor:
        """Local training objective; ``module`` is the :class:`~fedlit.client.ClientModule`, ``task`` the class list
        the client trains among and ``classes`` the positions in it of the classes the client holds."""
        logits = module(x, task)
        with fp32(logits):
            return F.cross_entropy(logits.float(), y)

    # ----------------------------------------------------------------------------- local optimisation
    def configure_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_at(self, participations: int) -> float:
        """Learning rate of a client in its ``participations``-th participation (0-based), see ``lr_schedule``."""
        return self.policy.lr_at(self.lr, participations)

    def set_client_schedule(self, lr_schedule: str, schedule_rounds: int, persistent_optimizer: bool) -> None:
        """Validate and set the FedTPG-code-base client options (shared by FedTPG, FedVLP and FedKgCoOp)."""
        if lr_schedule not in ("cosine", "constant"):
            raise FedlitError(f"method.init_args.lr_schedule='{lr_schedule}': use 'cosine' or 'constant'")
        if schedule_rounds < 1:
            raise FedlitError(f"method.init_args.schedule_rounds={schedule_rounds}: must be >= 1")
        self.lr_schedule, self.schedule_rounds = lr_schedule, schedule_rounds
        self.persistent_optimizer = persistent_optimizer

    def optimizer_policy(self) -> str:
        """The official optimiser-state policy of this method as configured (``per_client`` where the method keeps
        a persistent optimiser per client)."""
        return self.policy.optimizer_state

    def augmentation(self, trainer) -> str:
        """The training augmentation a run of this method uses under ``trainer`` (``none`` / ``dassl`` /
        ``views-K`` for the legacy ``trainer.augment_views``)."""
        if not self.trainable:
            return "none"
        if trainer.augment_views > 0:
            return f"views-{trainer.augment_views}"
        return self.default_augment if trainer.augment == "method" else trainer.augment

    # ----------------------------------------------------------------------------- server side
    def payload_for(self, cid: int, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared tensors the server sends to client ``cid`` this round (its *payload*; what a client keeps
        between rounds is :class:`fedlit.rounds.ClientState`)."""
        return global_state

    @property
    def lockstep(self) -> bool:
        """Whether this method's clients can train in lock-step (``trainer.lockstep``, :mod:`fedlit.engine`):
        methods on cached image features/tokens, whose per-step cost is the text pass that lock-step shares. Methods
        that prompt the image tower (``image_input = "images"``: MaPLe, VPT, IVLP, FedVLP, pFedPG, pFedMMA) train one
        client at a time: the joint text pass would not save their image-tower passes on per-client prompts."""
        return self.trainable and self.image_input != "images"

    @property
    def client_specific(self) -> bool:
        """Whether clients are sent different tensors (the method overrides :meth:`payload_for`, pFedPG, or
        :meth:`server_payload`, pFedMoAP)."""
        return (type(self).payload_for is not FedMethod.payload_for
                or type(self).server_payload is not FedMethod.server_payload)

    #: Keep every client's last uploaded shared tensors on the server (:attr:`fedlit.rounds.RoundProtocol.bank`,
    #: checkpointed) and hand them to :meth:`server_payload` (pFedMoAP's expert prompts).
    server_bank: bool = False

    def server_payload(self, cid: int, global_state: dict[str, torch.Tensor], bank: dict[int, dict[str, torch.Tensor]],
                       seed: int = 0) -> dict[str, torch.Tensor]:
        """Tensors sent to client ``cid`` beside its shared state (default: none). Their keys must not be keys of
        the component; the client hands them to :meth:`receive_payload` instead of loading them. ``bank``: every
        client's last successful upload (only with :attr:`server_bank`; the round's uploads enter it after
        aggregation); ``seed``: the run's seed (server-side draws)."""
        return {}

    def receive_payload(self, prompt: nn.Module | None, extra: dict[str, torch.Tensor]) -> None:
        """Client side of :meth:`server_payload`: called on every load of a client model with the payload tensors
        that are not keys of the component (empty when the server sent none: reset what an earlier client left)."""
        if extra:
            raise RuntimeError(f"{type(self).__name__} was sent tensors {sorted(extra)} that its component lacks")

    def finish_local(self, prompt: nn.Module | None) -> None:
        """Called on the component right before its state is exported (after local training, and once at build)."""

    def before_optimizer_step(self, prompt: nn.Module | None) -> None:
        """Round mode: called after a local step's backward, before the optimiser step, with the gradients in the
        component's ``.grad`` (ProGrad projects them here). Default: nothing."""

    def end_local_epoch(self, prompt: nn.Module | None, epoch: int, epochs: int) -> None:
        """Round mode: called after the last optimiser step of local epoch ``epoch`` (0-based) of ``epochs``
        (PromptSRC's per-epoch Gaussian prompt aggregation). Default: nothing."""

    def server_state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side trainable state beyond the shared tensors (pFedPG's generator), for checkpoints."""
        return {}

    def load_server_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no server-side state")

    def aggregate(self, updates: Sequence[Update], global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New global shared state from the successful updates of a round."""
        return self.server.aggregate(updates, global_state)

    # ----------------------------------------------------------------------------- step-synchronous rounds
    def plan_steps(self, plan: StepPlan) -> None:
        """Step mode: told once, before the first step, what the run will do (DP-FPL calibrates its noise here)."""

    def prepare_step(self, prompt: nn.Module | None, gen: torch.Generator) -> None:
        """Step mode: called with the client's tensors loaded, before its forward (DP-FPL factorises its local
        prompt here, outside autograd); ``gen`` is this client-step's random stream."""

    #: Evaluation also reports ``neighbor``: the accuracy on the images of the client's home evaluation set that are
    #: not its own (the other clients' test images, classified among the same classes; DP-FPL's "neighbor").
    neighbor_accuracy: bool = False

    #: Step mode: :meth:`client_gradient` receives one gradient per sample (``[B, ...]``, each of a one-sample loss)
    #: instead of the batch's (DP-SGD's per-sample clipping; costs B backward passes).
    per_sample_gradients: bool = False
    #: The prompt reaches the loss only through the class text features (``prepare``): per-sample gradients then
    #: come from one text forward and one batched backward (:func:`fedlit.privacy.per_sample_gradients`; DP-FPL).
    per_sample_text_side: bool = False

    def client_gradient(self, prompt: nn.Module | None, grads: dict[str, torch.Tensor],
                        gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Step mode: the client's gradients of its trainable tensors after its batch → what it uses (the shared
        keys are sent to the server, the others stay). Default: unchanged. DP-FPL clips and adds local noise."""
        return grads

    def server_gradient(self, grads: Sequence[dict[str, torch.Tensor]], num_samples: Sequence[int],
                        gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Step mode: the shared gradient every client applies, from the clients' shared gradients (in client
        order). Default: their mean, weighted by sample count when ``weighted`` (FedSGD)."""
        return self.server.combine_gradients(grads, num_samples)

    def run_report(self) -> dict:
        """Extra entries for ``results.json`` (DP-FPL: ``privacy``); default none."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
