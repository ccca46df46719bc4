"""Claims machinery: every comparison against hand-made results and scipy's tests, the
verdicts and expected verdicts, configurations, the claims-file validation, and the check
stage: a changed verdict is reported loudly and exits 0, `--strict` exits 1 on it (the form
every regression guard here uses), missing or unreadable results are `not_run`. (Calibration under
the null: tests/test_claims_calibration.py.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from cmkd.reporting.claims import (
    ClaimsError,
    ResultMissing,
    compare,
    evaluate_claim,
    load_claims,
    params_hash,
    parse_claims,
    parse_path,
    record_configuration,
    render_markdown,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- comparisons

def sample(values, seeds=None):
    v = np.asarray(values, dtype=float)
    out = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
           "values": v.tolist()}
    if seeds is not None:
        out["seeds"] = list(seeds)
    return out


@pytest.mark.parametrize(
    "comparison, measured, value, tol, verdict",
    [
        (">", 0.3, 0.2, 0.0, "reproduced"),
        (">", 0.2, 0.2, 0.0, "not_reproduced"),
        (">", 0.19, 0.2, 0.02, "reproduced"),    # slack in the paper's favour (exact numbers)
        (">=", 0.2, 0.2, 0.0, "reproduced"),
        ("<", -0.1, 0.0, 0.0, "reproduced"),
        ("<", 0.05, 0.0, 0.0, "not_reproduced"),
        ("<=", 0.01, 0.0, 0.0, "not_reproduced"),
        ("==", 0.52, 0.5, 0.05, "reproduced"),
        ("==", 0.6, 0.5, 0.05, "not_reproduced"),
        ("between", 0.3, [0.0, 0.5], 0.0, "reproduced"),
        ("between", 0.55, [0.0, 0.5], 0.0, "not_reproduced"),
        ("all >", [0.1, 0.2, 0.3], 0.0, 0.0, "reproduced"),
        ("all >", [0.1, -0.2, 0.3], 0.0, 0.0, "not_reproduced"),
        ("any >", [-1.0, 0.5], 0.0, 0.0, "reproduced"),
        ("any <", [1.0, 0.5], 0.0, 0.0, "not_reproduced"),
        ("increasing", [0.1, 0.2, 0.3], None, 0.0, "reproduced"),
        ("increasing", [0.1, 0.3, 0.25, 0.4], None, 0.0, "not_reproduced"),    # one step back
        ("increasing", [0.1, 0.3, 0.25, 0.4], None, 0.1, "reproduced"),        # ... within the tolerance
        ("decreasing", [3.0, 2.0, 1.0], None, 0.0, "reproduced"),
    ],
)
def test_exact_numbers_compare_as_written(comparison, measured, value, tol, verdict):
    got, shown, detail, st = compare(comparison, measured, value, tol)
    assert got == verdict
    assert detail


def test_one_sample_threshold_matches_scipy_and_decides_three_ways():
    x = [0.12, 0.15, 0.13, 0.14, 0.125]
    p_ref = stats.ttest_1samp(x, 0.10, alternative="greater").pvalue
    verdict, shown, _, st = compare(">", sample(x), 0.10, 0.0)
    assert st["p"] == pytest.approx(p_ref) and st["test"] == "one-sample t" and st["df"] == 4
    assert p_ref < 0.05 and verdict == "reproduced" and shown == pytest.approx(np.mean(x))
    assert compare("<", sample(x), 0.10, 0.0)[0] == "not_reproduced"   # significant the other way
    assert compare(">", sample([0.08, 0.13, 0.10, 0.12, 0.07]), 0.10, 0.0)[0] == "inconclusive"
    assert compare(">", sample([0.5]), 0.1, 0.0)[0] == "inconclusive"  # one seed cannot be tested
    # a summary without values: its standard error
    assert compare(">", {"mean": 0.2, "sem": 0.01, "n": 5}, 0.1, 0.0)[3]["p"] == pytest.approx(stats.t.sf(10.0, 4))


def test_pairwise_is_paired_by_seed_else_welch():
    a, b = [0.71, 0.75, 0.69, 0.80, 0.72], [0.70, 0.73, 0.68, 0.78, 0.71]
    verdict, _, _, st = compare(">", sample(a), None, 0.0, sample(b))
    assert st["test"] == "paired t"
    assert st["p"] == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue)
    assert verdict == "reproduced"
    # the same numbers unpaired: Welch's test, which the seed-to-seed spread makes inconclusive
    verdict, _, _, st = compare(">", sample(a), None, 0.0, sample(b), paired=False)
    assert st["test"] == "Welch t"
    assert st["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    assert verdict == "inconclusive"
    # seeds align the pairs, whatever their order
    shuffled = sample([b[i] for i in (4, 2, 0, 1, 3)], seeds=["4", "2", "0", "1", "3"])
    assert compare(">", sample(a, seeds=["0", "1", "2", "3", "4"]), None, 0.0, shuffled)[3]["p"] == pytest.approx(
        stats.ttest_rel(a, b, alternative="greater").pvalue)


def test_all_is_intersection_union_and_any_bonferroni():
    strong, null = sample([0.3, 0.32, 0.29, 0.31, 0.33]), sample([0.01, -0.02, 0.02, -0.01, 0.0])
    assert compare("all >", [strong, strong], 0.0, 0.0)[0] == "reproduced"
    assert compare("all >", [strong, null], 0.0, 0.0)[0] == "inconclusive"
    assert compare("all >", [strong, sample([-0.3, -0.32, -0.29, -0.31, -0.33])], 0.0, 0.0)[0] == "not_reproduced"
    assert compare("any >", [null, strong], 0.0, 0.0)[0] == "reproduced"
    # element-wise against a list of samples: paired per point
    verdict, shown, detail, st = compare("all <", [sample([0.5, 0.6, 0.55]), sample([0.5, 0.6, 0.55])], None, 0.0,
                                         [sample([0.6, 0.72, 0.64]), sample([0.61, 0.7, 0.66])])
    assert verdict == "reproduced" and "2/2" in detail
    with pytest.raises(ValueError):
        compare("all >", [strong, strong], None, 0.0, [strong])


def test_trend_is_a_t_test_of_per_seed_slopes():
    rng = np.random.default_rng(0)
    x = [0.0, 0.25, 0.5, 1.0]
    seeds = rng.normal(0, 0.05, size=8)  # each seed's own level, shared by its points
    y = [[s - 0.02 * xi + rng.normal(0, 0.005) for s in seeds] for xi in x]
    points = [sample(v) for v in y]
    verdict, shown, detail, st = compare("decreasing", points, None, 0.0, x=x)
    slopes = [np.polyfit(x, [y[p][k] for p in range(4)], 1)[0] for k in range(8)]
    assert st["slope"] == pytest.approx(np.mean(slopes))
    assert st["p"] == pytest.approx(stats.ttest_1samp(slopes, 0.0, alternative="less").pvalue)
    assert verdict == "reproduced" and shown == pytest.approx([np.mean(v) for v in y])
    assert compare("increasing", points, None, 0.0, x=x)[0] == "not_reproduced"
    # x given per seed (e.g. a divergence measured per seed): each seed's slope on its own x
    xs = [sample([xi + 0.1 * k for k in range(8)]) for xi in x]
    st2 = compare("decreasing", points, None, 0.0, x=xs)[3]
    assert st2["slope"] == pytest.approx(st["slope"])  # a shift of x per seed leaves each slope as it is
    with pytest.raises(TypeError):
        compare("increasing", [{"mean": 0.1, "std": 0.1, "n": 3}, {"mean": 0.2, "std": 0.1, "n": 3}], None, 0.0)


def test_equivalence_and_between_on_samples():
    tight = sample([0.50, 0.51, 0.49, 0.50, 0.505])
    assert compare("==", tight, 0.5, 0.05)[0] == "reproduced"
    assert compare("between", tight, [0.4, 0.6], 0.0)[0] == "reproduced"
    assert compare("between", tight, [0.6, 0.7], 0.0)[0] == "not_reproduced"
    assert compare("==", sample([0.3, 0.7, 0.5, 0.6, 0.4]), 0.5, 0.05)[0] == "inconclusive"


@pytest.mark.parametrize(
    "comparison, measured, against",
    [(">", [1.0], None), ("all >", 1.0, None), ("increasing", [1.0], None), (">", "high", None), ("all >", [], None)],
)
def test_compare_rejects_wrong_shapes(comparison, measured, against):
    with pytest.raises((TypeError, ValueError)):
        compare(comparison, measured, 0.0, 0.0, against)


# --------------------------------------------------------------------------- JSON paths

def test_parse_and_resolve_paths():
    doc = {"a": {"b": [{"c": 1}, {"c": 2}]}, "x.y": {"z": 3}, "m": {"p": {"v": 4}, "q": {"v": 5}}}
    assert parse_path('a.b[0].c') == ["a", "b", 0, "c"]
    assert resolve_path(doc, "a.b[1].c") == 2
    assert resolve_path(doc, "a.b[-1].c") == 2
    assert resolve_path(doc, "a.b[*].c") == [1, 2]
    assert resolve_path(doc, "a.b.*.c") == [1, 2]
    assert resolve_path(doc, '["x.y"].z') == 3
    assert resolve_path(doc, "m.*.v") == [4, 5]
    with pytest.raises(ResultMissing):
        resolve_path(doc, "a.nope")
    with pytest.raises(ResultMissing):
        resolve_path(doc, "a.b[5]")
    with pytest.raises(ValueError):
        parse_path("a..b")


# --------------------------------------------------------------------------- claims file

def claim(**over):
    base = {
        "id": "c1", "paper": "MFH", "statement": "gain is positive",
        "source": {"file": "r.json", "path": "gain"}, "comparison": ">", "value": 0.0,
    }
    base.update(over)
    return base


def test_parse_claims_validates(tmp_path):
    ok = parse_claims({"claims": [claim()]})
    assert ok[0].expected_text() == "gain > 0" and ok[0].expected_verdict == "reproduced"
    bad = [
        {"claims": []},
        {"claims": [claim(id="Bad Id")]},
        {"claims": [claim(), claim()]},                        # duplicate id
        {"claims": [claim(comparison="~")]},
        {"claims": [claim(value=None)]},                       # '>' needs a value
        {"claims": [claim(comparison="increasing")]},          # trend takes no value
        {"claims": [claim(comparison="spearman <", value=-0.7)]},  # not calibrated: removed
        {"claims": [claim(comparison="between", value=[1, 0])]},
        {"claims": [claim(tolerance=-1)]},
        {"claims": [claim(expected_verdict="not_reproduced")]},  # needs a reason
        {"claims": [claim(expected_verdict="pass")]},
        {"claims": [claim(status="reproduces")]},               # replaced by expected_verdict
        {"claims": [claim(significance=2.0)]},                  # replaced by t tests
        {"claims": [claim(tests="maybe")]},
        {"claims": [claim(x={"file": "r.json", "path": "x"})]},  # x is for trends
        {"claims": [claim(depends_on=["seeds"])]},               # no recorded hash
        {"claims": [claim(extra_key=1)]},
        {"claims": [claim(source={"file": "r.json"})]},
        {"claims": [claim()], "extra": 1},
    ]
    for doc in bad:
        with pytest.raises(ClaimsError) as err:
            parse_claims(doc, tmp_path / "claims.yaml")
        assert "claims.yaml" in str(err.value)
    p = tmp_path / "broken.yaml"
    p.write_text("claims: [\n")
    with pytest.raises(ClaimsError, match="broken.yaml.*not valid YAML"):
        load_claims(p)
    from cmkd.reporting.claims import table_margins
    with pytest.raises(ClaimsError, match="broken.yaml.*not valid YAML"):
        table_margins(p)
    with pytest.raises(ClaimsError, match="missing.yaml.*file not found \\(params `check.claims` names it\\)"):
        table_margins(tmp_path / "missing.yaml")


def loader(docs):
    def load(file):
        if file not in docs:
            raise FileNotFoundError(file)
        return docs[file]
    return load


def test_verdicts_and_passed_is_agreement_with_the_expected_verdict():
    c = parse_claims({"claims": [claim()]})[0]
    out = evaluate_claim(c, loader({"r.json": {"gain": 0.1}}))
    assert (out.verdict, out.passed) == ("reproduced", True)
    out = evaluate_claim(c, loader({"r.json": {"gain": -0.1}}))
    assert (out.passed, out.verdict, out.measured) == (False, "not_reproduced", -0.1)
    missing = evaluate_claim(c, loader({}))
    assert (missing.passed, missing.verdict, missing.enforced) == (False, "not_run", True)
    assert evaluate_claim(c, loader({"r.json": {"other": 1}})).verdict == "not_run"
    invalid = evaluate_claim(c, loader({"r.json": {"gain": [1, 2]}}))
    assert invalid.verdict == "not_run" and "invalid" in invalid.detail
    known = parse_claims({"claims": [claim(expected_verdict="not_reproduced",
                                           reason="measured -0.1 at every seed")]})[0]
    assert evaluate_claim(known, loader({"r.json": {"gain": -0.1}})).passed is True
    assert evaluate_claim(known, loader({"r.json": {"gain": 0.2}})).passed is False  # now holds: noticed
    # inconclusive is its own verdict: expected only where it was recorded
    noisy = {"r.json": {"gain": sample([0.01, -0.02, 0.03, 0.0, -0.01])}}
    assert evaluate_claim(c, loader(noisy)).verdict == "inconclusive"
    assert evaluate_claim(c, loader(noisy)).passed is False
    j = evaluate_claim(c, loader(noisy)).to_json()
    assert {"verdict", "expected_verdict", "passed", "measured", "statement", "statistics"} <= set(j)


def test_optional_claims_without_results_are_not_run_and_not_enforced():
    c = parse_claims({"claims": [claim(optional=True)]})[0]
    out = evaluate_claim(c, loader({"r.json": {"rows": {}}}))
    assert (out.verdict, out.passed, out.enforced) == ("not_run", False, False)
    assert "optional" in out.note
    present = evaluate_claim(c, loader({"r.json": {"gain": -1.0}}))
    assert (present.verdict, present.enforced, present.fails_check) == ("not_reproduced", True, True)
    with pytest.raises(ClaimsError, match="optional"):
        parse_claims({"claims": [claim(optional="yes")]})


def test_configuration_hashes_decide_enforcement(tmp_path):
    params = {"runs": {"kdv1": {"temperature": 4.0}, "kdv2": {"temperature": 4.0}}, "seeds": [0, 1, 2, 3, 4]}
    assert params_hash(params, "runs.kdv1") == params_hash({"runs": {"kdv1": {"temperature": 4.0}}}, "runs.kdv1")
    assert params_hash(params, "runs.kdv1") != params_hash({"runs": {"kdv1": {"temperature": 2.0}}}, "runs.kdv1")
    text = ("# header\nconfiguration:\n  runs.kdv1: old   # the run the claim is about\n  seeds: old\n\n"
            "claims:\n  - {id: c1, paper: P, statement: s, source: {file: r.json, path: gain}, comparison: '>',"
            " value: 0.0, depends_on: [runs.kdv1, seeds]}\n")
    recorded = record_configuration(text, params)
    assert "# header" in recorded and "# the run the claim is about" in recorded
    assert f"runs.kdv1: {params_hash(params, 'runs.kdv1')}" in recorded
    c = parse_claims(yaml.safe_load(recorded))[0]
    fails = {"r.json": {"gain": -1.0}}   # a verdict that differs from the expected one
    out = evaluate_claim(c, loader(fails), params)
    assert (out.enforced, out.fails_check) == (True, True)
    explored = {**params, "runs": {**params["runs"], "kdv1": {"temperature": 2.0}}}
    out = evaluate_claim(c, loader(fails), explored)
    assert (out.enforced, out.fails_check, out.passed) == (False, False, False)
    assert out.note == "not enforced: params differ from the claim's configuration: runs.kdv1"
    other = {**params, "runs": {**params["runs"], "kdv2": {"temperature": 1.0}}}  # not a key it depends on
    assert evaluate_claim(c, loader(fails), other).enforced is True
    with pytest.raises(ClaimsError, match="lacks 'seeds'"):
        record_configuration(text.replace("  seeds: old\n", ""), params)


def test_render_markdown_counts_each_verdict():
    claims = parse_claims({"claims": [claim(), claim(id="c2", expected_verdict="not_reproduced", reason="why not"),
                                      claim(id="c3", tests="variant", paper="NTDH"),
                                      claim(id="c4", source={"file": "r.json", "path": "noisy"})]})
    docs = {"r.json": {"gain": 0.25, "noisy": sample([0.01, -0.02, 0.03, 0.0, -0.01])}}
    outs = [evaluate_claim(c, loader(docs)) for c in claims]
    md = render_markdown(outs)
    assert ("3 reproduced, 0 not reproduced, 1 inconclusive, 0 untestable, 0 not run; "
            "2 of 4 unchanged from the recorded verdicts") in md
    assert "as expected" not in md and "| recorded |" in md
    assert "| `c1` | MFH |" in md and "0.25" in md and "**CHANGED**" in md
    assert "| `c3` | NTDH | variant |" in md
    assert "why not" in md


# --------------------------------------------------------------------------- the repository's claims file

def test_repository_claims_file_is_valid_and_recorded_for_the_committed_params():
    from cmkd.config import load_params

    claims = load_claims(REPO / "claims.yaml")
    assert len(claims) >= 8
    papers = {c.paper for c in claims}
    assert {"MFH", "NTDH"} <= papers
    from cmkd.reporting.claims import NO_MARGIN, with_tuned

    params = with_tuned(load_params(REPO / "params.yaml"), yaml.safe_load((REPO / "tuned.yaml").read_text()))
    assert {"ntdh-non-target-divergence-predicts-kd": "ntdh-kd-gain-falls-with-gap"}.items() <= \
        {c.id: c.restates for c in claims if c.restates}.items()
    for c in claims:
        assert c.margin is not NO_MARGIN, f"{c.id}: name the margin of its kind of comparison"
        if c.source.file.endswith("metrics.json"):
            assert any(k.startswith("tuned.") for k, _ in c.configuration), f"{c.id}: depends on tuned.yaml"
        assert c.command, f"{c.id}: give the command that regenerates it"
        assert c.configuration, f"{c.id}: record the params it was made for (depends_on)"
        assert c.config_differences(params) == [], f"{c.id}: python -m stages check --record-configuration"
        if c.paper == "NTDH":
            assert c.tests in ("definition", "variant"), f"{c.id}: say whether it tests NTDH's definition or a variant"


# --------------------------------------------------------------------------- the check stage

def write_inputs(tmp_path: Path, claims_doc, results, params=None) -> list[str]:
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims_doc))
    params = params or yaml.safe_load((REPO / "params.yaml").read_text())
    params["check"] = {"claims": "claims.yaml"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, doc in results.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    return ["--params", str(tmp_path / "params.yaml"), "--claims", str(tmp_path / "claims.yaml"),
            "--root", str(tmp_path), "--out-dir", str(tmp_path / "reports")]


def run_check(tmp_path: Path, claims_doc, results, *extra, params=None) -> int:
    """The check stage's exit status, run in this process (as `python -m stages check` would)."""
    from stages import check

    argv = write_inputs(tmp_path, claims_doc, results, params) + list(extra)
    old = sys.argv
    sys.argv = ["stages/check.py", *argv]
    try:
        check.main(check.run)
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        sys.argv = old
    return 0


