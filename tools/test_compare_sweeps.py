"""Tests for tools/compare_sweeps.py on two hand-written summaries."""

import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_sweeps  # noqa: E402


def write_summary(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["dataset", "finetuner", "method", "seed", "drop", "regret"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def row(method, seed, drop, regret, finetuner="sac"):
    return dict(dataset="d", finetuner=finetuner, method=method, seed=seed, drop=drop, regret=regret)


def test_means_per_group_and_the_targets(tmp_path):
    a = write_summary(tmp_path / "a" / "summary.csv", [row("smac", 1, 2.0, 0.5), row("smac", 2, 4.0, 0.7),
                                                       row("baseline", 1, 10.0, 0.8), row("baseline", 2, 10.0, 0.8)])
    b = write_summary(tmp_path / "b" / "summary.csv", [row("smac", 1, 0.0, 0.4), row("baseline", 1, 1.0, 0.8)])
    out = compare_sweeps.table(compare_sweeps.Args([a, b], metrics=["drop", "regret"]))
    assert "| d | sac | smac | a | 2 | 3 ± 1.4 | 0.6 ± 0.14 |" in out  # mean ± sample std over seeds (ddof 1)
    assert "| d | sac | smac | b | 1 | 0 ± - | 0.4 ± - |" in out  # one seed: no std
    assert "| a | sac | 3.00 | 10.00 | 0.600 | 0.800 | 25.0% |" in out  # 1 - 0.6 / 0.8
    assert "| b | sac | 0.00 | 1.00 | 0.400 | 0.800 | 50.0% |" in out
    assert out.index("| d | sac | smac | a |") < out.index("| d | sac | smac | b |")  # sweeps in the order given


def test_a_missing_column_shows_a_dash_and_bad_input_one_error(tmp_path):
    a = write_summary(tmp_path / "a" / "summary.csv", [row("smac", 1, 2.0, 0.5), row("baseline", 1, 3.0, 0.6)])
    out = compare_sweeps.table(compare_sweeps.Args([a], metrics=["drop", "kl_100"]))
    assert "| d | sac | smac | a | 1 | 2 ± - | - |" in out
    with pytest.raises(compare_sweeps.smac.SMACError, match="does not exist"):
        compare_sweeps.table(compare_sweeps.Args([str(tmp_path / "nope.csv")]))
    with pytest.raises(compare_sweeps.smac.SMACError, match="1 files but 2 labels"):
        compare_sweeps.table(compare_sweeps.Args([a], labels=["x", "y"]))
    with pytest.raises(compare_sweeps.smac.SMACError, match="give one summary.csv, not 2"):
        compare_sweeps.table(compare_sweeps.Args([a, a], readme=True))


def test_a_sweep_without_baseline_runs_shows_dashes_not_nan(tmp_path):
    a = write_summary(tmp_path / "a" / "summary.csv", [row("smac", 1, 2.0, 0.5), row("smac", 2, 4.0, 0.7)])
    out = compare_sweeps.table(compare_sweeps.Args([a], metrics=["drop"]))
    assert "| a | sac | 3.00 | - | 0.600 | - | - |" in out and "nan" not in out


def test_the_climb_targets_of_a_sweep_with_anchor_and_peer_rows(tmp_path):
    path = tmp_path / "c" / "summary.csv"
    os.makedirs(path.parent)
    fields = ["dataset", "finetuner", "method", "seed", "drop", "regret", "score_30k"]
    rows = [("d1", "sac", "smac", 1.0, 0.5, 60.0), ("d1", "sac", "smac-anchor", 0.0, 0.6, 40.0),
            ("d1", "sac", "smac-plain", 9.0, 0.7, 50.0), ("d1", "own", "iql", 3.0, 0.8, 30.0),
            ("d1", "own", "calql", 4.0, 0.625, 30.0), ("d2", "sac", "smac", 3.0, 0.3, 80.0),
            ("d2", "sac", "smac-anchor", 0.0, 0.4, 40.0), ("d2", "sac", "smac-plain", 9.0, 0.5, 70.0),
            ("d2", "own", "iql", 3.0, 0.6, 30.0), ("d2", "own", "calql", 4.0, 0.9, 30.0)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows([(d, t, m, 1, drop, regret, s30) for d, t, m, drop, regret, s30 in rows])
    out = compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop"]))
    assert "| c | sac | 2.00 | 70.0 | 40.0 (1.75x) | 60.0 |" in out
    assert "| c | d1 | sac | 0.500 ± - [0.500, 0.500] (n 1) | calql: 0.625 ± - [0.625, 0.625] (n 1) | 20% below, " \
        "untested | - |" in out  # one seed a side: no test, and the row says so
    assert "| c | d2 | sac | 0.300 ± - [0.300, 0.300] (n 1) | iql: 0.600 ± - [0.600, 0.600] (n 1) | 50% below" in out
    with open(path, "w", newline="") as f:  # a sweep in progress: calql has no d2 row yet; iql is d2's best peer
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows([(d, t, m, 1, drop, regret, s30) for d, t, m, drop, regret, s30 in rows
                          if (d, m) != ("d2", "calql")])
    out = compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop"]))
    assert "| c | d2 | sac | 0.300 ± - [0.300, 0.300] (n 1) | iql: 0.600 ± - [0.600, 0.600] (n 1) | 50% below" in out
    assert "| c | d2 | sac | 0.300 ± - [0.300, 0.300] (n 1) | calql: no run yet | - | - |" in out


def test_a_blank_score_30k_does_not_stop_the_climb_targets(tmp_path):
    path = tmp_path / "c" / "summary.csv"  # run_experiment.py leaves score_30k blank for runs shorter than 30k steps
    os.makedirs(path.parent)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "finetuner", "method", "seed", "drop", "regret", "score_30k"])
        writer.writerows([("d1", "sac", "smac", 1, 1.0, 0.5, ""), ("d1", "sac", "smac-anchor", 1, 0.0, 0.6, ""),
                          ("d1", "own", "iql", 1, 3.0, 0.8, "")])
    out = compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop", "score_30k"]))
    assert "| d1 | sac | smac | c | 1 | 1 ± - | - |" in out and "| c | sac | 1.00 | - | - | - |" in out
    assert "| iql: 0.800 ± - [0.800, 0.800] (n 1) | 38% below, untested | - |" in out


def test_smac_against_every_peer_best_first_with_welchs_test_across_seeds(tmp_path):
    rows = [row("smac", 1, 0.0, 0.40), row("smac", 2, 0.0, 0.50), row("smac", 3, 0.0, 0.45),
            row("iql", 1, 0.0, 0.80, "own"), row("iql", 2, 0.0, 0.70, "own"), row("iql", 3, 0.0, 0.75, "own"),
            row("calql", 1, 0.0, 0.90, "own"), row("calql", 2, 0.0, 0.95, "own")]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "w" / "summary.csv", rows)]))
    # by hand: means 0.45 vs 0.75, both std 0.05, n 3: t = -0.30 / sqrt(2 * 0.0025 / 3) = -7.35, df 4, p = 0.0018
    assert ("| w | d | sac | 0.450 ± 0.050 [0.400, 0.500] (n 3) | iql: 0.750 ± 0.050 [0.700, 0.800] (n 3) | "
            "40% below | t -7.35, p 0.002 |") in out
    assert out.index("| iql: 0.750") < out.index("| calql: 0.925 ± 0.035 [0.900, 0.950] (n 2) | 51% below | t -")
    one_seed = [r for r in rows if r["seed"] == 1]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "v" / "summary.csv", one_seed)]))
    assert "(n 1) | 50% below, untested | - |" in out  # one seed: no test
    better_peer = [r for r in rows if r["method"] != "calql"] + [row("calql", 1, 0.0, 0.28, "own"),
                                                                     row("calql", 2, 0.0, 0.32, "own")]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "u" / "summary.csv", better_peer)]))
    assert "| calql: 0.300 ± 0.028 [0.280, 0.320] (n 2) | 50% above |" in out  # 0.45 is 1.5x the peer's 0.30
    assert out.index("| calql: 0.300") < out.index("| iql: 0.750")  # the best peer first


