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


def stored_json(tmp_path, steps=300, more_seeds=()):
    """A results JSON of seeds 0-2 (and `more_seeds` for the phase-1 rows): the phase-1 rows,
    phase 2 at s=0.3, outlier exposure."""
    rng = np.random.default_rng(1)
    phase1, phase2 = list(sweep.phase1_rows()), list(sweep.phase2_rows(0.3))
    results = {**results_of(rng, phase1, [0, 1, 2, *more_seeds]),
               **results_of(rng, phase2 + ["outlier exposure s=0.3"], [0, 1, 2])}
    runs = [{"config": {"row": row, "strength": None}, "seed": s, "metrics": m}
            for row in results for s, m in results[row].items()]
    table = {"rows": [{"kind": "id", "strength": 0.2, "source_accuracy": 0.7, "ood_auroc": 0.5}]}
    more = " ".join(map(str, more_seeds))
    setup = {"command": f"python benchmarks/near_ood_sweep.py --seeds 0 1 2 --train-steps {steps}"
             + (f" --more-seeds {more}" if more else ""), "machine": "the test's",
             "seeds": [0, 1, 2], "more_seeds": list(more_seeds), "train_steps": steps,
             "best_strength": 0.3, "total_minutes": 1.0}
    path = tmp_path / "near_ood_sweep.json"
    path.write_text(json.dumps({"setup": setup, "runs": runs, "paired": [], "nearness": {
        str(s): table for s in [0, 1, 2, *more_seeds]}}))
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


def parse(*argv):
    return sweep.build_parser().parse_args(["--seeds", "0", "1", "2", *argv])


def test_reuse_results_refuses_other_settings_and_dropping_stored_seeds(tmp_path, monkeypatch):
    path, results = stored_json(tmp_path, steps=20, more_seeds=(3, 4))
    monkeypatch.setattr(sweep, "results_path", lambda args: path)
    with pytest.raises(SystemExit, match="--train-steps 20; pass those or run without"):
        sweep.stored_results(parse("--reuse-results", "--more-seeds", "3", "4"))
    with pytest.raises(SystemExit, match="made with --seeds 0 1 2, --train-steps 20; pass"):
        sweep.stored_results(sweep.build_parser().parse_args(["--reuse-results"]))
    with pytest.raises(SystemExit, match="--more-seeds 4, which this command would drop"):
        sweep.stored_results(parse("--reuse-results", "--train-steps", "20", "--more-seeds", "3"))
    runs, nearness, setup = sweep.stored_results(
        parse("--reuse-results", "--train-steps", "20", "--more-seeds", "3", "4", "5"))
    assert runs == results and sorted(nearness) == [0, 1, 2, 3, 4]
    assert setup["machine"] == "the test's"
    assert sweep.stored_results(parse()) == ({}, {}, None)


def test_new_phase2_seeds_first_retrain_and_check_the_runs_they_lean_on(tmp_path, monkeypatch):
    """phase2() with stored phase-1 runs of seeds 0-4 and phase 2 of 0-2: seeds 3 and 4 train
    real + ID and negatives s=0.3 again (compared with the stored ones) before their phase-2
    rows; seeds 0-2 train nothing. A retrained run that measures otherwise stops the sweep."""
    _, stored = stored_json(tmp_path, more_seeds=(3, 4))
    trained = []

    def fake_run_phase(args, table, sets, pool, results, configs, seeds, keep):
        for name in table:
            for seed in seeds:
                if seed in keep.get(name, {}):
                    results.setdefault(name, {})[seed] = keep[name][seed]
                else:  # "trained": the stored measurement with another wall time
                    trained.append((name, seed))
                    m = stored.get(name, {}).get(seed, {"test_knn_auroc": 0.5})
                    results.setdefault(name, {})[seed] = {**m, "wall_seconds": -1.0}
    monkeypatch.setattr(sweep, "run_phase", fake_run_phase)
    monkeypatch.setattr(sweep, "outlier_exposure", lambda *a: trained.append(("OE", a[-2])))
    results = {}
    again = sweep.phase2(parse(), 0.3, None, None, results, {}, [0, 1, 2, 3, 4], stored, "x")
    anchors = [(sweep.REAL_ID, 3), (sweep.REAL_ID, 4), ("negatives s=0.3", 3),
               ("negatives s=0.3", 4)]
    assert again == anchors and trained[:4] == anchors
    assert sorted(trained[4:-1]) == sorted((row, s) for row in sweep.phase2_rows(0.3)
                                           for s in (3, 4))
    assert trained[-1] == ("OE", [0, 1, 2, 3, 4])
    assert results[sweep.REAL_ID][3] == stored[sweep.REAL_ID][3]  # its stored wall time kept
    stored[sweep.REAL_ID][4] = {**stored[sweep.REAL_ID][4], "test_knn_auroc": 0.123}
    real = stored[sweep.REAL_ID][4]
    monkeypatch.setattr(sweep, "run_phase", lambda args, table, sets, pool, results, configs,
                        seeds, keep: [results.setdefault(n, {}).update(
                            {s: {**real, "test_knn_auroc": 0.5} for s in seeds}) for n in table])
    with pytest.raises(SystemExit, match="real \\+ ID, seed 4, trained again here, measures "
                                         "another test_knn_auroc"):
        sweep.phase2(parse(), 0.3, None, None, {}, {}, [4], stored, "x")


def test_run_phase_trains_only_what_is_not_stored(monkeypatch):
    """run_phase with a stored run: the other rows of the seed train (its synthetic set made
    once), a seed whose every row is stored makes nothing."""
    import concurrent.futures

    class InProcess(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, workers, mp_context=None, initializer=None):
            super().__init__(workers)
    made, ran = [], []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(sweep, "synthetic_set", lambda args, seed: made.append(seed) or "syn")
    monkeypatch.setattr(sweep, "run_row", lambda args, seed, name, flags, syn:
                        ran.append((name, seed, syn)) or f"{name}-{seed}")
    monkeypatch.setattr(sweep, "seed_splits", lambda *a: None)
    monkeypatch.setattr(sweep, "measured", lambda folder, sets, splits: {"folder": folder})
    table = {"real only": ([], False), sweep.REAL_ID: (["--positives", "id"], True)}
    stored = {"real only": {0: {"stored": 1}, 1: {"stored": 2}}, sweep.REAL_ID: {1: {"s": 3}}}
    results, configs = {}, {}
    sweep.run_phase(parse(), table, None, None, results, configs, [0, 1], stored)
    assert made == [0] and ran == [(sweep.REAL_ID, 0, "syn")]
    assert results == {"real only": {0: {"stored": 1}, 1: {"stored": 2}},
                       sweep.REAL_ID: {0: {"folder": f"{sweep.REAL_ID}-0"}, 1: {"s": 3}}}
