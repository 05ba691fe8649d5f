"""Bad input gets one clear line on stderr, exit code 2, no traceback, and never touches earlier runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlit.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _yaml(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# (args after `fit --config QUICK`, substrings the error must contain)
CASES = [
    (["--trainer.roundz", "3"], ["unknown config key 'trainer.roundz'", "trainer.rounds"]),
    (["--datax.shots", "3"], ["unknown config key 'datax.shots'", "data.shots"]),
    (["--method.lrr", "3"], ["method.init_args.lrr", "method.init_args.lr"]),
    (["--method", "fedfoo"], ["unknown method 'fedfoo'", "fedlit methods"]),
    (["--data.dataset", "shapez"], ["unknown dataset 'shapez'", "shapes"]),
    (["--backbone.name", "ViT-Q-99"], ["unknown backbone 'ViT-Q-99'", "fedlit backbones"]),
    (["--trainer.rounds", "-1"], ["trainer.rounds=-1"]),
    (["--trainer.rounds", "abc"], ["trainer.rounds", "expected int", "abc"]),
    (["--trainer.participation", "1.5"], ["trainer.participation=1.5"]),
    (["--data.shots", "0"], ["data.shots=0"]),
    (["--data.num_clients", "40"], ["24 classes", "40 clients"]),
    (["--data.partition", "foo"], ["data.partition", "foo"]),
    (["--method.init_args.n_ctx", "abc"], ["method.init_args.n_ctx", "expected int"]),
    (["--method.init_args.ctx_init", "a photo of"], ["ctx_init", "n_ctx"]),
    (["--config", "/nonexistent/x.yaml"], ["does not exist"]),
    (["--data.dataset", "oxford_pets", "--data.root", "/nonexistent/data"], ["/nonexistent/data"]),
    (["--data.dataset_args", '{"bogus": 1}'], ["dataset_args", "bogus"]),
    (["--trainer.checkpoint_every", "-2"], ["trainer.checkpoint_every=-2"]),
    (["--trainer.on_client_failure", "explode"], ["trainer.on_client_failure", "explode"]),
    (["--data.beta", "0"], ["data.beta=0"]),
    (["--trainer.threads", "0"], ["trainer.threads=0"]),
]


@pytest.mark.parametrize("args,expect", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_one_line_error(tmp_path, capsys, args, expect):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"method": "x"}')
    rc = main(["fit", "--config", QUICK, "--out_dir", str(tmp_path / "new"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) <= 2, err
    for s in expect:
        assert s in err, (s, err)
    assert "Traceback" not in err
    assert not (tmp_path / "new").exists()  # nothing written for a run that could not start
    assert (earlier / "results.json").read_text() == '{"method": "x"}'


def test_bad_keys_in_config_files(tmp_path, capsys):
    cases = [
        ("trainer:\n  roundz: 3\n", "trainer.rounds"),
        ("method:\n  class_path: fedlit.methods.PromptFL\n  init_args:\n    n_ctxx: 3\n", "method.init_args.n_ctx"),
    ]
    for text, hint in cases:
        rc = main(["fit", "--config", QUICK, "--config", _yaml(tmp_path, "bad.yaml", text)])
        err = capsys.readouterr().err
        assert rc == 2 and "unknown config key" in err and hint in err and len(err.strip().splitlines()) <= 2


def test_missing_weights_names_the_fix(tmp_path, capsys):
    rc = main(["fit", "--config", QUICK, "--backbone.pretrained", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.safetensors" in err


def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["fit", "--config", QUICK, "--method", "zeroshot", "--out_dir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write" in err


def test_console_script_prints_no_traceback(tmp_path):
    """The real entry point in a fresh process: one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "fedlit.cli", "fit", "--config", QUICK, "--method", "nope"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown method 'nope'")
    assert "Traceback" not in proc.stderr