def test_issue_31s_targets_rest_drops_within_the_floor_and_score_30k(tmp_path):
    fields = ["dataset", "finetuner", "method", "seed", "drop", "regret", "score_30k", "offline_at_rest",
              "offline_continuation_drop", "offline_rest_spread_std"]
    rows = []
    for seed, (rest, cont) in enumerate([("True", 1.0), ("False", 5.0)], start=4):
        for tuner in ("sac", "td3"):
            rows += [("hopper_x", tuner, "smac", seed, 0.5, 0.5, 60.0, rest, cont, 1.0),  # hopper floor 0.9: holds
                     ("hopper_x", tuner, "smac-plain", seed, 10.0, 0.4, 50.0, rest, cont, 1.0),
                     ("walker2d_x", tuner, "smac", seed, 8.0 + seed, 0.5, 70.0, rest, cont, 2.0),  # floor 6.0: no
                     ("walker2d_x", tuner, "smac-plain", seed, 20.0, 0.4, 80.0, rest, cont, 2.0)]
    path = tmp_path / "r" / "summary.csv"
    os.makedirs(path.parent)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    out = compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop"]))
    assert "| r | hopper_x | 1 of 2 | 3.0 ± 2.8 [1.0, 5.0] | 1.0 ± 0.0 [1.0, 1.0] |" in out  # one row per seed
    assert "| r | hopper_x | sac | 10.0 ± 0.0 [10.0, 10.0] | 0.5 ± 0.0 [0.5, 0.5] | 0.9 | smac |" in out
    assert "| r | walker2d_x | td3 | 20.0 ± 0.0 [20.0, 20.0] | 12.5 ± 0.7 [12.0, 13.0] | 6.0 | neither |" in out
    assert "| r | sac | 65.0 (2 datasets) | 57.7 | hopper_x: 60.0 vs 50.0; walker2d_x: 70.0 vs 80.0 |" in out
    walker_only = [r for r in rows if r[0] == "walker2d_x" and r[2] != "smac-plain"]  # a sweep in progress
    with open(path, "w", newline="") as f:
        plain_only = ("hopper_x", "sac", "smac-plain", 4, 1.0, 0.4, 50.0, "", "", "")
        csv.writer(f).writerows([fields, *walker_only, plain_only])
    out = compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop"]))
    assert "| r | walker2d_x | 1 of 2 |" in out and "| r | hopper_x | 1 of" not in out and "0 of 0" not in out
    assert "| 12.5 ± 0.7 [12.0, 13.0] | 6.0 | - |" in out  # no smac-plain run to judge: no verdict yet
    assert "| r | sac | 70.0 (1 datasets) | 57.7 | - |" in out
    no_rest = [r[:7] + ("", "", "") for r in rows]  # offline_rest.py did not run: no issue-31 tables
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([fields, *no_rest])
    assert "offline runs at rest" not in compare_sweeps.table(compare_sweeps.Args([str(path)], metrics=["drop"]))


