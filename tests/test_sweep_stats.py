"""The near-OOD sweep's statistics (benchmarks/near_ood_sweep.py): the paired t-interval and test
against scipy's paired t-test, Holm's step-down correction against a brute force of its
definition, the seed count for a target half-width, and the results JSON read back: the tables
rewritten from it, and a JSON made with other settings refused for --reuse-results."""

import json
import math
import os
import sys

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import near_ood_sweep as sweep  # noqa: E402

METRIC = sweep.PRIMARY


def results_of(rng, rows, seeds):
    """{row: {seed: {metric: value}}} with random metrics (every metric the tables show)."""
    return {row: {s: {key: float(rng.uniform(0.4, 0.7)) for key, _ in sweep.METRICS}
                  for s in seeds} for row in rows}


def test_paired_matches_scipys_paired_t_test_on_the_common_seeds():
    rng = np.random.default_rng(0)
    results = results_of(rng, ["a", "control"], range(7))
    del results["a"][3]  # a seed the row lacks: the comparison uses the other six
    c = sweep.paired(results, ["a"], "control", METRIC)[0]
    seeds = [0, 1, 2, 4, 5, 6]
    a = [results["a"][s][METRIC] for s in seeds]
    b = [results["control"][s][METRIC] for s in seeds]
    ref = stats.ttest_rel(a, b)
    lo, hi = ref.confidence_interval(0.95)
    assert c["n"] == 6
    assert c["mean_delta"] == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12)
    assert c["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    assert c["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def holm_brute_force(p, alpha=0.05):
    """Holm (1979) from its definition: with p sorted ascending, H_(i) is rejected iff
    p_(j) <= alpha / (k - j + 1) for every j <= i (1-based)."""
    k, order = len(p), np.argsort(p, kind="stable")
    rejected = np.zeros(k, bool)
    for i in range(k):
        rejected[order[i]] = all(p[order[j]] <= alpha / (k - j) for j in range(i + 1))
    return rejected


@pytest.mark.parametrize("seed", range(20))
def test_holm_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.06, size=int(rng.integers(1, 9))) ** rng.uniform(0.5, 2)
    comparisons = [{"p": float(x)} for x in p]
    sweep.holm(comparisons, key="h")
    assert [c["h"] for c in comparisons] == holm_brute_force(p).tolist()


def test_holm_stops_at_the_first_failure():
    # 0.01 <= 0.05/3 passes; 0.03 > 0.05/2 fails, so 0.04 (<= 0.05/1) is not significant either
    comparisons = [{"p": 0.04}, {"p": 0.01}, {"p": 0.03}]
    sweep.holm(comparisons)
    assert [c["holm_significant"] for c in comparisons] == [False, True, False]


@pytest.mark.parametrize("sd,half", [(0.03, 0.02), (0.03, 0.01), (0.07, 0.02), (0.005, 0.02)])
def test_seeds_for_is_the_fewest_seeds_whose_interval_is_that_narrow(sd, half):
    n = sweep.seeds_for(sd, half)
    width = lambda m: stats.t.ppf(0.975, m - 1) * sd / math.sqrt(m)  # noqa: E731
    assert width(n) <= half
    assert n == 2 or width(n - 1) > half


def stored_json(tmp_path, command="python benchmarks/near_ood_sweep.py --seeds 0 1 2"):
    """A results JSON of three seeds: the phase-1 rows, phase 2 at s=0.3, outlier exposure."""
    rng = np.random.default_rng(1)
    rows = list(sweep.phase1_rows()) + list(sweep.phase2_rows(0.3)) + ["outlier exposure s=0.3"]
    results = results_of(rng, rows, [0, 1, 2])
    runs = [{"config": {"row": row, "strength": None}, "seed": s, "metrics": m}
            for row in rows for s, m in results[row].items()]
    table = {"rows": [{"kind": "id", "strength": 0.2, "source_accuracy": 0.7, "ood_auroc": 0.5}]}
    setup = {"command": command, "machine": "test", "seeds": [0, 1, 2], "more_seeds": [],
             "train_steps": 300, "best_strength": 0.3, "total_minutes": 1.0}
    path = tmp_path / "near_ood_sweep.json"
    path.write_text(json.dumps({"setup": setup, "nearness": {str(s): table for s in range(3)},
                                "runs": runs, "paired": []}))
    return str(path), results


def test_tables_are_rewritten_from_the_stored_runs(tmp_path):
    path, results = stored_json(tmp_path)
    sweep.rewrite_tables(path)
    with open(path) as f:
        out = json.load(f)
    assert [(r["config"]["row"], r["seed"]) for r in out["runs"]] == [
        (row, s) for row in results for s in results[row]]
    # every trained row against the control, phase 2 also against s=0.3, OE against real + ID
    pairs = {(c["config"], c["versus"]) for c in out["paired"] if c["metric"] == METRIC}
    for row in sweep.phase2_rows(0.3):
        assert {(row, sweep.CONTROL), (row, "negatives s=0.3")} <= pairs
    assert ("outlier exposure s=0.3", sweep.REAL_ID) in pairs
    w4 = next(c for c in out["paired"] if c["config"] == "negatives s=0.3, w=4"
              and c["versus"] == sweep.CONTROL and c["metric"] == METRIC)
    d = [results["negatives s=0.3, w=4"][s][METRIC] - results[sweep.CONTROL][s][METRIC]
         for s in range(3)]
    assert w4["mean_delta"] == pytest.approx(np.mean(d))
    assert "holm_all_rows" in w4
    md = open(path[:-len(".json")] + ".md").read()
    assert "| negatives s=0.3, w=4 | control (w = 0) | 3 |" in md
    assert "| negatives s=0.3, w=4 | negatives s=0.3 | 3 |" in md
    assert os.path.getsize(path[:-len(".json")] + ".png") > 0


def test_reuse_results_refuses_a_json_made_with_other_settings(tmp_path, monkeypatch):
    path, results = stored_json(tmp_path, "python benchmarks/near_ood_sweep.py --train-steps 20")
    monkeypatch.setattr(sweep, "results_path", lambda args: path)
    args = sweep.build_parser().parse_args(["--reuse-results"])
    with pytest.raises(SystemExit, match="--train-steps 20; pass those or run without"):
        sweep.stored_results(args)
    args = sweep.build_parser().parse_args(["--reuse-results", "--train-steps", "20"])
    runs, nearness = sweep.stored_results(args)
    assert runs == results and sorted(nearness) == [0, 1, 2]
    assert sweep.stored_results(sweep.build_parser().parse_args([])) == ({}, {})
