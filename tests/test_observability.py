"""What researchers look at: TensorBoard (served for real), `fedlit plot` PNGs, the quickstart notebook."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedlit import checkpoint as ckpt
from fedlit.backbones import load_backbone
from fedlit.cli import main
from fedlit.data.federation import FederatedData
from fedlit.orchestrator import Orchestrator
from fedlit.trainer import FedTrainer
from fedlit.methods.promptfl import PromptFL
from fedlit.methods.zeroshot import ZeroShot

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _orchestrator(clip, federation, method, rounds: int) -> Orchestrator:
    trainer = FedTrainer(rounds=rounds, local_epochs=1, batch_size=16, checkpoint_every=1, progress=False,
                         augment="none")  # exact cached features: the runs below share one bank
    fabric = trainer.make_fabric()
    fabric.launch()
    return Orchestrator(fabric, clip, federation, method, trainer, 0, {"dataset": "shapes-dark", "backbone": "fedlit-toy"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PromptFL run of 2 rounds that was stopped after round 1 and resumed from its checkpoint, and a
    zero-shot run (4 clients, 4 shots: small and fast)."""
    root = tmp_path_factory.mktemp("obs")
    clip = load_backbone("fedlit-toy")
    federation = FederatedData(dataset="shapes-dark", num_clients=4, shots=4).setup(seed=0)
    pfl = root / "promptfl"
    first = _orchestrator(clip, federation, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01), rounds=1)
    first.fit(pfl)
    state = ckpt.load(pfl / ckpt.NAME)
    assert state.round == 1 and state.extra["cumulative_bytes"] > 0
    (pfl / "results.json").unlink()  # as if the run had been killed after round 1's checkpoint
    resumed = _orchestrator(clip, federation, PromptFL(n_ctx=4, ctx_init="a photo of a", lr=0.01), rounds=2)
    resumed.bank = first.bank  # frozen-feature cache, an exact function of the images: shared to save time
    resumed.fit(pfl, resume=state)
    zs = root / "zeroshot"
    zeroshot = _orchestrator(clip, federation, ZeroShot(), rounds=2)
    zeroshot.bank = first.bank
    zeroshot.fit(zs)
    return {"promptfl": pfl, "zeroshot": zs, "resumed": resumed}


# ------------------------------------------------------------------------------- TensorBoard
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **query) -> object:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_shows_round_metrics_comm_bytes_and_figure(runs):
    run_dir = runs["promptfl"]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--port", str(port),
                             "--host", "127.0.0.1", "--reload_interval", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, scalars, images, last = time.time() + 60, {}, {}, None
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-500:]}")
            try:
                scalars = _get(base, "/data/plugin/scalars/tags").get("tensorboard", {})
                images = _get(base, "/data/plugin/images/tags").get("tensorboard", {})
                if "eval/hm" in scalars and "eval/per_client_accuracy" in images:
                    break
            except OSError as e:  # not listening yet
                last = e
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the run within 60 s (last error: {last})")

        def series(tag):
            return [(step, value) for _, step, value in _get(base, "/data/plugin/scalars/scalars", run="tensorboard", tag=tag)]

        results = json.loads((run_dir / "results.json").read_text())
        for metric in ("local", "base", "novel", "hm"):
            got = series(f"eval/{metric}")
            assert [s for s, _ in got] == [1, 2]
            want = [h[metric] for h in results["history"]]
            assert [v for _, v in got] == pytest.approx(want, abs=1e-4)
        up, down, cum = series("transfer/bytes_up"), series("transfer/bytes_down"), series("transfer/cumulative_bytes")
        # PromptFL: 4 context vectors × width 128, fp32, to/from each of the 4 clients, every round
        per_client = 4 * 128 * 4
        assert [v for _, v in up] == [4 * per_client] * 2 and [v for _, v in down] == [4 * per_client] * 2
        # cumulative across the resume (round 2 was run by a fresh orchestrator from the round-1 checkpoint)
        assert cum == [(1, 8 * per_client), (2, 16 * per_client)]
        assert {f"eval_client/local/client_{c:03d}" for c in range(4)} <= set(scalars)

        shots = _get(base, "/data/plugin/images/images", run="tensorboard", tag="eval/per_client_accuracy")
        assert [s["step"] for s in shots] == [1, 2]
        with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{shots[-1]['query']}", timeout=10) as r:
            png = r.read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_hparams_are_flat_scalars_with_method_args_and_trainer_settings(runs):
    hp = runs["resumed"].hparams()
    assert all(isinstance(v, int | float | str | bool) for v in hp.values()), hp
    assert hp["method"] == "promptfl" and hp["method_args/n_ctx"] == 4 and hp["method_args/ctx_init"] == "a photo of a"
    assert hp["trainer/rounds"] == 2 and hp["trainer/local_epochs"] == 1 and hp["seed"] == 0
    assert not {"trainer/progress", "trainer/devices", "trainer/cache_dir"} & set(hp)  # change no number
    assert not {"identity/method", "identity/seed", "identity/dataset"} & set(hp)  # said once, not twice

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs["promptfl"] / "tensorboard"))
    ea.Reload()
    groups = sorted({t.split("/")[0] for t in ea.Tags()["scalars"]})  # TensorBoard sorts tag groups by name
    assert groups[0] == "eval" and groups.index("transfer") > groups.index("train")  # the story first
    plugin = ea.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in plugin and b"method_args/n_ctx" in plugin["_hparams_/experiment"]


