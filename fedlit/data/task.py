"""A task: an ordered class list to classify among (a client's classes, all base classes, all novel classes …).

It belongs to the data layer (the federation builds the tasks); prompts, methods and evaluation read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..lazy import lazy

torch = lazy("torch", __name__, "torch")


@dataclass(frozen=True)
class Task:
    """An ordered class list to classify among; ``key`` identifies it in caches."""

    name: str
    classnames: tuple[str, ...]

    @property
    def key(self) -> tuple[str, ...]:
        return self.classnames

    def __len__(self) -> int:
        return len(self.classnames)


def client_task(task: Task, classes: Sequence[int] | None, y: torch.Tensor) -> tuple[Task, torch.Tensor]:
    """The client's own class list (``classes``: positions in ``task``) and its labels re-indexed into it
    (FedTPG's local task). ``(task, y)`` when ``classes`` is empty or ``None``."""
    if not classes:
        return task, y
    own = Task(f"{task.name}-client", tuple(task.classnames[i] for i in classes))
    lut = torch.full((len(task),), -1, dtype=torch.long, device=y.device)
    lut[torch.as_tensor(classes, dtype=torch.long, device=y.device)] = torch.arange(len(classes), device=y.device)
    y_own = lut[y]
    if bool((y_own < 0).any()):
        raise RuntimeError("a training label is not among the client's classes")
    return own, y_own


__all__ = ["Task", "client_task"]
