"""benchmarks/same_results.py's ``compare``: which results.json differences fail a refactor (no fedlit run here)."""

from __future__ import annotations

import copy
import importlib.util
import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# loaded by path, never as ``benchmarks.same_results``: opacus' wheel installs a top-level package ``benchmarks``
_spec = importlib.util.spec_from_file_location("fedlit_benchmarks_same_results",
                                               ROOT / "benchmarks" / "same_results.py")
same = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(same)

RESULTS = {
    "method": "promptfl", "run_dir": "/tmp/a", "wall_time_s": 1.6, "selection": "best_local", "final_round": 1,
    "final": {"local": 30.5, "hm": 29.25},
    "statistics": {"best_local": {"round": 1, "local": 30.5}, "last_round": {"round": 2, "local": 29.0}},
    "history": [{"round": 1, "local": 30.5, "base": 30.5}, {"round": 2, "local": 29.0, "base": 29.125}],
    "per_client": {"0": {"local": 29.0}, "1": {"local": 48.0}}, "per_group": {}, "sync": "round",
    "optimizer_state": "chain", "images_encoded": 384,
}


def _capture(folder: Path, runs: dict[str, dict]) -> Path:
    for name, res in runs.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "results.json").write_text(json.dumps(res))
    return folder


def _compare(tmp_path, before: dict, after: dict, *extra: str) -> tuple[int, str]:
    b = _capture(tmp_path / "before", {"promptfl": before})
    a = _capture(tmp_path / "after", {"promptfl": after})
    lines = []
    rc = same.compare(b, a, *(() if not extra else (float(extra[0]),)), out=lines.append)
    return rc, "\n".join(lines)


def test_identical_runs_pass_and_wall_time_and_run_dir_are_not_compared(tmp_path):
    after = {**copy.deepcopy(RESULTS), "wall_time_s": 9.9, "run_dir": "/tmp/b"}
    rc, text = _compare(tmp_path, RESULTS, after)
    assert rc == 0, text
    assert "promptfl: same" in text and "DIFFERENT" not in text


def test_a_float_difference_in_a_nested_history_entry_fails_with_its_path(tmp_path):
    after = copy.deepcopy(RESULTS)
    after["history"][1]["base"] = 29.125000000000004  # the last bit
    rc, text = _compare(tmp_path, RESULTS, after)
    assert rc == 1
    assert "promptfl: history[1].base: before 29.125 after 29.125000000000004" in text
    assert "DIFFERENT" in text


def test_atol_lets_a_tiny_difference_pass(tmp_path):
    after = copy.deepcopy(RESULTS)
    after["history"][1]["base"] = 29.125 + 1e-9
    assert _compare(tmp_path, RESULTS, after, "1e-6")[0] == 0
    assert same.diff(1.0, 1.0 + 1e-9, 0.0) == ([("", 1.0, 1.0 + 1e-9)], [])


def test_keys_on_one_side_only_are_listed_not_failed(tmp_path):
    after = copy.deepcopy(RESULTS)
    after["plan"] = {"sync": "round"}  # a new top-level block
    after["final"]["extra"] = 1.0  # a new nested key
    del after["per_group"]  # a field the other side has
    rc, text = _compare(tmp_path, RESULTS, after)
    assert rc == 0, text
    assert "promptfl: key plan (only in after)" in text
    assert "promptfl: key final.extra (only in after)" in text
    assert "promptfl: key per_group (only in before)" in text


def test_other_changes_that_fail(tmp_path):
    after = copy.deepcopy(RESULTS)
    after["history"].pop()  # a round lost
    after["optimizer_state"] = "fresh"  # a string field
    after["images_encoded"] = 385  # an int
    rc, text = _compare(tmp_path, RESULTS, after)
    assert rc == 1
    assert "history (length): before 2 after 1" in text
    assert "optimizer_state: before 'chain' after 'fresh'" in text
    assert "images_encoded: before 384 after 385" in text
    d, _ = same.diff({"x": float("nan"), "b": True}, {"x": float("nan"), "b": 1})
    assert d == [("b", True, 1)]  # NaN equals NaN; a bool is not the number 1


