"""Data protocols as pure functions: base/novel split, K-shot sampling, client partitioners, histograms.

Nothing here touches global RNG state; every random choice takes an explicit seed. The algorithms follow
spec/methods.md §7 (CoOp base/new rule; FedPGP/FedOTP pathological disjoint classes; FedOTP ``noniid-labeldir``
Dirichlet label skew and two-level ``noniid-labeldir100``; FedTPG contiguous dealing; an iid split for several
clients per domain).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from fedlit.errors import FedlitError

__all__ = [
    "base_novel_classes",
    "relabel",
    "sample_kshot",
    "partition_disjoint",
    "partition_contiguous",
    "partition_dirichlet",
    "partition_dirichlet_train_test",
    "partition_labeldir100",
    "partition_iid",
    "class_histogram",
    "format_histogram",
]


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """CoOp base/new rule: of the sorted labels, the first ``ceil(n / 2)`` are base, the rest novel.

    Example: 47 classes → 24 base (0..23), 23 novel (24..46).
    """
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def relabel(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Map original labels of ``classes`` to ``0..len(classes)-1`` (position in ``classes``).

    Raises:
        FedlitError: If a label is not in ``classes``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.asarray(list(classes), dtype=np.int64)
    order = np.argsort(classes, kind="stable")
    pos = np.searchsorted(classes[order], labels)
    pos = np.minimum(pos, len(classes) - 1) if len(classes) else pos
    if len(classes) == 0 or not np.array_equal(classes[order][pos], labels):
        missing = sorted(set(labels.tolist()) - set(classes.tolist()))
        raise FedlitError(f"cannot relabel: labels {missing[:10]} are not among the {len(classes)} given classes")
    return order[pos].astype(np.int64)


def sample_kshot(labels: np.ndarray, classes: Sequence[int], shots: int, seed: int) -> np.ndarray:
    """Pick ``shots`` random indices per class (all of a class if it has fewer).

    Args:
        labels: Labels of the whole split [N].
        classes: Classes to sample from; the result is grouped in this order.
        shots: Images per class (``shots <= 0`` means all).
        seed: Seed of ``np.random.default_rng``.

    Returns:
        int64 indices into ``labels``: per class, in ``classes`` order, each group sorted ascending.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if 0 < shots < len(idx):
            idx = np.sort(rng.choice(idx, size=shots, replace=False))
        out.append(idx)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def partition_disjoint(classes: Sequence[int], num_clients: int, seed: int) -> list[list[int]]:
    """FedPGP/FedOTP pathological split: disjoint class sets per client (spec §7.2-2).

    ``cpu = int(round(C / K))`` (banker's rounding); the class list is shuffled with
    ``random.Random(seed).shuffle``; client ``i`` gets ``class_list[i*cpu:(i+1)*cpu]`` and the last client the
    remainder ``class_list[(K-1)*cpu:]``. The official code uses ``seed = 2023`` for every experiment.

    Raises:
        FedlitError: If some client would get no class.
    """
    class_list = list(classes)
    n, k = len(class_list), int(num_clients)
    if k < 1:
        raise FedlitError(f"num_clients must be >= 1; got {num_clients}")
    cpu = int(round(n / k))
    if cpu < 1 or (k - 1) * cpu >= n:
        feasible = [j for j in range(1, k) if int(round(n / j)) >= 1 and (j - 1) * int(round(n / j)) < n]
        hint = f"; use at most {max(feasible)} clients" if feasible else ""
        raise FedlitError(
            f"cannot split {n} classes disjointly over {k} clients: round({n}/{k}) = {cpu} classes per client "
            f"leaves the last client {max(n - (k - 1) * cpu, 0) if cpu else 0} classes{hint}"
        )
    random.Random(seed).shuffle(class_list)
    return [class_list[i * cpu : (i + 1) * cpu] for i in range(k - 1)] + [class_list[(k - 1) * cpu :]]


