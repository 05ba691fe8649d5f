"""A researcher's first day (issues 25 items 1-6, 26 item 7): run directories, locks, an idempotent end of a run,
announced fallbacks, and bad input as one line (CPU, no training)."""

from __future__ import annotations

import os
import stat
import types
import zipfile
from pathlib import Path

import pytest
import torch

from fedlit import catalog
from fedlit.errors import FedlitError
from fedlit.experiment import rewrite_method_shortcut, run_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _release(path):
    from fedlit.experiment import unlock_run_dir

    unlock_run_dir(Path(path))


# ============================================================================ table1: time left
def test_time_left_uses_each_methods_mean_else_the_overall_mean():
    from fedlit.apps.table1 import time_left

    assert time_left([], ["a"]) is None
    done = [("zeroshot", 10.0), ("zeroshot", 20.0), ("fedotp", 60.0)]
    # zeroshot 15 each, fedotp 60, an unseen method at the overall mean 30
    assert time_left(done, ["zeroshot", "fedotp", "coop"]) == pytest.approx(15 + 60 + 30)


# ============================================================================ run directories (items 2, 5, 7)
def test_damaged_checkpoint_in_the_default_directory_is_refused_in_one_line(in_tmp):
    d = in_tmp / "runs" / "promptfl-shapes-seed1"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("seed: 1\n")
    (d / "checkpoint.safetensors").write_bytes(b"\x00truncated")
    with pytest.raises(FedlitError) as e:
        run_dir(None, "promptfl", "shapes", 1, overwrite=False, digest="abc")
    msg = str(e.value)
    assert "runs/promptfl-shapes-seed1" in msg and "damaged checkpoint" in msg and "--overwrite true" in msg
    assert "\n" not in msg
    assert not (in_tmp / "runs" / "promptfl-shapes-seed1-2").exists()  # no second run unasked
    path, resume = run_dir(None, "promptfl", "shapes", 1, overwrite=True, digest="abc")
    assert path == Path("runs/promptfl-shapes-seed1") and resume is None
    assert not (d / "checkpoint.safetensors").exists()
    _release(path)


def test_a_run_stopped_before_its_first_checkpoint_is_reused_not_duplicated(in_tmp):
    d = in_tmp / "runs" / "coop-shapes-seed0"
    (d / "tensorboard").mkdir(parents=True)
    (d / "config.yaml").write_text("seed: 0\n")
    (d / "tensorboard" / "events.out.tfevents.1").write_bytes(b"x")
    path, resume = run_dir(None, "coop", "shapes", 0, overwrite=False, digest="abc")
    assert path == Path("runs/coop-shapes-seed0") and resume is None
    assert not (d / "tensorboard").exists()  # the stopped run's scalars would be logged twice
    assert not (in_tmp / "runs" / "coop-shapes-seed0-2").exists()
    _release(path)


def test_a_second_run_into_the_same_out_dir_refuses(in_tmp):
    path, _ = run_dir("out", "coop", "shapes", 0, overwrite=False)
    try:
        with pytest.raises(FedlitError, match="another fedlit run is writing out"):
            run_dir("out", "coop", "shapes", 0, overwrite=True)
        # the default directory of a run in progress is passed over, not refused
    finally:
        _release(path)
    again, _ = run_dir("out", "coop", "shapes", 0, overwrite=False)  # released: usable again
    _release(again)


def test_a_refused_foreign_directory_is_left_as_it_was(in_tmp):
    (in_tmp / "mine").mkdir()
    (in_tmp / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FedlitError, match="did not write"):
        run_dir("mine", "coop", "shapes", 0, overwrite=False)
    assert sorted(p.name for p in (in_tmp / "mine").iterdir()) == ["notes.txt"]


def test_resume_mismatch_names_the_keys_that_differ(tmp_path):
    from fedlit.checkpoint import check_identity, config_diff

    saved = tmp_path / "config.yaml"
    saved.write_text("seed: 1\nmethod:\n  init_args:\n    lr: 0.002\ntrainer:\n  rounds: 5\n  batch_size: 16\n")
    now = "seed: 1\nmethod:\n  init_args:\n    lr: 0.05\ntrainer:\n  rounds: 9\n  batch_size: 16\n"
    diff = config_diff(saved, now, ("rounds",))
    assert diff == ["method.init_args.lr (0.002 → 0.05)"]  # rounds never changes the digest
    with pytest.raises(FedlitError, match=r"method\.init_args\.lr \(0\.002 → 0\.05\)"):
        check_identity(tmp_path / "c", {"config_digest": "a"}, {"config_digest": "b"}, diff)


