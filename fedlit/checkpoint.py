"""Checkpoints: one safetensors file per run, written atomically, loaded without executing code.

A checkpoint holds only trainable state — the global shared tensors, every client's personal tensors,
the method's server-side state, the server's bank of client uploads where the method keeps one (pFedMoAP) —
plus, as JSON in the file's metadata, the round counter, the metric history, the identity of the run (method,
backbone, dataset, seed, config digest) and a format version.
No backbone weights, no pickles. Randomness needs no saved RNG state: every draw of a run is a function
of ``(seed, round, client)``, so a resumed run continues exactly where an uninterrupted one would be.

Writes go to a temporary file in the same directory, are fsync'ed, then atomically renamed over the
previous checkpoint, so a crash (or a full disk) during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as _to_bytes

from .atomic import atomic_write
from .errors import FedlitError

FORMAT = 1
NAME = "checkpoint.safetensors"


@dataclass
class RunState:
    """Everything needed to continue a run after round ``round`` (1-based count of finished rounds)."""

    round: int
    global_state: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    server: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    identity: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    #: the server's bank of every client's last upload (methods with ``server_bank``: pFedMoAP)
    bank: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


def fault_point(name: str) -> None:
    """Crash-test hook: ``FEDLIT_FAULT=<name>`` kills the process with SIGKILL at that point (tests only)."""
    if os.environ.get("FEDLIT_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _flatten(state: RunState) -> dict[str, torch.Tensor]:
    flat = {f"global/{k}": v for k, v in state.global_state.items()}
    for cid, tensors in state.personal.items():
        flat.update({f"personal/{cid}/{k}": v for k, v in tensors.items()})
    flat.update({f"server/{k}": v for k, v in state.server.items()})
    for cid, tensors in state.bank.items():
        flat.update({f"bank/{cid}/{k}": v for k, v in tensors.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in flat.items()}


def save(path: str | Path, state: RunState) -> None:
    """Atomically write ``state`` to ``path``; on any failure the previous file is untouched."""
    path = Path(path)
    meta = {"format": FORMAT, "round": state.round, "history": state.history, "identity": state.identity,
            "extra": state.extra}
    data = _to_bytes(_flatten(state), metadata={"fedlit": json.dumps(meta, allow_nan=True)})
    try:
        atomic_write(path, lambda f: f.write(data), unique=False,
                     before_replace=lambda: fault_point(f"checkpoint-write:{state.round}"))
    except OSError as e:
        raise FedlitError(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint is "
                          f"intact — free disk space or choose another --out_dir, then rerun to resume") from None


def identity_of(path: str | Path) -> dict | None:
    """The identity a checkpoint was written with (its metadata only, no tensor read); ``None`` if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fedlit", "null") or "null")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError):
        return None
    return meta.get("identity") if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def load(path: str | Path) -> RunState:
    """Read a checkpoint written by :func:`save` (safetensors: no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FedlitError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fedlit", "null") or "null")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise FedlitError(f"checkpoint {path} is unreadable or truncated ({str(e).splitlines()[0][:80]}); "
                          f"delete it to start the run afresh") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FedlitError(f"{path} is not a fedlit checkpoint (format {FORMAT})")
    state = RunState(round=int(meta["round"]), global_state={}, personal={}, history=meta.get("history", []),
                     identity=meta.get("identity", {}), extra=meta.get("extra", {}))
    for k, v in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "global":
            state.global_state[rest] = v
        elif kind == "server":
            state.server[rest] = v
        elif kind in ("personal", "bank"):
            cid, _, key = rest.partition("/")
            getattr(state, kind).setdefault(int(cid), {})[key] = v
    return state


def config_diff(saved: Path, current: str, trainer_free: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between a run directory's ``config.yaml`` and the ``current`` config text
    (``out_dir``, ``overwrite`` and the ``trainer_free`` trainer keys, which do not change the numbers, left out)."""
    import yaml

    def flat(d, prefix=""):
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    try:
        old, new = flat(yaml.safe_load(Path(saved).read_text()) or {}), flat(yaml.safe_load(current) or {})
    except (OSError, yaml.YAMLError):
        return []
    skip = {"out_dir", "overwrite", "config"} | {f"trainer.{k}" for k in trainer_free}
    return [f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def check_identity(path: Path, saved: dict, current: dict, differs: list[str] | None = None) -> None:
    """Refuse to resume a checkpoint made by another method, backbone, dataset or config (``differs``: the
    config keys that differ, named in the message)."""
    for key in ("method", "backbone", "dataset", "seed", "config_digest"):
        if key in saved and key in current and saved[key] != current[key]:
            what = "config" if key == "config_digest" else key
            keys = f": {', '.join(differs[:6])}" if differs and key == "config_digest" else ""
            raise FedlitError(f"{path} was written with another {what} ({saved[key]} ≠ {current[key]}{keys}); "
                              f"use another --out_dir, or --overwrite true to discard it")