def partition_contiguous(classes: Sequence[int], classes_per_client: int) -> list[list[int]]:
    """FedTPG contiguous dealing (spec §7.2-1): ``max(1, np.around(C / k))`` clients of ``k`` consecutive classes.

    Client ``j`` gets ``classes[j*k:(j+1)*k]``, the last client the remainder (so it may hold more or fewer
    than ``k``). Example: 98 classes with ``k = 20`` → 5 clients, the last with 18.
    """
    class_list = list(classes)
    k = int(classes_per_client)
    if k < 1:
        raise FedlitError(f"classes_per_client must be >= 1; got {classes_per_client}")
    n_clients = max(1, int(np.around(len(class_list) / k)))
    return [class_list[j * k : (j + 1) * k] for j in range(n_clients - 1)] + [class_list[(n_clients - 1) * k :]]


def _dirichlet(
    labels: np.ndarray, num_clients: int, beta: float, seed: int, min_size: int, max_tries: int
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """Core of the Dirichlet partitioner; also returns the per-class split fractions that were used."""
    labels = np.asarray(labels)
    n, k = len(labels), int(num_clients)
    if k < 1 or beta <= 0:
        raise FedlitError(f"Dirichlet partition needs num_clients >= 1 and beta > 0; got {num_clients}, {beta}")
    if k * min_size > n:
        raise FedlitError(
            f"cannot give {k} clients >= {min_size} samples each from {n} samples; lower num_clients or min_size"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    cap = n / k  # clients holding >= N/K samples get no share of later classes
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        fractions: dict[int, np.ndarray] = {}
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(k, beta))
            p = p * (sizes < cap)
            p = p / p.sum()
            fractions[int(c)] = p
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
                sizes[j] += len(chunk)
        smallest = int(sizes.min())
        if smallest >= min_size:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts], fractions
    raise FedlitError(
        f"Dirichlet partition (beta={beta}) of {n} samples over {k} clients left a client with {smallest} < "
        f"{min_size} samples after {max_tries} tries; raise beta, or lower num_clients or min_size"
    )


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, beta: float, seed: int, min_size: int = 10, max_tries: int = 1000
) -> list[np.ndarray]:
    """FedOTP ``noniid-labeldir`` label skew (spec §7.2-3).

    For each class, client shares are drawn from ``Dir(beta)``; clients already holding ``>= N / num_clients``
    samples get no share; the class's shuffled indices are split by the renormalised shares. The whole draw is
    repeated until every client has ``>= min_size`` samples.

    Args:
        labels: Labels [N] of the pool to split.
        num_clients: Number of clients K.
        beta: Dirichlet concentration (smaller = more skewed; 0.3 in the FedOTP/FedPGP scripts).
        seed: Seed of ``np.random.default_rng``.
        min_size: Minimum samples per client.
        max_tries: Bound on the number of redraws.

    Returns:
        Per client, sorted int64 indices into ``labels``; disjoint, covering all of ``labels``.

    Raises:
        FedlitError: If the minimum is impossible or not reached in ``max_tries`` draws.
    """
    return _dirichlet(labels, num_clients, beta, seed, min_size, max_tries)[0]