def test_config_yaml_and_other_atomic_files_are_0644(tmp_path):
    from fedlit.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "config.yaml", lambda f: f.write("a: 1\n"), mode="w")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode) == 0o644


# ============================================================================ end of a run (item 3), lock-step (item 4)
def _finish_stub(run: Path, calls: list):
    from lightning.fabric.loggers import TensorBoardLogger

    from fedlit.orchestrator import Orchestrator

    logger = TensorBoardLogger(root_dir=str(run), name="tensorboard", version="", default_hp_metric=False)
    real = logger.log_hyperparams
    logger.log_hyperparams = lambda *a, **k: (calls.append(1), real(*a, **k))
    method = types.SimpleNamespace(name="m", run_report=lambda: {})
    from fedlit.callbacks import TensorBoard
    from fedlit.methods.promptfl import PromptFL
    from fedlit.run_plan import RunPlan
    from fedlit.trainer import FedTrainer

    tensorboard = TensorBoard()
    tensorboard.logger = logger
    cfg = FedTrainer(statistic="last_round")
    stub = types.SimpleNamespace(meta={}, method=method, seed=0, run_dir=run, history=[], best_eval={}, ood=None,
                                 plan=RunPlan.resolve(cfg, PromptFL()), client_groups=lambda: {},
                                 bank=types.SimpleNamespace(encoded=0), cfg=cfg, callbacks=[tensorboard],
                                 fabric=types.SimpleNamespace(global_rank=0), hparams=lambda: {"a": 1})
    stub.call = lambda hook, **kw: Orchestrator.call(stub, hook, **kw)
    return lambda metrics: Orchestrator.finish(stub, metrics, 1.0)


def test_the_end_of_a_run_logs_the_final_tags_once_across_a_crash_and_resume(tmp_path):
    calls = []
    metrics = {"mean": {"local": 1.0, "base": 2.0, "novel": 3.0, "hm": 1.6}}
    _finish_stub(tmp_path, calls)(metrics)
    assert calls == [1]
    (tmp_path / "results.json").unlink()  # the crash: hyper-parameters logged, results.json never written
    _finish_stub(tmp_path, calls)(metrics)  # the resumed run finishes again
    assert calls == [1] and (tmp_path / "results.json").is_file()


def test_a_failing_lockstep_group_is_announced_once_with_its_cause(capsys):
    from fedlit.engine import Clients

    def lanes(n):
        raise RuntimeError("shapes differ")

    stub = types.SimpleNamespace(lanes=lanes, update=lambda cid, rnd, sent, own: cid, _lockstep_warned=False,
                                 verbose=True)
    assert Clients.lockstep(stub, [0, 1], 0, {0: {}, 1: {}}, lambda c: None) == [0, 1]
    assert Clients.lockstep(stub, [2, 3], 1, {2: {}, 3: {}}, lambda c: None) == [2, 3]
    out = capsys.readouterr().out
    assert out.count("lock-step group") == 1 and "RuntimeError: shapes differ" in out


def test_settings_a_method_cannot_use_are_announced():
    from fedlit.methods.zeroshot import ZeroShot
    from fedlit.run_plan import fallback_notes
    from fedlit.trainer import FedTrainer

    notes = fallback_notes(ZeroShot(), FedTrainer(augment="dassl", sync="step"))
    assert any("does not train" in n and "augment" in n for n in notes)
    method = types.SimpleNamespace(name="x", lockstep=False, trainable=True, image_input="images")
    notes = fallback_notes(method, FedTrainer(lockstep=0, feature_cache="disk"))
    assert any("lockstep=0" in n for n in notes) and any("feature_cache=disk" in n for n in notes)
    assert fallback_notes(types.SimpleNamespace(name="y", lockstep=True, trainable=True, image_input="features"),
                          FedTrainer(lockstep=0)) == []


# ============================================================================ bad input (item 5)
def test_a_state_dict_of_the_wrong_shapes_is_one_line(tmp_path, toy):
    from fedlit.backbones import load_backbone

    sd = {k: torch.zeros(3, 3) for k in toy.model.state_dict() if k.endswith("weight")}
    torch.save(sd, tmp_path / "wrong_keys.pt")
    with pytest.raises(FedlitError, match="does not fit backbone fedlit-toy"):
        load_backbone("fedlit-toy", pretrained=str(tmp_path / "wrong_keys.pt"))