def test_print_config_and_lists(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", QUICK, "--method", "coop", "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: fedlit.methods.coop.CoOp" in out
    assert "n_ctx: 16" in out  # configs/coop.yaml's, not the n_ctx 4 of quickstart.yaml's PromptFL
    assert main(["methods"]) == 0 and "promptfl" in capsys.readouterr().out
    assert main(["datasets"]) == 0 and "shapes-dark" in capsys.readouterr().out


def test_corrupt_image_names_the_file(tmp_path, capsys):
    """A real-layout dataset with a broken JPEG: one line naming the file, exit 2."""
    import json

    from PIL import Image

    base = tmp_path / "data" / "oxford_pets"
    (base / "images").mkdir(parents=True)
    entries = []
    for label, name in enumerate(["abyssinian", "beagle"]):
        for i in range(2):
            rel = f"{name}_{i}.jpg"
            Image.new("RGB", (8, 8), (label * 200, 50, 50)).save(base / "images" / rel)
            entries.append([rel, label, name])
    (base / "images" / "beagle_1.jpg").write_bytes(b"not a jpeg at all")
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": entries, "val": entries, "test": entries}))
    rc = main(["fit", "--config", QUICK, "--method", "zeroshot", "--data.dataset", "oxford_pets",
               "--data.root", str(tmp_path / "data"), "--data.num_clients", "1", "--data.shots", "1",
               "--out_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "beagle_1.jpg" in err and len(err.splitlines()) <= 2 and "Traceback" not in err


def test_pretrain_toy_never_writes_over_an_existing_file(tmp_path, capsys):
    existing = tmp_path / "weights.safetensors"
    existing.write_bytes(b"earlier weights")
    assert main(["pretrain-toy", "--out", str(existing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite true" in err and len(err.splitlines()) == 1
    assert existing.read_bytes() == b"earlier weights"


def test_cli_habits_of_lightningcli_users(tmp_path, capsys):
    # -c is --config; an abbreviated key is an error, never silently another key
    assert main(["fit", "-c", QUICK, "--trainer.round", "5"]) == 2
    assert "unknown config key 'trainer.round'" in capsys.readouterr().err
    # a YAML syntax error names the file and the place
    bad = _yaml(tmp_path, "bad.yaml", "trainer:\n  rounds: [1\n")
    assert main(["fit", "--config", QUICK, "--config", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad} is not valid YAML") and "line 3" in err and len(err.splitlines()) == 1


def test_switching_method_starts_from_the_new_methods_own_hyper_parameters(capsys):
    from fedlit.experiment import fit_parser, rewrite_method_shortcut

    parser = fit_parser()
    notes = []
    argv = ["--config", QUICK, "--method", "fedpgp"]  # quickstart.yaml is PromptFL with n_ctx 4, lr 0.01
    cfg = parser.parse_args(rewrite_method_shortcut(argv, say=notes.append))
    assert cfg.method.class_path.endswith("FedPGP")
    assert (cfg.method.init_args.n_ctx, cfg.method.init_args.lr) == (16, 0.001)  # configs/fedpgp.yaml's
    assert notes == ["--method fedpgp: FedPGP with the hyper-parameters of configs/fedpgp.yaml "
                     "(override with --method.init_args.KEY)"]
    cfg = parser.parse_args(rewrite_method_shortcut([*argv, "--method.init_args.lr", "0.5"], say=notes.append))
    assert cfg.method.init_args.lr == 0.5  # later overrides still win


def test_fit_help_lists_every_method_and_method_help_takes_a_short_name(capsys, tmp_path, monkeypatch):
    from fedlit.experiment import fit_parser
    from fedlit.methods import list_methods

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert out == fit_parser().format_help()  # the cached text is the parser's help
    assert len(list((tmp_path / "fedlit" / "cli").glob("fit-help-*.txt"))) == 1
    assert main(["fit", "-h"]) == 0 and capsys.readouterr().out == out  # read back from the cache
    classes = {__import__("fedlit.methods", fromlist=["x"]).method_class(m).__name__ for m in list_methods()}
    missing = [c for c in classes if c not in out]
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["fit", "--method.help", "fedpgp"])
    out = capsys.readouterr().out
    assert "--method.rank" in out and "--method.mu" in out and "FedPGP" in out


def test_listings_describe_each_entry_and_agree_with_the_registries(capsys):
    from fedlit import catalog
    from fedlit.backbones import list_backbones
    from fedlit.methods import list_methods

    assert [n for n, _ in catalog.methods()] == list_methods()  # read from the files = what the registry imports
    assert all(d for _, d in catalog.methods())
    listed = [n for n, _ in catalog.backbones()]
    assert set(list_backbones()) <= set(listed) and "timm/<model>[@size]" in listed
    assert main(["datasets"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert "no data root" in rows["shapes-dark"] and "--data.root" in rows["oxford_pets"]
    assert all(rows.values())


def test_listing_and_fit_help_do_not_import_torch(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    warm = subprocess.run([sys.executable, "-m", "fedlit.cli", "fit", "--help"], capture_output=True, text=True,
                          timeout=300, env=env)  # the first call builds the help (torch), once per install
    assert warm.returncode == 0 and "--trainer.rounds" in warm.stdout, warm.stderr[-1000:]
    code = ("import sys; from fedlit.cli import main; main(['methods']); main(['backbones']); main(['datasets']); "
            "main(['fit', '--help']); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "fedpgp" in proc.stdout and "ViT-B-16" in proc.stdout and "oxford_pets" in proc.stdout
    assert proc.stdout.endswith(warm.stdout)


def test_help_cache_key_follows_the_sources(tmp_path, monkeypatch):
    from fedlit import catalog

    (tmp_path / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(catalog, "PKG", tmp_path)
    key = catalog._source_key("fit-help")
    assert catalog._source_key("fit-help") == key
    (tmp_path / "m.py").write_text("x = 22\n")  # an edited source file: another key, so the help is rebuilt
    assert catalog._source_key("fit-help") != key
