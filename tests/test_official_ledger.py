"""The ledger audit: every cell of every table in configs/official/ (FedPGP Tables 1, 2, 5; FedTPG's three
tables; pFedPG's; each method's default script) resolves — through its real `fedlit fit` command, parsed and
instantiated without building a model — to the official settings written there with their source, or to a
departure listed there with its reason."""

from __future__ import annotations

import math

import pytest
from official_ledger import argv_of, departures, expand_source, ledgers, resolve, settings

LEDGERS = ledgers()
CELLS = [(name, method, column) for name, led in LEDGERS.items()
         for method in led["cells"] for column in led["columns"]]
_CACHE: dict[tuple, dict] = {}


def resolved(name: str, method: str, column: str) -> dict:
    key = tuple(argv_of(LEDGERS[name], method, column))
    if key not in _CACHE:
        _CACHE[key] = resolve(list(key))
    return _CACHE[key]


def same(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, list) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return got == want


def audit(name: str, method: str, column: str) -> list[str]:
    """Every difference between a cell's resolved settings and the ledger that no departure explains."""
    led = LEDGERS[name]
    got, allowed, wrong = resolved(name, method, column), departures(led, method, column), []
    official = settings(led, method, column)
    for key, d in allowed.items():  # a departure for a setting the ledger has no row for: its own official value
        official.setdefault(key, (d["official"], d["why"]))
    for key, (value, _) in official.items():
        if key in allowed:
            d = allowed[key]
            if not same(d["official"], value):
                wrong.append(f"{key}: the departure's official {d['official']!r} is not the ledger's {value!r}")
            if not same(got.get(key), d["fedlit"]):
                wrong.append(f"{key}: listed as {d['fedlit']!r} ({d['why'][:40]}…), resolves to {got.get(key)!r} — "
                             f"update or delete the entry")
        elif value is None:
            continue
        elif key not in got:
            wrong.append(f"{key}: fedlit resolves no such setting (official {value!r})")
        elif not same(got[key], value):
            wrong.append(f"{key}: fedlit {got[key]!r}, official {value!r}")
    return wrong


def test_every_ledger_follows_the_schema():
    assert {"fedpgp_table1", "fedpgp_table2", "fedpgp_table5", "fedtpg", "pfedpg", "method_defaults"} <= set(LEDGERS)
    for name, led in LEDGERS.items():
        assert led["schema"] == 1 and led["source"], name
        assert led["columns"] and led["cells"], name
        for method, cell in led["cells"].items():
            assert set(cell) <= {"config", "overrides", "settings", "columns"}, (name, method)
            assert set(cell.get("columns", {})) <= set(led["columns"]), (name, method)
            for key, (value, source) in [kv for c in led["columns"] for kv in settings(led, method, c).items()]:
                assert key.split(".")[0] in ("trainer", "data", "method", "backbone"), (name, key)
                assert isinstance(source, str) and source.strip(), f"{name}/{method}/{key}: no source"
                alias = source.split(":")[0]
                if " " not in alias and ":" in source and "/" not in alias and alias not in ("paper",):
                    assert alias in led.get("refs", {}), f"{name}/{method}/{key}: unknown ref '{alias}'"
        assert "pending" not in led, f"{name}: a pending block (settings another branch was to make official)"
        for d in [*(led.get("departures") or []), *(led.get("loops") or [])]:
            assert {"cell", "key", "official", "why"} <= set(d) and ("fedlit" in d) == (d in (led.get(
                "departures") or [])), (name, d)
            assert d["why"].strip(), (name, d)
            cells = d["cell"] if isinstance(d["cell"], list) else [d["cell"]]
            assert all(c == "*" or c in led["cells"] for c in cells), (name, d)


def test_sources_expand_through_the_refs():
    led = LEDGERS["fedpgp_table1"]
    assert expand_source(led, "pgp:federated_main.py:95-98") == "TianyuCuiOvO/FedPGP@d43045b federated_main.py:95-98"
    assert expand_source(led, "paper §5") == "paper §5"


@pytest.mark.parametrize("name,method,column", CELLS, ids=[f"{n}/{m}/{c}" for n, m, c in CELLS])
def test_cell_resolves_to_the_official_settings(name, method, column):
    wrong = audit(name, method, column)
    assert not wrong, f"{name} {method} {column}: " + "; ".join(wrong)


def test_the_audit_catches_a_changed_value_and_a_stale_departure():
    """The audit itself: a ledger value that differs from what resolves, or a departure whose `fedlit` value is not
    what resolves, is reported."""
    led = LEDGERS["fedpgp_table1"]
    saved = led["cells"]["fedpgp"]["settings"]["method.rank"]
    try:
        led["cells"]["fedpgp"]["settings"]["method.rank"] = [4, "test"]
        assert any("method.rank" in w for w in audit("fedpgp_table1", "fedpgp", "dtd"))
    finally:
        led["cells"]["fedpgp"]["settings"]["method.rank"] = saved
    dep = next(d for d in led["departures"] if d["key"] == "method.num_prompts")
    dep["fedlit"] = 2
    try:
        assert any("update or delete" in w for w in audit("fedpgp_table1", "fedpgp", "dtd"))
    finally:
        dep["fedlit"] = 1


def test_table1_ledger_covers_the_driver_grid():
    from fedlit.apps.paper_results import TABLE1_DATASETS, TABLE1_METHODS

    led = LEDGERS["fedpgp_table1"]
    assert list(led["cells"]) == TABLE1_METHODS and set(led["columns"]) == set(TABLE1_DATASETS)