def test_zero_shot_is_a_reference_line_over_the_rounds_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(runs["zeroshot"] / "tensorboard"))
    ea.Reload()
    points = [(e.step, e.value) for e in ea.Scalars("eval/local")]
    assert [p[0] for p in points] == [1, 2] and points[0][1] == points[1][1]  # one evaluation, drawn over 2 rounds


def test_a_fit_logs_its_data_settings_as_hparams(tmp_path):
    from fedlit.experiment import build, fit_parser, parse_fit

    parser = fit_parser()
    argv = ["--config", QUICK, "--data.shots", "4", "--data.num_clients", "3"]
    cfg, init = parse_fit(parser, lambda: parser.parse_args(argv))
    orch, _ = build(parser, cfg, init)
    hp = orch.hparams()
    assert hp["data/shots"] == 4 and hp["data/num_clients"] == 3 and hp["data/partition"] == "disjoint"
    assert not {"data/beta", "data/classes_per_client", "data/min_samples"} & set(hp)  # unused by a disjoint split
    assert hp["identity/config_digest"] and "identity/method" not in hp


# ------------------------------------------------------------------------------- fedlit plot
def test_fedlit_plot_writes_nonblank_pngs_and_pdfs_and_skips_unfinished(runs, tmp_path, capsys):
    from PIL import Image

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    out = tmp_path / "plots"
    rc = main(["plot", str(runs["promptfl"]), str(runs["zeroshot"]), str(unfinished), str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"skipping {unfinished}: no results.json" in err and f"skipping {tmp_path / 'nope'}: does not exist" in err
    names = sorted(p.name for p in out.iterdir())
    stems = sorted({n.rsplit(".", 1)[0] for n in names})
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("pdf", "png"))
    assert stems[:2] == ["accuracy_vs_round", "methods"]  # per-client figures are named by method, dataset, config
    assert [s.rsplit("_", 1)[0] for s in stems[2:]] == ["per_client_promptfl_shapes-dark", "per_client_zeroshot_shapes-dark"]
    for stem in stems:
        with Image.open(out / f"{stem}.png") as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert pixels.std() > 0
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # bars/lines in several colours, not a flat fill
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"


def test_fedlit_plot_without_finished_runs_is_a_one_line_error(tmp_path, capsys):
    rc = main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "plots")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no finished run") and not (tmp_path / "plots").exists()


def _result(method, seed, history, dataset="oxford_pets", backbone="ViT-B-16"):
    return {"method": method, "dataset": dataset, "backbone": backbone, "seed": seed, "_dir": f"/r/{method}-{seed}",
            "history": [{"round": i + 1, **h} for i, h in enumerate(history)], "final": history[-1],
            "per_client": {}}


