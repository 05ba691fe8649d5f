"""Which settings of a run a report shows and groups by (``fedlit summarize``, ``fedlit plot``, TensorBoard's
HParams): everything that changes the numbers except the seed — unlike the resume digest
(:func:`fedlit.experiment.config_digest`) this includes ``trainer.rounds``, since a 5-round and a 20-round run are
different rows of a table — and never a setting that does not apply to the run (the Dirichlet ``beta`` of a
disjoint partition, ``classes_per_client`` outside ``contiguous``), so such a value can neither split a group
nor fill a column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields

from .trainer import FedTrainer, default_not_in_digest, result_fields

#: Keys that never change the numbers beyond kernel rounding (the resume digest drops them too), or name the run;
#: the ``trainer.`` ones are the :class:`~fedlit.trainer.FedTrainer` fields whose metadata says ``results: False``.
NOT_NUMBERS = frozenset({"seed", "out_dir", "overwrite", "config", "print_config", "data.root",
                         *(f"trainer.{f.name}" for f in fields(FedTrainer) if f.name not in result_fields(FedTrainer))})

#: Options added after runs existed (:data:`~fedlit.trainer.ADDED`): at their default they are left out, so a run
#: from before the option groups with one that sets it to the default.
#: ``ood:`` options (:class:`fedlit.ood.OODEval`) added after runs existed, with their defaults (a test checks them
#: against the signature)
OOD_ADDED = {"score_logits": "method"}
ADDED_AT_DEFAULT = {**{f"trainer.{k}": v for k, v in default_not_in_digest(FedTrainer).items()},
                    **{f"ood.{k}": v for k, v in OOD_ADDED.items()}}


def drop_added_defaults(config: dict, trainer_cls=FedTrainer) -> dict:
    """``config`` (nested sections) without the options added later that sit at their default (a copy)."""
    added = {**ADDED_AT_DEFAULT, **{f"trainer.{k}": v for k, v in default_not_in_digest(trainer_cls).items()}}
    out = dict(config)
    for dotted, default in added.items():
        section, key = dotted.split(".", 1)
        if isinstance(out.get(section), dict) and key in out[section] and out[section][key] == default:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts → ``{"a.b": value}``; lists and other values kept as they are."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def inapplicable(data: dict) -> set[str]:
    """The ``data`` settings (names without prefix) that a run with these data settings does not use."""
    partition = data.get("partition")
    unused = set()
    if partition not in ("dirichlet", "labeldir100"):
        unused.add("beta")
    if partition != "dirichlet":
        unused.add("min_samples")
    if partition != "contiguous":
        unused.add("classes_per_client")
    return unused


def report_config(config: dict) -> dict:
    """A run's resolved config (``config.yaml``) flattened to the keys that change its numbers and apply to it
    (method hyper-parameters as ``method.<name>``; lists as JSON text, so values compare and print)."""
    flat = flatten(config)
    unused = {f"data.{k}" for k in inapplicable(config.get("data") or {})}
    out = {}
    for k, v in flat.items():
        if k in NOT_NUMBERS or k in unused or (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k]):
            continue
        k = k.replace("method.init_args.", "method.")
        out[k] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def report_key(settings: dict) -> str:
    """A short digest of :func:`report_config`'s output: runs with the same key differ only in their seed."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def differing(configs: list[dict]) -> list[str]:
    """Keys whose value is not the same in every one of ``configs`` (missing counts as a value), sorted."""
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def short_value(v) -> str:
    """A setting's value for a table cell or a label."""
    if isinstance(v, float):
        return f"{v:g}"
    return "—" if v is None else str(v)


def hparams(method, trainer, meta: dict, seed: int, plan=None) -> dict[str, int | float | str | bool]:
    """Flat scalars/strings for TensorBoard's HParams view, only what tells runs apart: method, dataset,
    backbone, seed, the ``data:`` settings that apply to this run (``data/…``: no Dirichlet β under a disjoint
    partition, no ``classes_per_client`` outside ``contiguous`` — :func:`fedlit.settings.inapplicable`), the
    method's constructor arguments (``method_args/…``), the trainer settings that change the numbers
    (``trainer/…``: rounds, local epochs, batch, …; not devices, caches or the progress bar —
    :func:`fedlit.trainer.result_fields`), ``identity/…`` (config digest, backbone weights) and ``plan/…`` (what the
    run plan resolved those to: the optimiser policy, the augmentation, FedProx's μ in use …)."""
    import inspect

    def flat(prefix: str, obj) -> dict:
        if isinstance(obj, dict):
            return {k: v for key, val in obj.items() for k, v in flat(f"{prefix}/{key}" if prefix else str(key), val).items()}
        if isinstance(obj, bool | int | float | str):
            return {prefix: obj}
        return {prefix: "none" if obj is None else str(obj)}

    init = inspect.signature(type(method).__init__).parameters
    args = {p: getattr(method, p) for p in init if p != "self" and hasattr(method, p)}
    settings = {k: getattr(trainer, k) for k in result_fields(type(trainer))}
    meta = dict(meta)  # identity/… only where it adds something (config digest, backbone weights)
    meta["identity"] = {k: v for k, v in meta.get("identity", {}).items() if k not in ("method", "seed", "dataset")}
    if isinstance(meta.get("data"), dict):
        unused = inapplicable(meta["data"]) | {"root"}
        meta["data"] = {k: v for k, v in meta["data"].items() if k not in unused}
    resolved = {}  # what the run plan resolved (the μ FedProx's term used, the optimiser policy …)
    if plan is not None:
        resolved = {k: v for k, v in plan.as_dict().items() if k not in ("method", "lockstep", "cache_views")}
    return flat("", {"method": method.name, "seed": seed, **meta,
                     "method_args": args, "trainer": settings, **({"plan": resolved} if resolved else {})})


__all__ = ["NOT_NUMBERS", "differing", "flatten", "hparams", "inapplicable", "report_config", "report_key", "short_value"]