def test_the_climb_targets_skip_a_dataset_smac_has_not_run_yet(tmp_path):
    rows = [row("smac", 1, 1.0, 0.5), row("smac-anchor", 1, 1.0, 0.6), row("iql", 1, 0.0, 0.8, "own"),
            dict(row("iql", 1, 0.0, 0.9, "own"), dataset="e")]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "c" / "summary.csv", rows)]))
    assert "| anchor score_30k" in out and "| c | e |" not in out  # e has no SMAC regret to set against iql


def test_a_peer_with_no_run_on_a_dataset_yet_is_shown_as_missing(tmp_path):
    rows = [row("smac", 1, 1.0, 0.5), row("smac", 2, 1.0, 0.6), row("iql", 1, 0.0, 0.8, "own"),
            row("iql", 2, 0.0, 0.7, "own"), dict(row("calql", 1, 0.0, 0.3, "own"), dataset="e")]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "m" / "summary.csv", rows)]))
    assert "| m | d | sac | 0.550 ± 0.071 [0.500, 0.600] (n 2) | calql: no run yet | - | - |" in out
    assert out.index("| iql: 0.750") < out.index("calql: no run yet")  # a peer with runs before one without


def test_smac_against_plain_online_in_drop_score_and_regret_with_welchs_test(tmp_path):
    rows = [row("smac", s, d, r) for s, d, r in ((1, 0.40, 0.5), (2, 0.50, 0.5), (3, 0.45, 0.6))]
    rows += [row("smac-plain", s, d, 0.5) for s, d in ((1, 0.80), (2, 0.70), (3, 0.75))]
    rows += [row("smac-plain", 1, 9.0, 0.9, "td3")]  # one seed and no smac row: no test, no mean to set against
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "p" / "summary.csv", rows)]))
    # drop, as in the peer test by hand: t -7.35, p 0.002; regret 0.533 ± 0.058 vs 0.5 ± 0: t 1.00, df 2, p 0.423
    assert "| p | d | sac | 0.5 vs 0.8 (t -7.35, p 0.002) | - | 0.533 vs 0.500 (t 1.00, p 0.423) |" in out
    assert "| p | d | td3 | - | - | - |" in out
    no_plain = [r for r in rows if r["method"] == "smac"]
    out = compare_sweeps.table(compare_sweeps.Args([write_summary(tmp_path / "q" / "summary.csv", no_plain)]))
    assert "smac vs smac-plain" not in out


