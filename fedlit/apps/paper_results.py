"""Published numbers that fedlit's runs are compared with (plain data, transcribed by hand).

Sources, by paper and table:

- FedPGP: Tianyu Cui, Hongxia Li, Jingya Wang, Ye Shi, "Harmonizing Generalization and Personalization in
  Federated Prompt Learning", ICML 2024 (PMLR 235): Table 1 (base-to-novel on OxfordPets, Flowers102, DTD,
  Caltech101, Food101 and their average; the per-dataset rows are its sub-tables (a)–(f)), Table 2
  (leave-one-domain-out on Office-Caltech10 and DomainNet; what a column means is read from Table 4, its per-domain
  detail), Table 5 (CIFAR-10 / CIFAR-100, Dirichlet non-IID, 100 clients).
- FedTPG: Chen Qiu et al., "Text-driven Prompt Generation for Vision-Language Models in Federated Learning",
  ICLR 2024 (arXiv 2310.06123): not its tables but the two training logs its official repository ships
  (boschresearch/FedTPG@f141c29, ``output/cross_cls/fedtpg/20_8/43/log.txt`` and
  ``output/cross_data/fedtpg/5_8/43/log.txt``: seed 43, ViT-B/16, n_ctx 4, 8 shots) — logged numbers of the code,
  not necessarily the paper's.

All values are accuracies in percent, exactly as printed (trailing zeros dropped by the source are kept dropped:
``90.01`` vs ``81.4``). ``tests/test_summarize.py`` checks the transcription: every Table-1 "Average" row is the
mean of the five dataset rows and every HM is the harmonic mean of Local, Base and Novel (to the paper's rounding;
the Average HM is the HM of the averaged Local/Base/Novel, not the mean of the HMs), with one printed exception,
``TABLE1_INCONSISTENT``.
"""

from __future__ import annotations

# fedlit method / dataset names → the names the papers print.
METHOD_NAMES: dict[str, str] = {
    "zeroshot": "CLIP",
    "coop": "CoOp",
    "promptfl": "PromptFL",
    "fedprox": "Prompt+Prox",
    "fedmaple": "FedMaPLe",
    "fedcocoop": "FedCoCoOp",
    "fedotp": "FedOTP",
    "fedpgp": "FedPGP",
    "fedtpg": "FedTPG",
    "central": "Central (CoOp, pooled)",
    "ivlp": "IVLP",
    "promptfolio": "PromptFolio",
    "fedpha": "FedPHA",
    "pfedmma": "pFedMMA",
}
DATASET_NAMES: dict[str, str] = {
    "oxford_pets": "OxfordPets",
    "oxford_flowers": "Flowers102",
    "dtd": "DTD",
    "caltech101": "Caltech101",
    "food101": "Food101",
    "average": "Average",
}
TABLE1_METHODS = ["zeroshot", "coop", "promptfl", "fedprox", "fedmaple", "fedcocoop", "fedotp", "fedpgp"]
TABLE1_DATASETS = ["oxford_pets", "oxford_flowers", "dtd", "caltech101", "food101"]

# ------------------------------------------------------------------------------------------ FedPGP Table 1
FEDPGP_TABLE1_CAPTION = ("FedPGP (ICML 2024) Table 1: Accuracy comparison (%) on clients' local classes and "
                         "Base-to-novel generalization. (a) Average over 5 datasets, (b) OxfordPets, (c) Flowers102, "
                         "(d) DTD, (e) Caltech101, (f) Food101. ViT-B/16, 10 clients, 16 shots, 25 rounds × 2 epochs.")