def test_figures_for_a_paper_seeds_averaged_reference_lines_paper_markers_and_readable_labels():
    from fedlit.apps.plot import accuracy_figure, group_runs, methods_figure

    runs = [_result("zeroshot", 0, [{"local": 80.0, "base": 80.0, "novel": 90.0, "hm": 83.1}]),
            _result("promptfl", 1, [{"local": 85.0, "base": 85.0, "novel": 86.0, "hm": 85.3},
                                    {"local": 90.0, "base": 90.0, "novel": 88.0, "hm": 89.3}]),
            _result("promptfl", 2, [{"local": 87.0, "base": 87.0, "novel": 84.0, "hm": 86.0},
                                    {"local": 92.0, "base": 92.0, "novel": 86.0, "hm": 90.0}])]
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [("CLIP", 1), ("PromptFL", 2)]  # no run-dir names
    fig = accuracy_figure(groups)
    assert "OxfordPets" in fig._suptitle.get_text() and "ViT-B-16" in fig._suptitle.get_text()
    local = fig.axes[0]
    ref = [ln for ln in local.get_lines() if ln.get_label() == "CLIP"][0]
    assert ref.get_linestyle() == "--" and list(ref.get_ydata()) == [80.0, 80.0]  # a reference line, not a dot
    line = [ln for ln in local.get_lines() if ln.get_label() == "PromptFL"][0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [86.0, 91.0]  # mean over seeds
    assert len(local.collections) == 1  # the ± std band
    lo, hi = local.get_ylim()
    assert lo > 60 and hi < 100  # the data's range, not 0-100
    fig = methods_figure(groups)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["CLIP", "PromptFL"]  # horizontal, top to bottom
    assert [a.get_title() for a in fig.axes] == ["Local", "Base", "Novel", "HM"]  # one panel per metric
    diamonds = [ln for a in fig.axes for ln in a.get_lines() if ln.get_marker() == "D"]
    # FedPGP Table 1 (b) OxfordPets prints CLIP and PromptFL: 4 metrics each
    assert len(diamonds) == 8 and 95.12 in [ln.get_xdata()[0] for ln in diamonds]
    assert "paper" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_figures_skip_metrics_a_method_does_not_have():
    from fedlit.apps.plot import Group, methods_figure, per_client_figure

    fig = per_client_figure({"0": {"local": 50.0, "base": 40.0, "hm": 44.4}, "1": {"local": 70.0, "base": 40.0, "hm": 50.9}})
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["Local", "Base"]  # a linear-head method (pFedPG/VPT) has no Novel
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [50.0, 70.0, 40.0, 40.0]
    g = Group("pfedpg", "shapes", "fedlit-toy", [{"final": {"local": 1.0, "base": 2.0, "novel": 3.0, "hm": math.nan}}],
              label="a")
    fig = methods_figure([g])
    assert [a.get_title() for a in fig.axes] == ["Local", "Base", "Novel"]


# ------------------------------------------------------------------------------- notebook
@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """The notebook runs headless as `jupyter execute` runs it (kernel started in notebooks/), trains exactly the
    CLI quickstart's config, writes its runs under ./runs (here FEDLIT_NOTEBOOK_HOME) and prints no warning.
    Slow: the quickstart's two federations (~1 min on 2 idle cores)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import yaml

    from fedlit import experiment

    monkeypatch.setenv("FEDLIT_NOTEBOOK_HOME", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs)
    assert "| zeroshot |" in text and "| promptfl |" in text
    assert text.count("context vector 0:") == 2 and "accuracy_vs_round.png" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    warned = [o["text"] for o in outputs if o.get("name") == "stderr" and "warn" in o["text"].lower()]
    assert not warned, warned  # e.g. tqdm's "IProgress not found"
    parser = experiment.fit_parser()
    cli = yaml.safe_load(parser.dump(parser.parse_args(["--config", str(ROOT / "configs" / "quickstart.yaml")]),
                                     skip_validation=True))
    saved = yaml.safe_load((tmp_path / "runs" / "promptfl-shapes-dark-seed0" / "config.yaml").read_text())
    assert saved == cli  # the CLI quickstart's settings, not the notebook's own
    assert (tmp_path / "runs" / "zeroshot-shapes-dark-seed0" / "results.json").is_file()