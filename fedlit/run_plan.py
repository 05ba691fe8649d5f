"""What a run's settings resolve to for its method, decided once when the run is built: the optimiser-state
policy (``chain`` refuses what cannot train a round's clients in sequence) and the settings the method runs without,
announced once (:func:`fallback_notes`; settings that would change the numbers are refused instead)."""

from __future__ import annotations

from .errors import FedlitError
from .methods.base import FedMethod
from .trainer import FedTrainer


def checked_policy(trainer: FedTrainer, method: FedMethod) -> str:
    """The run's optimiser-state policy; ``chain`` refuses what cannot train a round's clients in sequence."""
    policy = trainer.optimizer_state_of(method)
    if policy == "chain":
        fix = "; use --trainer.optimizer_state fresh (a new optimiser per client-round) to train clients in parallel"
        if trainer.devices * trainer.num_nodes > 1:
            raise FedlitError(f"trainer.optimizer_state=chain ({method.name}'s official optimiser, handed from client "
                              f"to client) trains a round's clients in sequence in one process, not on "
                              f"trainer.devices={trainer.devices} x num_nodes={trainer.num_nodes}{fix}")
        if trainer.lockstep != 1 and method.lockstep:
            raise FedlitError(f"trainer.optimizer_state=chain ({method.name}'s official optimiser, handed from client "
                              f"to client) trains a round's clients one after the other, not in lock-step "
                              f"(trainer.lockstep={trainer.lockstep}){fix}")
    return policy


#: methods with their own DP mechanism (method.init_args), which trainer.privacy does not stack on
OWN_DP = {"dpfpl": "DP-FPL", "fedsept": "FedSEPT"}


def check_privacy(trainer: FedTrainer, method: FedMethod) -> None:
    """Refuse, in one line each, the runs client-side DP-SGD (``trainer.privacy``, :mod:`fedlit.dp_sgd`) cannot be."""
    if trainer.privacy is None:
        return
    if method.name in OWN_DP:
        raise FedlitError(f"trainer.privacy: {OWN_DP[method.name]} has its own DP (method.init_args); drop "
                          "trainer.privacy or use another method")
    if not method.trainable:
        raise FedlitError(f"trainer.privacy: {method.name} does not train; drop trainer.privacy")
    if trainer.sync_of(method) == "step":
        raise FedlitError("trainer.privacy is DP-SGD on round-mode clients, not trainer.sync=step; use "
                          "trainer.sync=round (DP-FPL is the step-mode private method)")
    if trainer.lockstep != 1:
        raise FedlitError(f"trainer.privacy computes per-sample gradients one client at a time, not in lock-step "
                          f"(trainer.lockstep={trainer.lockstep}); use trainer.lockstep=1")
    if str(trainer.precision) in ("16-mixed", "16"):
        raise FedlitError(f"trainer.privacy writes the private gradient itself, which the fp16 loss scaler of "
                          f"trainer.precision={trainer.precision} would rescale; use bf16-mixed or 32-true")


def fallback_notes(method, trainer) -> list[str]:
    """Settings of ``trainer`` that ``method`` runs without (speed only, or nothing to act on): one line each,
    printed once when the run is built; the README lists them. Settings that would change numbers are refused."""
    notes = []
    if trainer.lockstep != 1 and not method.lockstep and method.trainable:
        notes.append(f"trainer.lockstep={trainer.lockstep}: {method.name} cannot train clients in lock-step; "
                     "they train one at a time (same numbers)")
    if trainer.feature_cache == "disk" and method.image_input == "images":
        notes.append(f"trainer.feature_cache=disk: {method.name} prompts the image tower, so no image feature is "
                     "cached (the tower runs on every batch)")
    if not method.trainable and (trainer.augment != "method" or trainer.augment_views):
        notes.append(f"trainer.augment: {method.name} does not train, so no training augmentation is used")
    if not method.trainable and trainer.sync == "step":
        notes.append(f"trainer.sync=step: {method.name} does not train; nothing is exchanged")
    return notes


__all__ = ["check_privacy", "checked_policy", "fallback_notes"]