# FEDPGP_TABLE1[dataset][method] = {"local", "base", "novel", "hm"}
_T1 = {
    "average": {  # (a) Average over 5 datasets.
        "zeroshot": (79.18, 79.83, 83.25, 80.72),
        "coop": (94.28, 69.40, 73.16, 77.55),
        "promptfl": (90.00, 85.65, 78.53, 84.46),
        "fedprox": (89.84, 85.04, 77.40, 83.78),
        "fedmaple": (90.81, 84.90, 81.49, 85.56),
        "fedcocoop": (90.01, 85.08, 81.4, 85.35),
        "fedotp": (98.16, 59.73, 71.08, 73.17),
        "fedpgp": (95.67, 85.69, 81.75, 87.33),
    },
    "oxford_pets": {  # (b) OxfordPets.
        "zeroshot": (89.34, 89.31, 96.86, 91.70),
        "coop": (95.33, 82.51, 92.92, 89.90),
        "promptfl": (95.12, 95.16, 91.89, 94.03),
        "fedprox": (95.95, 95.24, 91.25, 94.10),
        "fedmaple": (93.75, 95.53, 97.45, 95.55),
        "fedcocoop": (96.02, 96.01, 97.25, 96.42),
        "fedotp": (99.93, 63.92, 80.56, 78.81),
        "fedpgp": (96.65, 95.87, 97.33, 96.61),
    },
    "oxford_flowers": {  # (c) Flowers102.
        "zeroshot": (67.69, 68.85, 77.23, 71.01),
        "coop": (96.39, 55.91, 64.47, 68.54),
        "promptfl": (94.32, 76.19, 70.1, 78.96),
        "fedprox": (92.73, 73.06, 66.09, 75.75),
        "fedmaple": (94.89, 77.49, 70.46, 79.71),
        "fedcocoop": (94.57, 77.88, 74.39, 81.4),
        "fedotp": (99.63, 44.16, 56.57, 59.57),
        "fedpgp": (99.68, 78.48, 75.11, 83.13),
    },
    "dtd": {  # (d) DTD.
        "zeroshot": (53.79, 54.62, 58.20, 55.47),
        "coop": (86.38, 39.2, 37.65, 47.13),
        "promptfl": (72.71, 71.41, 49.28, 62.44),
        "fedprox": (74.07, 71.84, 50.20, 63.37),
        "fedmaple": (78.37, 65.35, 55.85, 65.26),
        "fedcocoop": (72.61, 68.20, 54.4, 64.08),
        "fedotp": (94.91, 43.87, 43.68, 53.36),
        "fedpgp": (89.07, 69.65, 55.25, 68.15),  # sic: see TABLE1_INCONSISTENT
    },
    "caltech101": {  # (e) Caltech101.
        "zeroshot": (95.72, 96.96, 93.99, 95.54),
        "coop": (99.39, 86.37, 86.12, 90.22),
        "promptfl": (97.04, 97.27, 92.79, 95.65),
        "fedprox": (96.76, 97.34, 91.99, 95.30),
        "fedmaple": (96.47, 96.7, 94.32, 95.82),
        "fedcocoop": (96.65, 95.45, 92.46, 94.82),
        "fedotp": (99.68, 87.49, 89.33, 91.86),
        "fedpgp": (99.46, 96.09, 93.62, 96.33),
    },
    "food101": {  # (f) Food101.
        "zeroshot": (89.38, 89.39, 89.98, 89.58),
        "coop": (93.92, 82.99, 84.62, 86.92),
        "promptfl": (90.79, 88.22, 88.6, 89.19),
        "fedprox": (89.68, 87.72, 87.49, 88.29),
        "fedmaple": (90.59, 89.43, 89.38, 89.80),
        "fedcocoop": (90.18, 87.86, 88.51, 88.84),
        "fedotp": (96.65, 59.19, 85.28, 76.98),
        "fedpgp": (93.51, 88.37, 88.44, 90.04),
    },
}
# The one printed cell that disagrees with its own table: DTD / FedPGP Novel is printed 55.25, but both the
# printed HM 68.15 (= HM(89.07, 69.65, 54.25)) and the printed Average Novel 81.75 (= mean with 54.25; 81.95
# with 55.25) imply 54.25. Kept as printed; the comparison is off by at most one point there.
TABLE1_INCONSISTENT = {("dtd", "fedpgp", "novel"): {"printed": 55.25, "implied": 54.25}}
FEDPGP_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    d: {m: dict(zip(("local", "base", "novel", "hm"), v)) for m, v in rows.items()} for d, rows in _T1.items()
}

