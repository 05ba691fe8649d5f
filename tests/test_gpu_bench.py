"""benchmarks/gpu.py at tiny scale on CPU (the real run needs a lent GPU), and its real-scale federation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# loaded by path, never as ``benchmarks.gpu``: opacus' wheel installs a top-level package called ``benchmarks``
_spec = importlib.util.spec_from_file_location("fedlit_benchmarks_gpu", ROOT / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu
_spec.loader.exec_module(gpu)


def test_gpu_benchmark_runs_at_tiny_scale_on_cpu(capsys):
    out = gpu.main(["--tiny", "--section-s", "0.05", "--budget-s", "1", "--threads", "1"])
    assert out["device"] == "cpu" and out["image_tower"]["images_per_s"] > 0
    assert out["text_step"]["text_path"] == "shared_prefix"
    for key in ("coop_nctx16_50_classes", "fedtpg_nctx4_20_classes"):
        assert out["text_step"][key]["steps_per_s"] > 0 and out["text_step"][key]["flops_per_step"] > 0
    tpg = out["fedtpg_cross_class"]
    assert tpg["datasets"] == 3 and tpg["clients"] == 4 and 1 <= tpg["rounds_run"] <= 2
    assert tpg["extrapolated_500_rounds_s"] >= tpg["first_round_s (incl. feature cache fill)"]
    flops = tpg["floor_flops"]
    assert flops["total_500_rounds"] == flops["image_once"] + 500 * flops["text_per_round"] > 0
    assert 0 < tpg["fraction_of_floor"] < 1
    pf = out["promptfl_defaults"]  # the default pipeline: Dassl views through the view bank, chain
    assert "augment=dassl (views cached)" in pf["plan"] and "optimizer_state=chain" in pf["plan"]
    assert pf["image_forwards"]["fedlit"] == pf["image_forwards"]["floor (one per distinct (image, view))"] > 0
    assert '"fedtpg_cross_class"' in capsys.readouterr().out


def test_gpu_benchmark_real_scale_federation_is_fedtpg_cross_class():
    from fedlit.data.federation import FederatedData

    names = gpu.register_datasets(gpu.FEDTPG_CLASSES, img_size=2, train_per_class=8)
    fed = FederatedData(dataset=names, partition="contiguous", classes_per_client=20, shots=8,
                        subsample="base").setup(seed=43)
    assert len(fed.clients) == 30
    assert [sum(c.group == g for c in fed.clients) for g in fed.groups] == [2, 3, 2, 3, 1, 3, 1, 5, 10]
    assert all(c.num_samples == 8 * len(c.classes) for c in fed.clients)
    assert len(set(gpu.class_names(397, 8))) == 397
