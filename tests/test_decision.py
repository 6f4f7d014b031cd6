"""benchmarks/decision.py's bookkeeping: the check's verdict read from a search log, the loss found before the check
ruled, the twins' held-back scores and the agreement count. Pure functions on made-up figures, no training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def decision():
    return load_benchmark("decision")


def _twin(ce: float, err: float) -> dict:
    return {"balanced_ce": ce, "balanced_error": err}


def test_judge_agreement_both_ways(decision):
    # the check keeps the found loss and the found twin is better: agreement, decisive (2 points)
    j = decision.judge(0.50, 0.40, _twin(1.0, 0.30), _twin(0.9, 0.28))
    assert j["kept"] and j["found_better_error"] and j["agree_error"] and j["agree_ce"] and j["decisive"]
    assert j["diff_error_pp"] == pytest.approx(-2.0) and j["check_margin"] == pytest.approx(0.10)
    # the check keeps it but the found twin is worse by 3.87 points: a decisive disagreement
    j = decision.judge(1.6369, 1.6017, _twin(1.0, 0.5010), _twin(1.1, 0.5397))
    assert j["kept"] and not j["found_better_error"] and not j["agree_error"] and j["decisive"]
    assert j["diff_error_pp"] == pytest.approx(3.87)
    # the start is put back (found figure higher) and the found twin is worse: agreement
    j = decision.judge(0.40, 0.41, _twin(1.0, 0.30), _twin(1.2, 0.31))
    assert not j["kept"] and j["agree_error"] and j["agree_ce"]
    # equal figures: the found loss does not win (strictly lower needed, as CheckResult.keep)
    assert not decision.judge(0.4, 0.4, _twin(1.0, 0.3), _twin(1.0, 0.3))["kept"]


def test_judge_ties_and_margin(decision):
    # a tie in balanced error tells nothing (agree_error None), whatever the verdict; not decisive
    j = decision.judge(0.02, 0.03, _twin(0.05, 0.0), _twin(0.07, 0.0))
    assert j["diff_error_pp"] == 0 and j["agree_error"] is None and not j["decisive"] and j["agree_ce"]
    assert decision.judge(0.03, 0.02, _twin(0.05, 0.1), _twin(0.07, 0.1))["agree_error"] is None
    # exactly the margin is not decisive; just above is
    assert not decision.judge(1, 0.9, _twin(1, 0.300), _twin(1, 0.305), margin=0.5)["decisive"]
    assert decision.judge(1, 0.9, _twin(1, 0.300), _twin(1, 0.3051), margin=0.5)["decisive"]
    # balanced CE and balanced error may disagree with each other: both are reported
    j = decision.judge(1.0, 0.9, _twin(1.0, 0.30), _twin(0.95, 0.32))
    assert j["agree_ce"] and not j["agree_error"]


def test_summarize_counts_decisive_agreement(decision):
    judged = [decision.judge(1.0, 0.9, _twin(1, 0.30), _twin(1, 0.20)),   # kept, better by 10: agree, decisive
              decision.judge(1.0, 0.9, _twin(1, 0.30), _twin(1, 0.32)),   # kept, worse by 2: disagree, decisive
              decision.judge(0.9, 1.0, _twin(1, 0.30), _twin(1, 0.301)),  # put back, worse by 0.1: agree, not decisive
              decision.judge(0.9, 1.0, _twin(1, 0.30), _twin(1, 0.299)),  # put back, better by 0.1: disagree
              decision.judge(1.0, 0.9, _twin(1, 0.30), _twin(1, 0.30))]   # kept, tie: neither
    s = decision.summarize(judged)
    got = (s["cases"], s["agree_error"], s["ties"], s["decisive"], s["agree_decisive"], s["kept"])
    assert got == (5, 2, 1, 2, 1, 3)
    assert not s["target_met"]
    assert s["disagreement_cost_pp"] == pytest.approx([2.0, 0.1])
    nine_of_ten = [decision.judge(1.0, 0.9, _twin(1, 0.3), _twin(1, 0.2))] * 9 + \
        [decision.judge(1.0, 0.9, _twin(1, 0.3), _twin(1, 0.4))]
    assert decision.summarize(nine_of_ten)["target_met"]
    assert not decision.summarize(nine_of_ten[1:])["target_met"]  # 8 of 9 < 90%
    assert not decision.summarize([])["target_met"]  # nothing decisive: nothing shown


def test_last_check_reads_the_last_logged_pair(decision):
    rows = [{"autobalance/check_start": "", "autobalance/check_found": "", "step": "5"},
            {"autobalance/check_start": "0.5", "autobalance/check_found": "0.4", "step": "9"},
            {"autobalance/check_start": "", "autobalance/check_found": "", "step": "9"}]
    assert decision.last_check(rows) == (0.5, 0.4)
    assert decision.last_check(rows[:1]) is None


def test_found_tables_come_from_the_last_hyper_step(decision):
    start = {"delta": [1.0, 1.0, 1.0], "offset": [-0.1, -0.5, -2.0], "weight": [1.0, 1.0, 1.0]}
    cols = [f"autobalance/offset/{c}" for c in range(3)]
    rows = [{**dict(zip(cols, ["-0.2", "-0.6", "-2.1"])), "step": "10"},
            {**dict(zip(cols, ["-0.3", "-0.7", "-2.5"])), "step": "20"},
            {**dict(zip(cols, ["", "", ""])), "step": "25", "autobalance/check_start": "1"}]  # the check's row
    tables, step = decision.found_tables_from_log(rows, start, 3)
    assert step == 20 and tables["offset"] == [-0.3, -0.7, -2.5]
    assert tables["delta"] == start["delta"] and tables["weight"] == start["weight"]  # not searched: the start
    # 12 classes: names are zero-padded to two digits, as the callback logs them
    cols12 = [f"autobalance/offset/{c:02d}" for c in range(12)]
    start12 = {n: [0.0] * 12 for n in ("delta", "offset", "weight")}
    tables, _ = decision.found_tables_from_log([{**{c: "1.5" for c in cols12}, "step": "3"}], start12, 12)
    assert tables["offset"] == [1.5] * 12
    with pytest.raises(ValueError, match="per-class"):  # summaries only (more classes than log_max_classes)
        decision.found_tables_from_log([{"autobalance/offset/min": "0", "step": "1"}], start, 3)
    with pytest.raises(ValueError, match="misses"):
        decision.found_tables_from_log([{**dict(zip(cols, ["1", "", "2"])), "step": "1"}], start, 3)


def test_balanced_scores_average_present_classes(decision):
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])  # class 2 absent: not averaged
    s = decision.balanced_scores(logits, labels, 3)
    assert s["balanced_error"] == pytest.approx(0.25)  # class 0: 0/2, class 1: 1/2
    ce = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")
    assert s["balanced_ce"] == pytest.approx(float((ce[:2].mean() + ce[2:].mean()) / 2))
    assert s["counts"] == [2, 2, 0] and s["per_class_error"] == [0.0, 0.5, 0.0]
    assert math.isclose(s["balanced_ce"], float(ce.mean()))  # equal class sizes: the plain mean too


def test_paired_bootstrap_is_seeded_and_centred(decision):
    labels = torch.tensor([0] * 20 + [1] * 4)
    same = torch.zeros(24, dtype=torch.bool)
    b = decision.paired_bootstrap(same, same, labels, 3, draws=200)
    assert (b["lo"], b["hi"], b["p_found_better"]) == (0.0, 0.0, 0.0)  # identical twins: no difference at all
    start = torch.zeros(24, dtype=torch.bool)
    start[20:] = True  # the start twin misses every sample of class 1: balanced error 50%
    found = torch.zeros(24, dtype=torch.bool)  # the found twin none
    b = decision.paired_bootstrap(start, found, labels, 3, draws=200)
    assert b["lo"] == b["hi"] == pytest.approx(-50.0) and b["p_found_better"] == 1.0
    found[0] = True  # one error of 20 in class 0: -50 + 2.5 on average, spread by the resampling of class 0
    one = decision.paired_bootstrap(start, found, labels, 3, draws=500, seed=1)
    assert one == decision.paired_bootstrap(start, found, labels, 3, draws=500, seed=1)  # seeded
    assert -50.0 <= one["lo"] < one["hi"] <= -50.0 + 100.0 * 3 / 20 / 2


def test_metrics_files_of_a_resumed_stage_in_order(decision, tmp_path):
    for name in ("metrics.csv", "metrics.2.csv", "metrics.10.csv", "metrics.1.csv", "other.csv"):
        (tmp_path / name).write_text("step\n1\n")
    assert [p.name for p in decision.metrics_files(tmp_path)] == ["metrics.1.csv", "metrics.2.csv", "metrics.10.csv",
                                                                  "metrics.csv"]
    (tmp_path / "metrics.csv").unlink()  # resumed after the last epoch: the new attempt logged nothing
    assert [p.name for p in decision.metrics_files(tmp_path)][-1] == "metrics.10.csv"


def test_combine_judges_every_finished_case_anew(decision, tmp_path):
    def seed(s, start, found, err_start, err_found):
        return {"seed": s, "check_start": start, "check_found": found,
                "twins": {"start": {"held_back": _twin(1.0, err_start)}, "found": {"held_back": _twin(1.0, err_found)}}}
    a = [seed(0, 1.0, 0.9, 0.30, 0.40), {"seed": 1, "failure": "x"}]  # kept, worse by 10: disagree; a failure
    b = [seed(0, 0.9, 1.0, 0.30, 0.40), seed(1, 0.9, 1.0, 0.3, 0.3)]   # put back, worse by 10: agree; a tie
    (tmp_path / "a.json").write_text(json.dumps({"seeds": a}))
    (tmp_path / "b.json").write_text(json.dumps({"seeds": b}))
    lines, data = decision.combine([tmp_path / "a.json", tmp_path / "b.json"])
    s = data["summary"]
    assert (s["cases"], s["ties"], s["decisive"], s["agree_decisive"]) == (3, 1, 2, 1)
    assert [c["report"] for c in data["cases"]] == ["a", "b", "b"]
    assert any("1/2" in line and "not met" in line for line in lines)