# ------------------------------------------------------------------------------------------ FedPGP Table 2
FEDPGP_TABLE2_CAPTION = ("FedPGP Table 2: The average classification accuracy using leave-one-domain-out validation "
                         "on Office-Caltech10 and DomainNet. A column = the SOURCE domain: the model of the client "
                         "trained on that domain, averaged over the other domains (Table 4's rows; fedlit: Novel).")
# FEDPGP_TABLE2[benchmark][method][domain]
FEDPGP_TABLE2: dict[str, dict[str, dict[str, float]]] = {
    "office_caltech10": {
        m: dict(zip(("amazon", "caltech", "dslr", "webcam", "avg"), v)) for m, v in {
            "zeroshot": (19.40, 18.32, 21.87, 18.59, 19.55),
            "coop": (41.54, 15.55, 56.04, 43.60, 39.18),
            "promptfl": (96.34, 91.57, 97.96, 98.30, 96.04),
            "fedprox": (96.13, 92.52, 97.57, 97.96, 96.05),
            "fedotp": (95.88, 92.13, 99.15, 97.15, 96.07),
            "fedpgp": (96.55, 91.92, 98.93, 98.75, 96.54),
        }.items()
    },
    "domainnet": {
        m: dict(zip(("clipart", "infograph", "painting", "quickdraw", "real", "sketch", "avg"), v)) for m, v in {
            "zeroshot": (49.89, 47.23, 53.61, 32.10, 48.19, 50.79, 46.96),
            "coop": (83.42, 53.28, 80.80, 49.41, 75.18, 82.88, 70.83),
            "promptfl": (95.28, 73.72, 94.50, 61.60, 95.72, 95.43, 86.04),
            "fedprox": (95.47, 69.44, 94.95, 61.24, 75.18, 95.41, 81.95),
            "fedotp": (94.10, 70.57, 89.88, 55.80, 94.93, 92.73, 83.00),
            "fedpgp": (96.45, 74.46, 95.43, 62.12, 96.06, 96.05, 86.76),
        }.items()
    },
}

# ------------------------------------------------------------------------------------------ FedPGP Table 5
FEDPGP_TABLE5_CAPTION = ("FedPGP Table 5: Accuracy comparison (%) on the Dirichlet Non-IID setting in CIFAR-10 and "
                         "CIFAR-100 over 100 clients. (mean, std)")
FEDPGP_TABLE5: dict[str, dict[str, tuple[float, float]]] = {
    "cifar10": {
        "zeroshot": (87.52, 0.56),
        "coop": (93.13, 0.34),
        "promptfl": (92.32, 0.79),
        "fedprox": (91.79, 0.46),
        "fedpgp": (94.82, 0.37),
    },
    "cifar100": {
        "zeroshot": (64.83, 0.49),
        "coop": (74.78, 0.41),
        "promptfl": (73.72, 0.61),
        "fedprox": (71.08, 0.89),
        "fedpgp": (77.44, 0.15),
    },
}

# ------------------------------------------------------------------------------------------ FedTPG logs
FEDTPG_LOGS_CAPTION = ("FedTPG official training logs (boschresearch/FedTPG output/*/fedtpg/*/43/log.txt): seed 43, ViT-B/16, n_ctx 4, 8 shots. Cross-class: "
                       "20 classes/client, 30 clients, 500 rounds (local = client average; new = novel). Logged "
                       "numbers of an earlier code version, not necessarily the paper's table.")