def partition_dirichlet_train_test(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    beta: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Like :func:`partition_dirichlet` on the train labels, then split each class's test indices with the same
    per-class fractions (as FedOTP does, spec §7.2-3), so each client's test set follows its training label
    distribution. A client that received no training image of a class gets no test image of it either (its
    fraction of that class is zeroed and the others renormalised): on the official full training set this only
    matters where a tiny fraction rounds to 0 images, but over a K-shot pool (``data.shots > 0``) rounding empties
    many (client, class) cells and the client would otherwise be tested on classes it never trained on.

    As the official loop (FedPGP@d43045b ``datasplit.py:289-310``), a draw is kept only when every client holds at
    least ``min_size`` samples in train AND test; otherwise the whole split is drawn again (attempt ``a`` > 0 from
    ``(seed, a)``), up to ``max_tries`` times.

    Returns:
        ``(train_parts, test_parts)``: per client, sorted int64 indices into each split.
    """
    test_min = min(int(min_size), len(test_labels) // max(int(num_clients), 1))  # a test split too small: best effort
    for attempt in range(max_tries):
        key = seed if attempt == 0 else [int(seed), 0x7E57, attempt]
        train_parts, test_parts = _dirichlet_train_test(train_labels, test_labels, num_clients, beta, key, min_size,
                                                        max_tries)
        if min(len(t) for t in test_parts) >= test_min:
            return train_parts, test_parts
    raise FedlitError(f"no Dirichlet split (beta={beta}) in {max_tries} tries gives every one of {num_clients} "
                      f"clients >= {min_size} test samples; lower num_clients or data.min_samples")


def _dirichlet_train_test(train_labels, test_labels, num_clients, beta, seed, min_size, max_tries):
    """One draw of :func:`partition_dirichlet_train_test` (the train split meets ``min_size``)."""
    train_labels = np.asarray(train_labels)
    train_parts, fractions = _dirichlet(train_labels, num_clients, beta, seed, min_size, max_tries)
    test_labels = np.asarray(test_labels)
    rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 1])
    test_parts: list[list[np.ndarray]] = [[] for _ in range(int(num_clients))]
    for c in np.unique(test_labels):
        idx = np.flatnonzero(test_labels == c)
        rng.shuffle(idx)
        p = np.asarray(fractions.get(int(c), np.full(int(num_clients), 1.0 / num_clients)), dtype=np.float64)
        held = np.array([np.any(train_labels[tp] == c) for tp in train_parts])
        if held.any():
            p = np.where(held, p, 0.0)
            p = p / p.sum() if p.sum() > 0 else held / held.sum()
        cuts = np.floor(np.cumsum(p) * len(idx) + 1e-9).astype(np.int64)[:-1]  # ε: a zeroed last share stays 0
        for j, chunk in enumerate(np.split(idx, cuts)):
            test_parts[j].append(chunk)
    return train_parts, [np.sort(np.concatenate(p)).astype(np.int64) for p in test_parts]


def partition_labeldir100(
    fine: np.ndarray, coarse: np.ndarray, num_clients: int, beta: float, seed: int, fine_beta: float = 10.0
) -> list[np.ndarray]:
    """FedOTP ``noniid-labeldir100`` (spec §7.2-4): two-level (Pachinko-style) Dirichlet over a pool.

    Every client gets ``N // num_clients`` samples of the pool, drawn without replacement: per client, coarse
    weights ``~ Dir(beta · 1)`` over the coarse labels and, per coarse label, fine weights ``~ Dir(fine_beta · 1)``
    over its fine labels; each sample picks a coarse label, then a fine label inside it, then a random
    remaining sample of that fine label. Exhausted fine labels (and coarse labels with nothing left) get weight 0
    and the weights are renormalised. The official code draws with seed 12345 over CIFAR-100's 60,000 train+test
    images; the caller maps pool indices back to splits (``< 50,000`` → train).

    Args:
        fine: Fine labels of the pool [N].
        coarse: Coarse label of each sample [N]; every fine label must have one coarse label.
        num_clients: Number of clients K.
        beta: Concentration of the per-client coarse weights (0.3 in the scripts).
        seed: Seed of ``np.random.default_rng``.
        fine_beta: Concentration of the fine weights inside a coarse label (10 officially).

    Returns:
        Per client, sorted int64 indices into the pool; disjoint, ``N // K`` each.
    """
    fine, coarse = np.asarray(fine, dtype=np.int64), np.asarray(coarse, dtype=np.int64)
    n, k = len(fine), int(num_clients)
    if len(coarse) != n:
        raise FedlitError(f"labeldir100 needs one coarse label per sample; got {len(coarse)} for {n} samples")
    if k < 1 or beta <= 0 or fine_beta <= 0:
        raise FedlitError(f"labeldir100 needs num_clients >= 1 and beta > 0; got {num_clients}, {beta}")
    per_client = n // k
    if per_client < 1:
        raise FedlitError(f"labeldir100 cannot give {k} clients one sample each from {n} samples; lower num_clients")
    coarse_ids = np.unique(coarse)
    fines_of = [np.unique(fine[coarse == c]) for c in coarse_ids]
    owner = {}
    for ci, fs in enumerate(fines_of):
        for f in fs.tolist():
            if owner.setdefault(f, ci) != ci:
                raise FedlitError(f"labeldir100: fine label {f} appears under two coarse labels")
    rng = np.random.default_rng(seed)
    pools = {f: rng.permutation(np.flatnonzero(fine == f)) for f in owner}
    left = {f: len(p) for f, p in pools.items()}
    parts = []
    for _ in range(k):
        cw = rng.dirichlet(np.full(len(coarse_ids), float(beta)))
        fw = [rng.dirichlet(np.full(len(fs), float(fine_beta))) for fs in fines_of]
        alive_f = [np.array([left[f] > 0 for f in fs.tolist()], dtype=float) for fs in fines_of]
        alive_c = np.array([a.any() for a in alive_f], dtype=float)
        take = []
        for _ in range(per_client):
            wc = cw * alive_c
            ci = int(rng.choice(len(wc), p=wc / wc.sum())) if wc.sum() > 0 else int(rng.choice(np.flatnonzero(alive_c)))
            wf = fw[ci] * alive_f[ci]
            fi = int(rng.choice(len(wf), p=wf / wf.sum())) if wf.sum() > 0 else int(rng.choice(np.flatnonzero(alive_f[ci])))
            f = int(fines_of[ci][fi])
            left[f] -= 1
            take.append(pools[f][left[f]])
            if left[f] == 0:
                alive_f[ci][fi] = 0.0
                alive_c[ci] = float(alive_f[ci].any())
        parts.append(np.sort(np.asarray(take, dtype=np.int64)))
    return parts


def partition_iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """``n`` samples shuffled with ``seed`` and dealt into ``num_clients`` near-equal parts (sizes differ by <= 1);
    several clients per domain in the one-client-per-domain protocol. Returns sorted int64 indices per client."""
    if num_clients < 1 or n < num_clients:
        raise FedlitError(f"cannot split {n} samples into {num_clients} non-empty clients")
    perm = np.random.default_rng(seed).permutation(int(n))
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, int(num_clients))]


def class_histogram(labels_per_client: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts [K, C]: row ``i`` is the label histogram of client ``i``'s labels."""
    return np.stack(
        [np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)[:num_classes] for y in labels_per_client]
    ) if len(labels_per_client) else np.zeros((0, num_classes), dtype=np.int64)


def format_histogram(hist: np.ndarray, classnames: Sequence[str], max_classes: int = 6) -> str:
    """A compact per-client table: client, #samples, #classes and the classes (most frequent first, with counts).

    Args:
        hist: Counts [K, C] from :func:`class_histogram`.
        classnames: Names of the C classes.
        max_classes: Classes listed per client before eliding the rest.
    """
    hist = np.asarray(hist)
    lines = [f"{'client':>6} {'#samples':>8} {'#classes':>8}  classes"]
    for i, row in enumerate(hist):
        present = np.flatnonzero(row)
        order = present[np.argsort(-row[present], kind="stable")]
        shown = ", ".join(f"{classnames[c]} ({row[c]})" for c in order[:max_classes])
        if len(order) > max_classes:
            shown += f", … +{len(order) - max_classes} more"
        lines.append(f"{i:>6} {int(row.sum()):>8} {len(present):>8}  {shown}")
    lines.append(f"{'total':>6} {int(hist.sum()):>8} {int((hist.sum(0) > 0).sum()):>8}")
    return "\n".join(lines)
