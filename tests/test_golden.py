"""Golden regression tests: every export route re-exported from its stored seeded adapter and compared with
``fixtures/golden/<case>/<route>.json`` (structure exactly, outputs within the route's tolerance).

A failure reads ``golden drift: <format> <merged|split> <case>: <what> <expected> -> <actual>`` (structure) or
``golden drift: <format> <merged|split> <case>: <output> rel err X > tol`` (outputs). If the change is intended,
regenerate with ``python -m tests.golden --regenerate`` and commit the printed changes (docs/testing.md).
"""

from __future__ import annotations

import copy
import json

import pytest

from tests import golden
from tests.conftest import require
from tests.golden import ADAPTERS, CASES, GOLDEN, ROUTES, compare, export, label, load_golden, record

REGENERATE = "python -m tests.golden --regenerate"


pytestmark = pytest.mark.filterwarnings(
    "ignore:.*aten..index:UserWarning"
)  # torch's ONNX exporter (':' would split the filter)


@pytest.mark.parametrize("case,to,split", ROUTES, ids=[f"{c}-{golden.route_name(t, s)}" for c, t, s in ROUTES])
def test_export_matches_its_golden(tmp_path, case, to, split):
    if to == "gguf":
        require("llama_cpp")
    where = label(case, to, split)
    expected = load_golden(case, to, split)
    assert expected is not None, f"golden missing: {where}: no {golden.golden_path(case, to, split)}; run {REGENERATE}"
    got = record(case, to, split, export(case, to, split, tmp_path / "out"))
    drift = compare(expected, got, where, expected["tolerance"])  # the bar reviewed with the golden record
    assert not drift, "\n".join(
        drift[:20]
        + ([f"... {len(drift) - 20} more"] if len(drift) > 20 else [])
        + [f"(intended? run {REGENERATE} and commit the result)"]
    )


def test_the_golden_matrix_is_complete_and_nothing_else_is_stored():
    stored = {p.relative_to(GOLDEN).as_posix() for p in GOLDEN.glob("*/*.json") if p.parent.name != "adapters"}
    wanted = {f"{c}/{golden.route_name(t, s)}.json" for c, t, s in ROUTES}
    assert stored == wanted, f"missing {sorted(wanted - stored)}, stale {sorted(stored - wanted)}"
    assert {p.name for p in ADAPTERS.iterdir()} == set(CASES)
    for case, (to, split) in [(c, (t, s)) for c, t, s in ROUTES]:
        rec = load_golden(case, to, split)
        assert rec["case"] == case and rec["route"] == golden.route_name(to, split)
        assert rec["structure"] and rec["outputs"], f"{case} {to}: empty golden"
    assert not list(GOLDEN.rglob("*.png")), "plots do not belong in the goldens"
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 2_000_000, f"fixtures/golden is {total} bytes: keep it under 2 MB"


def test_routes_cover_every_format_both_ways():
    assert {(t, s) for _, t, s in ROUTES} == set(golden.ALL_ROUTES)
    assert {c.options["method"] for c in CASES.values()} == {"psoft", "oft"}


def test_stored_adapters_carry_no_machine_paths():
    for path in ADAPTERS.rglob("*.json"):
        text = path.read_text()
        assert str(golden.ROOT) not in text, f"{path} holds the path of this checkout"


# ------------------------------------------------------------------------------------------ the comparison itself


@pytest.fixture(scope="module")
def a_golden():
    return load_golden("llama-psoft", "gguf", False)


def test_structure_drift_names_the_format_the_tensor_and_both_values(a_golden):
    got = copy.deepcopy(a_golden)
    key = "model.gguf tensor blk.0.attn_q.weight type"
    got["structure"][key] = "F16"
    del got["structure"]["model.gguf key general.type"]
    got["structure"]["model.gguf key general.extra"] = 1
    lines = compare(a_golden, got, "gguf merged llama-psoft", 2e-3)
    assert lines == [
        "golden drift: gguf merged llama-psoft: model.gguf key general.extra added (1)",
        "golden drift: gguf merged llama-psoft: model.gguf key general.type removed (was model)",
        "golden drift: gguf merged llama-psoft: model.gguf tensor blk.0.attn_q.weight type F32 -> F16",
    ]


def test_output_drift_is_relative_to_the_output_scale(a_golden):
    got = copy.deepcopy(a_golden)
    out = got["outputs"]["logits"]
    scale = a_golden["outputs"]["logits"]["max_abs"]
    out["head"][3][5] += 0.5 * 2e-3 * scale  # within tolerance
    assert compare(a_golden, got, "gguf merged llama-psoft", 2e-3) == []
    out["head"][3][5] += 0.3 * scale
    (line,) = compare(a_golden, got, "gguf merged llama-psoft", 2e-3)
    assert line.startswith(
        "golden drift: gguf merged llama-psoft: logits rel err 3.0e-01 > 2e-03 (worst at position 3 [5]: "
    ), line
    got["outputs"]["logits"]["shape"] = [1, 2]
    assert compare(a_golden, got, "x", 2e-3) == [
        f"golden drift: x: logits shape {a_golden['outputs']['logits']['shape']} -> [1, 2]"
    ]


def test_golden_files_round_trip_through_the_writer(tmp_path, monkeypatch, a_golden):
    monkeypatch.setattr(golden, "GOLDEN", tmp_path)
    golden.write_golden("llama-psoft", "gguf", False, a_golden)
    assert json.loads((tmp_path / "llama-psoft" / "gguf-merged.json").read_text()) == a_golden
