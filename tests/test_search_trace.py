"""benchmarks/search_trace.py joins the logs of an interrupted and resumed search in the order they were written."""

from __future__ import annotations

from pathlib import Path

from conftest import load_benchmark


def _search_trace():
    return load_benchmark("search_trace")


def _write(path: Path, steps: range, tag: str) -> None:
    path.write_text("autobalance/offset/0,step\n" + "".join(f"{tag},{s}\n" for s in steps))


def test_a_resumed_search_is_read_across_its_attempts_each_cut_where_the_next_resumed(tmp_path):
    trace = _search_trace()
    _write(tmp_path / "metrics.2.csv", range(30, 50), "b")  # second attempt, resumed at 30, stopped at 49
    _write(tmp_path / "metrics.1.csv", range(0, 35), "a")  # first attempt, stopped at 34
    _write(tmp_path / "metrics.csv", range(45, 60), "c")  # the attempt that finished, resumed at 45
    _write(tmp_path / "metrics.10.csv", range(0, 0), "x")  # numbered files sort as numbers, not as text
    rows = trace.read_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == list(range(60))
    tags = [r["autobalance/offset/0"] for r in rows]
    assert tags == ["a"] * 30 + ["b"] * 15 + ["c"] * 15
    assert [p.name for p in trace.attempts(tmp_path)] == ["metrics.1.csv", "metrics.2.csv", "metrics.10.csv",
                                                          "metrics.csv"]


def test_a_search_without_a_finished_log_has_no_attempts(tmp_path):
    trace = _search_trace()
    _write(tmp_path / "metrics.1.csv", range(0, 5), "a")
    assert trace.attempts(tmp_path) == []
