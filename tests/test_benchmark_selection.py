"""The benchmarks' grid selection: a grid point chosen on the upper split by balanced or worst-class error, and the
evidence script reading the retrained chosen points back as methods of their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


def _load(name: str):
    return load_benchmark(name)


def _point(name: str, per_class: list[float], counts: list[int], ce: float = 1.0) -> dict:
    present = [e for e, n in zip(per_class, counts) if n > 0]
    return {"point": name, "preset": name.split("_")[0], "upper_per_class_error": per_class, "upper_counts": counts,
            "upper_balanced_error": sum(present) / len(present), "upper_balanced_ce": ce}


def test_worst_class_selection_picks_the_lowest_worst_class_among_classes_present():
    quality = _load("quality")
    counts = [5, 3, 0]  # the third class has no upper image: its 0/1 error must not count
    points = [_point("la_tau1", [0.0, 0.6, 1.0], counts),      # balanced 0.30, worst 0.6
              _point("la_tau1.5", [0.2, 0.5, 0.0], counts),    # balanced 0.35, worst 0.5
              _point("la_tau2", [0.5, 0.5, 0.0], counts)]      # balanced 0.50, worst 0.5 (tie, loses on balanced)
    assert quality._choose(points, "balanced_error")["point"] == "la_tau1"
    assert quality._choose(points, "worst_class")["point"] == "la_tau1.5"
    assert quality._upper_worst(points[0]) == 0.6
    legacy = {**points[0], "upper_upper_counts": points[0].pop("upper_counts")}  # results written before the rename
    assert quality._upper_worst(legacy) == 0.6


def _result(path: Path, method: str, per_class: list[float]) -> None:
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(
        {"method": method, "balanced_error": sum(per_class) / len(per_class), "worst_class_error": max(per_class),
         "per_class_error": per_class}))


def test_evidence_reads_the_retrained_grid_choices(tmp_path: Path):
    evidence = _load("evidence")
    seed = tmp_path / "seed_0"
    _result(seed / "autobalance", "autobalance", [0.1, 0.5])
    _result(seed / "la", "la", [0.2, 0.4])
    _result(seed / "grid_retrain" / "la_tau1.5" / "la", "la", [0.3, 0.2])
    (seed / "grid").mkdir()
    (seed / "grid" / "summary.json").write_text(json.dumps(
        {"seed": 0, "select": "worst_class", "points": [], "chosen": {"la": {"point": "la_tau1.5"}}}))
    rows = evidence.load(tmp_path)
    assert rows[0]["la"]["per_class_error"] == [0.2, 0.4]
    assert rows[0]["grid_la"]["per_class_error"] == [0.3, 0.2]  # the retrained choice, not the la stage
    table = evidence.versus(tmp_path, "grid_la", None, per_class=True)
    assert "| worst-class error | 50.00 ± nan | 30.00 ± nan | 20.00 ± nan | +20.00 |" in table
    assert "| 0 | 10.0 | 30.0 | -20.00 ± nan |" in table and "| 1 | 50.0 | 20.0 | 30.00 ± nan |" in table


def test_evidence_pairs_the_one_phase_row_when_asked(tmp_path: Path):
    evidence = _load("evidence")
    _result(tmp_path / "seed_0" / "one_phase", "one_phase", [0.1, 0.3])
    _result(tmp_path / "seed_0" / "la", "la", [0.2, 0.4])
    table = evidence.versus(tmp_path, "la", None, method="one_phase")
    assert "| metric | AutoBalance one-phase | la |" in table
    assert "| balanced error | 20.00 ± nan | 30.00 ± nan | -10.00 ± nan | -10.00 |" in table
    with pytest.raises(SystemExit, match="'autobalance' row"):  # the default row is absent from these runs
        evidence.versus(tmp_path, "la", None)


def test_a_grid_run_without_autobalance_reports_no_autobalance_row(tmp_path: Path):
    import argparse

    quality = _load("quality")
    args = argparse.Namespace(methods=["la"], seeds=[0], la_taus=[1.0], vs_gammas=[], vs_taus=[],
                              grid_select="worst_class", search_epochs=2, retrain_epochs=2,
                              runs_dir=str(tmp_path), name="grid_only")
    chosen = {"la": {"point": "la_tau1", "command": "lightning-autobalance pipeline ..."}}
    summaries = {0: {"chosen": chosen, "points": [_point("la_tau1", [0.2, 0.4], [5, 3])]}}
    result = {"balanced_error": 0.3, "worst_class_error": 0.4, "time_s": 1.0, "grid_images": 10, "grid_epochs": 2}
    grid_rows = {"grid_la": {0: result}}
    labels = {**quality.LABELS, "grid_la": "LA, tau from the grid"}
    md = "\n".join(quality.grid_section(args, {}, grid_rows, summaries, labels))
    assert quality.LABELS[quality.AUTOBALANCE] not in md
    assert "| LA, tau from the grid | 1/1 | 30.00 |" in md
    args.methods = [quality.AUTOBALANCE, "la"]  # with AutoBalance run, its row is there (0/1 when it failed)
    md = "\n".join(quality.grid_section(args, {}, grid_rows, summaries, labels))
    assert f"| {quality.LABELS[quality.AUTOBALANCE]} | 0/1 |" in md


def test_the_report_json_pairs_by_seed_as_the_runs_folder_does(tmp_path: Path):
    quality, evidence = _load("quality"), _load("evidence")
    for s, (ab, la) in enumerate([([0.1, 0.5], [0.1, 0.3]), ([0.3, 0.3], [0.0, 0.2])]):
        _result(tmp_path / "runs" / f"seed_{s}" / "autobalance", "autobalance", ab)
        _result(tmp_path / "runs" / f"seed_{s}" / "la", "la", la)
    rows = {m: {s: evidence.load(tmp_path / "runs")[s][m] for s in (0, 1)} for m in ("autobalance", "la")}
    rows["la"][2] = {"failure": {"error": "killed"}}  # a failed seed is left out of the record
    record = quality.per_seed_record(rows, "python benchmarks/quality.py ...", {0: [9, 1], 1: [9, 1]})
    assert sorted(record["seeds"]) == ["0", "1"] and record["class_counts"]["1"] == [9, 1]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(record))
    from_json = evidence.versus(path, "la", None, per_class=True)
    from_runs = evidence.versus(tmp_path / "runs", "la", None, per_class=True)
    assert from_json.split("\n", 1)[1] == from_runs.split("\n", 1)[1]  # all but the line naming the source
    assert "| balanced error | 30.00 ± 0.00 | 15.00 ± 5.00 | 15.00 ± 5.00 | +10.00, +20.00 |" in from_json
    md = "\n".join(quality.per_seed_section(rows, quality.LABELS, "report.json"))
    assert "| logit adjustment | 20.00 / 30.00 | 10.00 / 20.00 |" in md


def test_the_search_model_section_puts_the_search_model_beside_the_kept_one():
    quality = _load("quality")
    upper = {"per_class_ce": [0.5, 1.5], "per_class_error": [0.0, 1.0], "counts": [20, 2], "balanced_error": 0.5}
    start = {"per_class_ce": [0.25, 1.0], "per_class_error": [0.0, 0.5], "counts": [20, 2], "balanced_error": 0.25}
    rows = {quality.SEARCH_MODEL: {s: {"per_class_error": [0.9 - 0.2 * s, 0.1], "upper": upper, "start_upper": start}
                                   for s in (0, 1)},
            quality.AUTOBALANCE: {0: {"per_class_error": [0.7, 0.2]}, 1: {"per_class_error": [0.5, 0.2]}},
            "la": {0: {"per_class_error": [0.3, 0.6]}}}  # LA lacks seed 1: no LA column, rather than a mean of one
    md = "\n".join(quality.search_model_section(rows, {0: [100, 10], 1: [100, 10]}))
    assert "retrained: test error %" in md and "LA: test error %" not in md
    assert "| 0 | 100 | 20 | 0.50 | 0.0 | 0.25 | 0.0 | 80.0 | 60.0 |" in md
    assert "| 1 | 10 | 2 | 1.50 | 100.0 | 1.00 | 50.0 | 10.0 | 20.0 |" in md
    # seed by seed on the upper split: balanced CE, largest class CE, balanced error, worst-class error
    assert "| 1 | start (no search) | 0.625 | 1.000 | 25.00 | 50.00 |" in md
    assert "| 1 | search model | 1.000 | 1.500 | 50.00 | 100.00 |" in md