# FEDTPG_CROSS_CLASS[fedlit dataset] = {"local", "base", "novel"} (+ "hm" for the mean row, inferred arithmetic)
FEDTPG_CROSS_CLASS: dict[str, dict[str, float]] = {
    d: dict(zip(("local", "base", "novel"), v)) for d, v in {
        "caltech101": (97.73, 97.2, 95.2),
        "oxford_flowers": (90.67, 70.8, 78.7),
        "fgvc_aircraft": (37.01, 31.5, 35.7),
        "ucf101": (85.29, 75.1, 76.9),
        "oxford_pets": (94.95, 94.9, 94.5),
        "food101": (94.15, 89.9, 91.6),
        "dtd": (62.50, 62.5, 61.7),
        "stanford_cars": (74.46, 66.4, 74.6),
        "sun397": (91.32, 74.1, 77.4),
        "mean": (80.90, 73.61, 76.24),
    }.items()
}
FEDTPG_CROSS_CLASS["mean"]["hm"] = 76.80  # HM(Local, Base, New) of the logged means [inferred arithmetic]
# Cross-data: trained on ImageNet (5 classes/client, 200 clients, 10 % participation, 500 rounds); accuracy on
# each unseen dataset, plus the 5-way per-client ImageNet local accuracy.
FEDTPG_CROSS_DATA: dict[str, float] = {
    "caltech101": 93.79, "oxford_flowers": 70.40, "fgvc_aircraft": 23.73, "ucf101": 66.83, "oxford_pets": 91.06,
    "food101": 86.15, "dtd": 45.45, "stanford_cars": 64.73, "sun397": 66.83, "eurosat": 44.78, "mean": 65.37,
    "imagenet_local": 93.06,
}

PAPERS = {
    "fedpgp-table1": FEDPGP_TABLE1_CAPTION,
    "fedtpg-cross-class": FEDTPG_LOGS_CAPTION,
    "fedpgp-table2": FEDPGP_TABLE2_CAPTION,
    "fedpgp-table5": FEDPGP_TABLE5_CAPTION,
}


def paper_value(paper: str, method: str, dataset: str) -> dict[str, float] | None:
    """Local/Base/Novel/HM printed by ``paper`` for a fedlit (method, dataset), or None.

    ``paper``: ``fedpgp-table1`` (dataset ``average`` = the Average sub-table), ``fedtpg-cross-class``
    (method ``fedtpg`` only; per dataset, and ``a+b+…`` = a pooled run's mean over datasets), ``fedpgp-table2``
    (dataset ``office_caltech10-<domain>`` / ``domainnet-<domain>`` → Novel; the ``+``-joined domains → Avg) or
    ``fedpgp-table5`` (``cifar10`` / ``cifar100`` → Local).
    """
    if paper == "fedpgp-table2":
        bench = dataset.split("-", 1)[0]
        table = FEDPGP_TABLE2.get(bench, {}).get(method, {})
        domain = "avg" if "+" in dataset else dataset.split("-", 1)[-1]
        return {"novel": table[domain]} if "-" in dataset and domain in table else None
    if paper == "fedpgp-table5":
        row = FEDPGP_TABLE5.get(dataset, {}).get(method)
        return {"local": row[0]} if row else None
    if paper == "fedpgp-table1":
        return dict(FEDPGP_TABLE1.get(dataset, {}).get(method, {})) or None
    if paper == "fedtpg-cross-class":
        if method != "fedtpg":
            return None
        row = FEDTPG_CROSS_CLASS.get("mean" if "+" in dataset else dataset)
        return dict(row) if row else None
    return None


__all__ = ["METHOD_NAMES", "DATASET_NAMES", "TABLE1_METHODS", "TABLE1_DATASETS", "FEDPGP_TABLE1", "TABLE1_INCONSISTENT",
           "FEDPGP_TABLE2", "FEDPGP_TABLE5", "FEDTPG_CROSS_CLASS", "FEDTPG_CROSS_DATA", "PAPERS", "paper_value"]
