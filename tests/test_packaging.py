"""What a wheel install carries: every data file the package reads (the embedded model's weights and metrics),
the YAML configs (printed by `fedlit config NAME`), the LICENSE matching the declared licence, a CITATION.cff."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", under], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.splitlines() if (ROOT / p).is_file()]


def _matches(path: str, glob: str) -> bool:
    """setuptools' glob semantics: ``*`` stays inside one folder (fnmatch's would cross ``/``)."""
    return path.count("/") == glob.count("/") and fnmatch.fnmatch(path, glob)


def test_every_non_python_file_of_the_package_is_declared_package_data():
    declared = PYPROJECT["tool"]["setuptools"]["package-data"]
    missing = []
    for path in _tracked("fedlit"):
        if path.endswith(".py"):
            continue
        ok = any(_matches(path, f"{pkg.replace('.', '/')}/{glob}") for pkg, globs in declared.items() for glob in globs)
        missing += [] if ok else [path]
    assert not missing, f"not in [tool.setuptools.package-data], so missing from a wheel: {missing}"


def test_every_config_is_declared_data_files():
    declared = PYPROJECT["tool"]["setuptools"]["data-files"]
    globs = [g for gs in declared.values() for g in gs]
    missing = [p for p in _tracked("configs") if p.endswith(".yaml")
               and not any(_matches(p, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.data-files], so missing from a wheel: {missing}"
    for target, gs in declared.items():  # installed where fedlit.apps.config_files looks
        for g in gs:
            assert target == "share/fedlit/" + g.rsplit("/", 1)[0], (target, g)


def test_licence_file_is_the_apache_2_text_pyproject_declares():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text


def test_citation_cff_is_valid_and_names_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"].startswith("1.2") and cff["title"].startswith("fedlit")
    assert cff["license"] == PYPROJECT["project"]["license"] and cff["version"] == PYPROJECT["project"]["version"]
    assert cff["authors"] and cff["message"]
    assert {r["title"].split(":")[0] for r in cff["references"]} >= {"FedPGP", "FedTPG", "pFedPG"}


def test_fedlit_config_prints_a_config_and_names_the_fix_for_a_wrong_one(capsys):
    from fedlit.apps.config_files import main
    from fedlit.errors import FedlitError

    assert main(["quickstart"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert main(["protocols/fedtpg_cross_class.yaml"]) == 0 and "trainer" in capsys.readouterr().out
    assert main([]) == 0 and "official/fedpgp_table1" in capsys.readouterr().out.splitlines()
    with pytest.raises(FedlitError, match="did you mean quickstart"):
        main(["quickstar"])


@pytest.mark.slow
def test_a_built_wheel_carries_the_model_metrics_configs_and_licence(tmp_path):
    """Builds the wheel (~10 s) and reads its file list."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next(tmp_path.glob("fedlit-*.whl"))).namelist())
    data = next(n.split("/")[0] for n in names if n.endswith(".data/data/share/fedlit/configs/quickstart.yaml"))
    for want in ("fedlit/backbones/fedlit-toy.json", "fedlit/backbones/weights/fedlit-toy.safetensors",
                 "fedlit/backbones/weights/fedlit-toy.metrics.json", f"{data}/data/share/fedlit/configs/quickstart.yaml",
                 f"{data}/data/share/fedlit/configs/protocols/fedtpg_cross_class.yaml"):
        assert want in names, want
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