def test_a_run_missing_after_fails_and_one_only_after_is_listed(tmp_path):
    b = _capture(tmp_path / "before", {"promptfl": RESULTS, "fedpgp": RESULTS})
    a = _capture(tmp_path / "after", {"promptfl": RESULTS, "newmethod": RESULTS})
    lines = []
    assert same.compare(b, a, out=lines.append) == 1
    text = "\n".join(lines)
    assert "fedpgp: MISSING" in text and "newmethod: only in" in text and "promptfl: same" in text


def test_main_exit_codes(tmp_path, capsys):
    b = _capture(tmp_path / "before", {"promptfl": RESULTS})
    after = copy.deepcopy(RESULTS)
    after["per_client"]["1"]["local"] = 47.0
    a = _capture(tmp_path / "after", {"promptfl": after})
    assert same.main(["compare", str(b), str(b)]) == 0
    assert same.main(["compare", str(b), str(a)]) == 1
    assert "promptfl: per_client.1.local: before 48.0 after 47.0" in capsys.readouterr().out
    assert same.main(["compare", str(b), str(a), "--ignore", "per_client"]) == 0


def _safetensors(path: Path, named: dict[str, list[float]]) -> None:
    """A float32 safetensors file written by hand (8-byte header size, JSON header, little-endian data)."""
    header, data = {"__metadata__": {"fedlit": "{}"}}, b""
    for name, vals in named.items():
        header[name] = {"dtype": "F32", "shape": [len(vals)], "data_offsets": [len(data), len(data) + 4 * len(vals)]}
        data += struct.pack(f"<{len(vals)}f", *vals)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _with_checkpoints(tmp_path, before: dict, after: dict) -> tuple[Path, Path]:
    b = _capture(tmp_path / "before", {"promptfl": RESULTS})
    a = _capture(tmp_path / "after", {"promptfl": RESULTS})
    _safetensors(b / "promptfl" / "checkpoint.safetensors", before)
    _safetensors(a / "promptfl" / "checkpoint.safetensors", after)
    return b, a


def test_checkpoint_tensors_are_compared_value_by_value(tmp_path):
    ctx = {"global/ctx": [0.5, -1.25, 3.0], "server/optim_chain/0/momentum_buffer": [0.0, 0.0, 1.0]}
    b, a = _with_checkpoints(tmp_path, ctx, {**ctx, "global/ctx": [0.5, -1.25, 3.0000002]})
    lines = []
    assert same.compare(b, a, out=lines.append) == 1
    assert "promptfl: checkpoint:global/ctx: 1 of 3 values differ, max |diff| 2.38e-07" in lines
    assert same.compare(b, a, 1e-6, out=[].append) == 0
    assert same.compare(b, a, ignore=("checkpoint",), out=[].append) == 0
    b2, a2 = _with_checkpoints(tmp_path / "same", ctx, ctx)
    assert same.compare(b2, a2, out=[].append) == 0


def test_checkpoint_tensor_on_one_side_is_listed_and_shape_change_fails(tmp_path):
    b, a = _with_checkpoints(tmp_path, {"global/ctx": [1.0, 2.0], "old": [1.0]},
                             {"global/ctx": [1.0, 2.0], "new": [1.0]})
    lines = []
    assert same.compare(b, a, out=lines.append) == 0
    assert "promptfl: key checkpoint:old (only in before)" in lines
    assert "promptfl: key checkpoint:new (only in after)" in lines
    b, a = _with_checkpoints(tmp_path / "shape", {"global/ctx": [1.0, 2.0]}, {"global/ctx": [1.0, 2.0, 0.0]})
    lines = []
    assert same.compare(b, a, out=lines.append) == 1
    assert any("checkpoint:global/ctx (dtype, shape)" in line for line in lines)


def test_tensors_reads_what_safetensors_writes(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    ctx = torch.tensor([[0.1, -2.0], [3.5, 1e-8]], dtype=torch.float32)
    save_file({"global/ctx": ctx, "steps": torch.tensor([3, 4], dtype=torch.int64)}, tmp_path / "c.safetensors",
              metadata={"fedlit": "{}"})
    read = same.tensors(tmp_path / "c.safetensors")
    assert read["global/ctx"][:2] == ("F32", [2, 2])
    assert same.values("F32", read["global/ctx"][2]) == tuple(ctx.flatten().tolist())
    assert same.values("I64", read["steps"][2]) == (3, 4)