def test_unknown_precision_is_one_line():
    from fedlit.trainer import FedTrainer

    with pytest.raises(FedlitError, match="trainer.precision='bf16-mix': use one of"):
        FedTrainer(precision="bf16-mix")
    FedTrainer(precision="bf16-mixed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line():
    from fedlit.trainer import FedTrainer

    with pytest.raises(FedlitError, match="no usable GPU"):
        FedTrainer(accelerator="gpu").make_fabric()


@pytest.mark.parametrize("lr", [float("nan"), -0.01, 0.0, float("inf")])
def test_nan_negative_or_zero_lr_is_refused_before_the_run(lr):
    from fedlit.methods.promptfl import PromptFL

    with pytest.raises(FedlitError, match="method.init_args.lr="):
        PromptFL(lr=lr)


def test_nan_lr_in_a_yaml_file_is_refused(tmp_path):
    from fedlit.experiment import fit_parser, parse_fit

    cfg = tmp_path / "nan.yaml"
    cfg.write_text("method:\n  class_path: fedlit.methods.promptfl.PromptFL\n  init_args:\n    lr: .nan\n")
    parser = fit_parser()
    with pytest.raises(FedlitError, match="method.init_args.lr=nan"):
        parse_fit(parser, lambda: parser.parse_args(["--config", str(cfg)]))


def test_more_shots_than_images_is_said(capsys):
    from fedlit.data.federation import FederatedData

    FederatedData(dataset="shapes-dark", shots=1000, num_clients=2).setup(0)
    out = capsys.readouterr().out
    assert "data.shots=1000" in out and "only" in out


def test_more_cpu_processes_than_cores_is_one_line(monkeypatch):
    from fedlit.trainer import FedTrainer

    if torch.cuda.is_available():
        pytest.skip("devices are GPUs here")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(FedlitError, match="trainer.devices=16 processes on 2 CPU cores"):
        FedTrainer(devices=16).make_fabric()


def test_pickled_and_broken_torchscript_files_get_our_words(tmp_path):
    from fedlit.backbones.files import read_state_dict

    torch.save({"w": torch.zeros(1), "obj": types.SimpleNamespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(FedlitError) as e:
        read_state_dict(tmp_path / "pickled.pt")
    assert "weights_only" not in str(e.value) and "never unpickles" in str(e.value)
    with zipfile.ZipFile(tmp_path / "broken.pt", "w") as z:
        z.writestr("archive/constants.pkl", b"not a pickle")
    with pytest.raises(FedlitError) as e:
        read_state_dict(tmp_path / "broken.pt")
    assert "TorchScript" in str(e.value) and ": )" not in str(e.value)


# ============================================================================ issue 26 item 7
def test_a_method_override_before_the_shortcut_applies_to_it():
    import json

    argv = rewrite_method_shortcut(["--method.init_args.lr", "0.05", "--method", "coop"], say=lambda m: None)
    i = argv.index("--method")
    assert json.loads(argv[i + 1])["class_path"].endswith("CoOp")
    assert argv[i + 2:i + 4] == ["--method.init_args.lr", "0.05"]


def test_every_method_has_a_one_line_description():
    for name, doc in catalog.methods():  # more than the method's own name ("FedPGP.")
        assert doc and doc.rstrip(".").replace("-", "").lower() != name, f"{name}: {doc!r}"


def test_backbones_offer_only_the_weights_open_clip_has():
    import open_clip

    listed = dict(catalog.backbones())
    for arch in ("ViT-B-16", "RN50", "ViT-B-16-plus", "RN50-quickgelu"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        assert ("openai" in listed[arch]) == ("openai" in tags), arch
        if not tags:
            assert "no released weights" in listed[arch]


def test_readme_names_the_backbone_pfedpg_yaml_uses():
    import yaml

    name = yaml.safe_load((ROOT / "configs" / "pfedpg.yaml").read_text())["backbone"]["name"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"`{name}`, pFedPG's ImageNet-21k" in readme


def test_two_checkouts_keep_their_own_help_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.py").write_text(name)
    for name in ("a", "b", "a", "b"):
        monkeypatch.setattr(catalog, "PKG", tmp_path / name)
        assert catalog.cached_text("help", lambda: built.append(name) or f"text {name}") == f"text {name}"
    assert built == ["a", "b"]