def test_check_stage_reports_a_changed_verdict_and_succeeds_strict_fails(tmp_path, caplog):
    results = {"data/reports/experiments/x.json": {"gain": [0.01, 0.02, 0.05], "rho": -0.9}}
    src = {"file": "data/reports/experiments/x.json", "path": "gain"}
    doc = {"claims": [
        claim(id="rises", source=src, comparison="increasing", value=None),
        claim(id="rho", source={"file": src["file"], "path": "rho"}, comparison="<", value=-0.7),
    ]}
    assert run_check(tmp_path, doc, results) == 0
    assert run_check(tmp_path, doc, results, "--strict") == 0
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [(c["id"], c["verdict"], c["expected_verdict"], c["passed"], c["changed"], c["measured"])
            for c in report["claims"]] == [("rises", "reproduced", "reproduced", True, False, [0.01, 0.02, 0.05]),
                                           ("rho", "reproduced", "reproduced", True, False, -0.9)]
    assert report["summary"]["verdicts"] == {"reproduced": 2, "not_reproduced": 0, "inconclusive": 0, "untestable": 0,
                                           "not_run": 0}
    unchanged_md = (tmp_path / "reports" / "claims.md").read_text()
    assert "CHANGED" not in unchanged_md and unchanged_md.startswith("# Paper claims\n\nVerdicts: ")

    doc["claims"][0]["comparison"] = "decreasing"  # the measured verdict is now not_reproduced
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_check(tmp_path, doc, results) == 0  # default: reported, never a failed stage
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [(c["passed"], c["changed"]) for c in report["claims"]] == [(False, True), (True, False)]
    assert report["summary"]["changed"] == report["summary"]["changed_enforced"] == ["rises"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rises" in w and "verdict not reproduced, recorded reproduced" in w for w in warnings), warnings
    assert not any("rho" in w for w in warnings)
    md = (tmp_path / "reports" / "claims.md").read_text()
    top = md.split("Verdicts:")[0]  # the CHANGED section comes before the table
    assert "## CHANGED: 1 verdict differs" in top and "`rises`" in top and "`rho`" not in top
    assert "**not reproduced**, recorded reproduced" in top

    assert run_check(tmp_path, doc, results, "--strict") == 1  # the same input: strict fails
    caplog.clear()
    doc["claims"][0].update(expected_verdict="not_reproduced", reason="falls, measured")
    assert run_check(tmp_path, doc, results, "--strict") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_check_stage_has_no_report_only_flag_and_rejects_the_old_params_switch(tmp_path, capsys):
    from cmkd.errors import ConfigError
    from cmkd.reporting.claims import check_params

    doc = {"claims": [claim()]}
    assert run_check(tmp_path, doc, {"r.json": {"gain": 1.0}}, "--report-only") == 2  # argparse: unknown flag
    for check, match in [({"claims": "c.yaml", "fail_on_mismatch": False}, "--strict"),
                         ({"claims": "c.yaml", "strict": True}, "unknown key"), ({"claims": 3}, "file name"),
                         (["claims.yaml"], "mapping")]:
        with pytest.raises(ConfigError, match=match):
            check_params({"check": check})
    assert check_params({"check": {"claims": "c.yaml"}}) == "c.yaml"
    assert check_params({}) == "claims.yaml"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["check"] == {"claims": "claims.yaml"}
    assert check_params(params) == "claims.yaml"
    # the stage and `python -m stages validate` stop on the removed switch with one clear line
    params["check"] = {"claims": "claims.yaml", "fail_on_mismatch": False}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages", "validate", "--params", str(tmp_path / "old.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "check.fail_on_mismatch: was removed" in proc.stderr, proc.stderr


def _unreadable_inputs(tmp_path: Path) -> dict[str, str]:
    """One claim per way its results can be unavailable; returns id -> the words its detail needs."""
    base = tmp_path / "data/reports/experiments"
    base.mkdir(parents=True, exist_ok=True)
    (base / "bad.json").write_text('{"gain": 0.1,')                 # truncated JSON
    (base / "latin1.json").write_bytes(b'{"gain": "\xe9"}')           # not UTF-8
    (base / "folder.json").mkdir(exist_ok=True)                    # a folder, not a file
    (base / "ok.json").write_text(json.dumps({"gain": 0.5, "points": [{"g": 1.0}]}))
    return {
        "missing-file": "data/reports/experiments/absent.json does not exist",
        "invalid-json": "data/reports/experiments/bad.json is not valid JSON",
        "not-utf8": "data/reports/experiments/latin1.json is not UTF-8",
        "a-folder": "data/reports/experiments/folder.json cannot be read",
        "missing-key": "data/reports/experiments/ok.json lacks rows.kd: no key 'rows'",
        "missing-index": "data/reports/experiments/ok.json lacks points.3.g: no element [3]",
        "missing-against": "data/reports/experiments/absent.json does not exist",
    }


def test_check_stage_missing_or_unreadable_results_are_not_run_not_a_crash(tmp_path):
    wants = _unreadable_inputs(tmp_path)
    d = "data/reports/experiments/"
    files = {"missing-file": "absent.json", "invalid-json": "bad.json", "not-utf8": "latin1.json",
             "a-folder": "folder.json"}
    claims = [claim(id=cid, source={"file": d + f, "path": "gain"}) for cid, f in files.items()]
    claims += [claim(id="missing-key", source={"file": d + "ok.json", "path": "rows.kd"}),
               claim(id="missing-index", source={"file": d + "ok.json", "path": "points.3.g"}),
               claim(id="missing-against", source={"file": d + "ok.json", "path": "gain"},
                     against={"file": d + "absent.json", "path": "gain"}, value=None)]
    doc = {"claims": claims}
    assert run_check(tmp_path, doc, {}) == 0
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    got = {c["id"]: c for c in report["claims"]}
    assert set(got) == set(wants)
    for cid, words in wants.items():
        c = got[cid]
        assert (c["verdict"], c["changed"], c["enforced"]) == ("not_run", True, True), c
        assert words in c["detail"], (cid, c["detail"])
    md = (tmp_path / "reports" / "claims.md").read_text()
    assert "data/reports/experiments/bad.json is not valid JSON" in md.split("Verdicts:")[0]
    assert run_check(tmp_path, doc, {}, "--strict") == 1  # enforced claims that did not run: strict fails
    # expected not_run (or optional): as expected / not enforced, so strict passes too
    for c in claims:
        c.update(expected_verdict="not_run", reason="no results on purpose")
    assert run_check(tmp_path, doc, {}, "--strict") == 0
    doc = {"claims": [claim(id="opt", source={"file": d + "bad.json", "path": "gain"}, optional=True)]}
    assert run_check(tmp_path, doc, {}, "--strict") == 0
    c = json.loads((tmp_path / "reports" / "claims.json").read_text())["claims"][0]
    assert (c["verdict"], c["changed"], c["enforced"]) == ("not_run", True, False)


def test_pipeline_artifact_lists_changed_claims_first(tmp_path):
    """The Prefect artifact `cmkd-pipeline` (flows/reports.py) heads with the changed claims of
    every check stage's claims.json, and has no such section when nothing changed."""
    from flows.reports import changed_claims, pipeline_markdown

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["toy"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    reports = tmp_path / "data" / "reports"
    (reports / "toy").mkdir(parents=True)

    def write(path, claims):
        path.write_text(json.dumps({"summary": {}, "claims": claims}))

    same = {"id": "same", "verdict": "reproduced", "expected_verdict": "reproduced", "changed": False, "enforced": True}
    write(reports / "claims.json", [same])
    write(reports / "toy" / "claims.json", [])
    stages = [{"stage": "check", "status": "ran", "seconds": 1.0, "attempts": 1}]
    assert changed_claims(tmp_path) == [] and "CHANGED" not in pipeline_markdown(tmp_path, stages)

    flipped = {"id": "flipped", "verdict": "not_reproduced", "expected_verdict": "reproduced", "changed": True,
               "enforced": True}
    gone = {"id": "gone", "verdict": "not_run", "expected_verdict": "reproduced", "changed": True, "enforced": True,
            "detail": "results unavailable: data/reports/toy/metrics.json does not exist"}
    write(reports / "claims.json", [same, flipped])
    write(reports / "toy" / "claims.json", [gone])
    md = pipeline_markdown(tmp_path, stages)
    head = md.split("## Stages")[0]
    assert "## CHANGED: 2 claim verdicts differ" in head
    assert "| flipped | not_reproduced | reproduced | True | data/reports/claims.json |" in head
    assert "| gone | not_run | reproduced | True | data/reports/toy/claims.json | results unavailable" in head
    assert "| same |" not in head


def test_check_stage_reports_a_broken_claims_file(tmp_path):
    assert run_check(tmp_path, {"claims": [claim(comparison="≈")]}, {}) == 2


def test_check_stage_under_other_params_reports_but_does_not_fail(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    doc = {"configuration": {"runs.kdv1": params_hash(params, "runs.kdv1")},
           "claims": [claim(id="kd", source={"file": "m.json", "path": "rows.kdv1.f1"},
                            against={"file": "m.json", "path": "rows.student.f1"},
                            value=None, depends_on=["runs.kdv1"])]}
    worse = {"m.json": {"rows": {"kdv1": {"f1": sample([0.5, 0.52, 0.51])},
                                 "student": {"f1": sample([0.6, 0.63, 0.61])}}}}
    assert run_check(tmp_path, doc, worse, "--strict", params=params) == 1  # the claim's configuration: enforced
    params["runs"]["kdv1"]["temperature"] = 2.0                             # dvc exp run -S runs.kdv1.temperature=2
    assert run_check(tmp_path, doc, worse, "--strict", params=params) == 0
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    c = report["claims"][0]
    assert (c["verdict"], c["passed"], c["enforced"]) == ("not_reproduced", False, False)
    assert c["note"] == "not enforced: params differ from the claim's configuration: runs.kdv1"
    assert "not enforced" in (tmp_path / "reports" / "claims.md").read_text()


def test_record_configuration_cli_rewrites_the_hashes(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    doc = {"configuration": {"seeds": "0" * 16}, "claims": [claim(depends_on=["seeds"])]}
    assert run_check(tmp_path, doc, {}, "--record-configuration", params=params) == 0
    recorded = yaml.safe_load((tmp_path / "claims.yaml").read_text())
    assert recorded["configuration"] == {"seeds": params_hash(params, "seeds")}


def test_check_cli_flipping_a_repository_claim_fails(tmp_path):
    """The real command on the repository's claims file with one expectation flipped, against
    results that satisfy the original: `--strict` exits 1 (0 for the original file); without it
    the command exits 0 and names the claim in a WARNING line."""
    claims_doc = yaml.safe_load((REPO / "claims.yaml").read_text())
    target = next(c for c in claims_doc["claims"] if c["id"] == "mfh-gamma-kd-gain-rises")
    claims_doc["claims"] = [target]
    rng = np.random.default_rng(0)
    points = [{"kd_gain": sample(0.02 * share + rng.normal(0, 0.002, 7)),
               "general_share": share} for share in (0.0, 0.5, 1.0)]
    results = {target["source"]["file"]: {"points": points}}
    argv = write_inputs(tmp_path, claims_doc, results)
    cmd = [sys.executable, "-m", "stages", "check", "--strict", *argv]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    target["comparison"] = "decreasing"
    write_inputs(tmp_path, claims_doc, results)
    flipped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert flipped.returncode == 1, flipped.stderr
    assert "mfh-gamma-kd-gain-rises" in flipped.stderr
    default = subprocess.run([c for c in cmd if c != "--strict"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert default.returncode == 0, default.stderr
    assert ("WARNING check: CHANGED mfh-gamma-kd-gain-rises: verdict not reproduced, recorded reproduced"
            in default.stderr)


def test_filter_and_empty_report():
    from cmkd.reporting.claims import filter_claims

    claims = parse_claims({"claims": [
        claim(id="a", source={"file": "data/reports/digits/metrics.json", "path": "x"}),
        claim(id="b", source={"file": "data/reports/experiments/e.json", "path": "x"}),
        claim(id="c", source={"file": "data/reports/digits/metrics.json", "path": "x"},
              against={"file": "data/reports/experiments/e.json", "path": "y"}, value=None),
    ]})
    assert [c.id for c in filter_claims(claims, "data/reports/digits/")] == ["a"]
    assert [c.id for c in filter_claims(claims, "")] == ["a", "b", "c"]
    assert "No claim reads these results" in render_markdown([], "Paper claims: sunrgbd")


def test_check_stage_with_sources_checks_only_that_table(tmp_path):
    results = {"data/reports/digits/metrics.json": {"rows": {"kd": {"f1": 0.9}}},
               "data/reports/experiments/e.json": {"gain": -1.0}}
    doc = {"claims": [claim(id="table", source={"file": "data/reports/digits/metrics.json", "path": "rows.kd.f1"}),
                      claim(id="exp", source={"file": "data/reports/experiments/e.json", "path": "gain"})]}
    assert run_check(tmp_path, doc, results, "--sources", "data/reports/digits/") == 0
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [c["id"] for c in report["claims"]] == ["table"]
    assert run_check(tmp_path, doc, results, "--strict") == 1  # the experiment claim fails when all are checked


# --------------------------------------------------------------------------- margins, inert mechanisms, restatements

def test_tables_read_the_margin_the_claims_declare(tmp_path):
    """The main tables judge rows against STUDENT with claims.yaml's `table_f1` / `table_miou`: one
    declaration, read by both (cmkd.reporting.claims.table_margins)."""
    from cmkd.reporting.claims import TABLE_MARGIN_KINDS, table_margins

    repo = Path(__file__).parents[1] / "claims.yaml"
    declared = yaml.safe_load(repo.read_text())["margins"]
    margins = table_margins(repo)
    assert set(margins) == set(TABLE_MARGIN_KINDS) == {"f1_weighted", "miou"}
    for metric, kind in TABLE_MARGIN_KINDS.items():
        assert margins[metric]["kind"] == kind and margins[metric]["value"] == declared[kind]["value"]
    assert any(c.margin.kind == "table_f1" for c in load_claims(repo))  # the same kind the table claims use
    other = tmp_path / "c.yaml"
    other.write_text(yaml.safe_dump({"margins": {"table_f1": {"value": 0.01, "reason": "r"}}}))
    assert table_margins(other) == {"f1_weighted": {"kind": "table_f1", "value": 0.01, "reason": "r"}}
    other.write_text(yaml.safe_dump({"margins": {"table_f1": {"value": -1, "reason": "r"}}}))
    with pytest.raises(ClaimsError, match="margins.table_f1.value"):
        table_margins(other)
    with pytest.raises(ClaimsError, match="check.claims"):
        table_margins(tmp_path / "missing.yaml")


def test_margin_decides_what_counts_as_an_effect():
    from cmkd.reporting.claims import decide

    # effect 1.0 +- 0.1 (df 4): beyond a margin of 0.5, not beyond one of 1.0
    assert decide(1.0, 0.1, 4, 0.5) == ("reproduced", "beyond the margin")
    assert decide(1.0, 0.1, 4, 1.0)[0] == "inconclusive"
    assert decide(1.0, 0.1, 4, 0.0) == ("reproduced", "significant")
    # a tiny but significant difference the wrong way is no effect either way: inside the margin
    assert decide(-0.037, 0.017, 41, 0.5) == ("not_reproduced", "significantly the other way")
    assert decide(0.02, 0.017, 41, 0.5) == ("not_reproduced", "inside the margin")
    assert decide(0.02, 0.017, 41, 0.0)[0] == "inconclusive"     # without a margin it cannot be decided
    assert decide(0.3, 0.3, 4, 0.5)[0] == "inconclusive"         # the interval reaches past the margin
    # exact numbers: a difference smaller than the margin is no effect
    assert compare(">", 0.3, 0.0, 0.0, margin=0.5)[0] == "not_reproduced"
    assert compare(">", 0.6, 0.0, 0.0, margin=0.5)[0] == "reproduced"
    a = sample([0.80, 0.82, 0.81, 0.79, 0.80], seeds=range(5))
    b = sample([0.798, 0.817, 0.808, 0.787, 0.798], seeds=range(5))
    assert compare(">", a, None, 0.0, b)[0] == "reproduced"                     # significant, 0.24 points
    verdict, _, detail, st = compare(">", a, None, 0.0, b, margin=0.005)
    assert (verdict, st["why"]) == ("not_reproduced", "inside the margin") and st["p_beyond_margin"] > 0.05
    # trends: the margin is on the fitted change over the sweep
    x = [0.0, 0.5, 1.0]
    pts = [sample(np.array([0.0, 0.001, -0.001, 0.002, 0.0]) + 0.004 * xi) for xi in x]
    verdict, _, _, st = compare("increasing", pts, None, 0.0, x=x, margin=0.01)
    assert verdict == "not_reproduced" and st["change_over_sweep"] == pytest.approx(0.004)
    assert compare("increasing", pts, None, 0.0, x=x)[0] == "reproduced"
    # all: every point beyond the margin
    assert compare("all >", [0.6, 0.7], 0.0, 0.0, margin=0.5)[0] == "reproduced"
    assert compare("all >", [0.6, 0.2], 0.0, 0.0, margin=0.5)[0] == "not_reproduced"


MARGINS = {"points": {"value": 0.5, "reason": "below the seed-to-seed spread"}}


def test_margins_restates_and_inert_checks_are_validated(tmp_path):
    doc = {"margins": MARGINS, "claims": [claim(margin="points"), claim(id="c2", restates="c1")]}
    c1, c2 = parse_claims(doc)
    assert (c1.margin.kind, c1.margin.value, c2.restates) == ("points", 0.5, "c1")
    bad = [
        {"margins": MARGINS, "claims": [claim(margin="accuracy")]},                     # undeclared kind
        {"margins": {"points": {"value": 0.5}}, "claims": [claim(margin="points")]},      # no reason
        {"margins": {"points": {"value": -1, "reason": "r"}}, "claims": [claim()]},
        {"margins": MARGINS, "claims": [claim(comparison="between", value=[0, 1], margin="points")]},
        {"claims": [claim(restates="nobody")]},
        {"claims": [claim(restates="c1")]},                                                # itself
        {"claims": [claim(), claim(id="c2", restates="c1"), claim(id="c3", restates="c2")]},  # a chain
        {"claims": [claim(inert_if=[{"file": "m.json", "path": "k", "equals": 1.0}])]},     # equals needs a reason
        {"claims": [claim(inert_if={"file": "m.json"})]},
    ]
    for d in bad:
        with pytest.raises(ClaimsError) as err:
            parse_claims(d, tmp_path / "claims.yaml")
        assert "claims.yaml" in str(err.value)


def test_inert_mechanism_makes_a_claim_untestable():
    rows = lambda k, mech=None: {"rows": {  # noqa: E731
        "mgkd": {"f1": sample([0.50, 0.52, 0.51]), "hyperparameters": {"k_fraction": k},
                 **({"mechanism": mech} if mech is not None else {})},
        "kdv2": {"f1": sample([0.60, 0.63, 0.61])}}}
    c = parse_claims({"margins": MARGINS, "claims": [claim(
        source={"file": "m.json", "path": "rows.mgkd.f1"}, against={"file": "m.json", "path": "rows.kdv2.f1"},
        value=None, margin="points", inert_if=[
            {"file": "m.json", "path": "rows.mgkd.hyperparameters.k_fraction", "equals": 1.0,
             "reason": "k_fraction 1.0 keeps every channel"},
            {"file": "m.json", "path": "rows.mgkd.mechanism"}])]})[0]
    active = evaluate_claim(c, loader({"m.json": rows(0.5)}))
    assert active.verdict == "not_reproduced"
    off = evaluate_claim(c, loader({"m.json": rows(1.0)}))
    assert off.verdict == "untestable" and "keeps every channel" in off.detail and "= 1" in off.detail
    assert off.statistics["verdict_if_active"] == "not_reproduced"
    recorded = evaluate_claim(c, loader({"m.json": rows(0.5, {"inert": True, "active_share": 0.0,
                                                             "reason": "every row has weight 1"})}))
    assert recorded.verdict == "untestable" and "every row has weight 1" in recorded.detail
    live = evaluate_claim(c, loader({"m.json": rows(0.5, {"inert": False, "active_share": 0.4, "reason": ""})}))
    assert live.verdict == "not_reproduced"                   # a record saying active, or none: not known inert
    j = off.to_json()
    assert j["margin"] == {"kind": "points", "value": 0.5, "reason": "below the seed-to-seed spread"}
    assert "untestable" in render_markdown([off])


def test_a_restating_claim_is_reported_but_not_counted_twice():
    from cmkd.reporting.claims import summary

    claims = parse_claims({"claims": [claim(), claim(id="c2", restates="c1"), claim(id="c3", value=1.0)]})
    outs = [evaluate_claim(c, loader({"r.json": {"gain": 0.5}})) for c in claims]
    s = summary(outs)
    assert s["verdicts"]["reproduced"] == 1 and s["verdicts"]["not_reproduced"] == 1 and s["total"] == 2
    assert s["restating"] == {"c2": "c1"} and s["checked"] == 3
    assert outs[1].to_json()["restates"] == "c1"
    md = render_markdown(outs)
    assert "(1 restating claim not counted again)" in md and "restates `c1`, not counted" in md


def test_claims_configuration_covers_tuned_selections():
    from cmkd.config import ConfigError
    from cmkd.reporting.claims import with_tuned

    params = {"runs": {"kdv1": {"temperature": 4.0}}}
    tuned = {"kdv1": {"digits": {"temperature": 3}, "synthetic": {"temperature": 1}}}
    view = with_tuned(params, tuned)
    text = ("configuration:\n  tuned.kdv1.digits: old\nclaims:\n  - {id: c1, paper: P, statement: s, "
            "source: {file: r.json, path: gain}, comparison: '>', value: 0.0, depends_on: [tuned.kdv1.digits]}\n")
    c = parse_claims(yaml.safe_load(record_configuration(text, view)))[0]
    assert c.config_differences(view) == []
    retuned = with_tuned(params, {"kdv1": {**tuned["kdv1"], "digits": {"temperature": 8}}})
    assert c.config_differences(retuned) == ["tuned.kdv1.digits"]
    other = with_tuned(params, {"kdv1": {**tuned["kdv1"], "synthetic": {"temperature": 8}}})
    assert c.config_differences(other) == []
    with pytest.raises(ConfigError, match="tuned"):
        with_tuned({"tuned": 1}, tuned)