def test_the_readme_table_means_over_seeds_with_peers_short_of_seeds_or_not_run_marked():
    def run(method, seed, regret, finetuner="sac", dataset="d", drop=1.0, score_30k=50.0):
        return dict(dataset=dataset, finetuner=finetuner, method=method, seed=str(seed), drop=str(drop),
                    score_30k=str(score_30k), regret=str(regret))

    rows = [run("smac", 1, 0.5, drop=2.0), run("smac", 2, 0.6, score_30k=60.0), run("smac-plain", 1, 0.7),
            run("smac-plain", 2, 0.9), run("baseline", 1, 0.8), run("baseline", 2, 0.9),
            run("iql", 1, 0.4, "own"), run("iql", 2, 0.5, "own"), run("calql", 1, 0.3, "own", dataset="e"),
            run("smac", 1, 0.7, "td3", score_30k=""), run("smac", 2, 0.9, "td3", score_30k="")]
    out = compare_sweeps.readme_table(rows).splitlines()
    assert out[0].endswith("| baseline regret | Cal-QL regret | IQL regret |") and out[1] == "|---" * 8 + "|"
    assert out[2] == "| d | SAC | 1.5 / 55.0 / 0.550 | 1.0 / 50.0 / 0.800 | not run yet | 0.850 | not run yet | 0.450 |"
    assert out[3].startswith("| d | TD3 | 1.0 / - / 0.800 | not run yet |")  # no score_30k: "-", not nan
    rows[1]["score_30k"] = ""  # a mean over fewer values than the sweep's seeds says so
    assert compare_sweeps.readme_table(rows).splitlines()[2].startswith("| d | SAC | 1.5 / 50.0 / 0.550 (1 seed) |")
    missing = " not run yet |"
    assert out[4] == "| e | SAC |" + missing * 4 + " 0.300 (1 seed) |" + missing


def test_the_readmes_results_table_is_the_committed_sweeps():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| dataset | fine-tuner | SMAC (released)"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    summary = compare_sweeps.read(os.path.join(root, "results", "handover-50k", "summary.csv"))
    assert "\n".join(lines[start:end]) == compare_sweeps.readme_table(summary)  # compare_sweeps.py SUMMARY --readme
