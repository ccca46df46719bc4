"""Claims machinery: every comparison against hand-made results, the not-reproduced
bookkeeping, the claims-file validation, and the check stage's exit status."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmkd.claims import (
    ClaimsError,
    ResultMissing,
    compare,
    evaluate_claim,
    load_claims,
    parse_claims,
    parse_path,
    render_markdown,
    resolve_path,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- comparisons

@pytest.mark.parametrize(
    "comparison, measured, value, tol, holds",
    [
        (">", 0.3, 0.2, 0.0, True),
        (">", 0.2, 0.2, 0.0, False),
        (">", 0.19, 0.2, 0.02, True),    # slack in the paper's favour
        (">=", 0.2, 0.2, 0.0, True),
        ("<", -0.1, 0.0, 0.0, True),
        ("<", 0.05, 0.0, 0.0, False),
        ("<", 0.05, 0.0, 0.1, True),
        ("<=", 0.0, 0.0, 0.0, True),
        ("<=", 0.01, 0.0, 0.0, False),
        ("==", 0.52, 0.5, 0.05, True),
        ("==", 0.6, 0.5, 0.05, False),
        ("between", 0.3, [0.0, 0.5], 0.0, True),
        ("between", 0.55, [0.0, 0.5], 0.0, False),
        ("between", 0.55, [0.0, 0.5], 0.1, True),
        ("all >", [0.1, 0.2, 0.3], 0.0, 0.0, True),
        ("all >", [0.1, -0.2, 0.3], 0.0, 0.0, False),
        ("all >=", [0.0, 0.0], 0.0, 0.0, True),
        ("all <", [-1.0, -2.0], 0.0, 0.0, True),
        ("all <=", [-1.0, 0.5], 0.0, 0.0, False),
        ("any >", [-1.0, 0.5], 0.0, 0.0, True),
        ("any <", [1.0, 0.5], 0.0, 0.0, False),
        ("increasing", [0.1, 0.2, 0.3], None, 0.0, True),
        ("increasing", [0.1, 0.3, 0.25, 0.4], None, 0.0, False),    # one step back
        ("increasing", [0.1, 0.3, 0.25, 0.4], None, 0.1, True),     # ... within the noise band
        ("increasing", [0.1, 0.15], None, 0.1, False),              # rise not above the band
        ("increasing", [0.2, 0.2, 0.2], None, 0.0, False),          # flat is not increasing
        ("decreasing", [3.0, 2.0, 1.0], None, 0.0, True),
        ("decreasing", [3.0, 2.0, 2.5], None, 0.0, False),
    ],
)
def test_compare_against_value(comparison, measured, value, tol, holds):
    got, shown, detail = compare(comparison, measured, value, tol)
    assert got is holds
    assert detail


def test_compare_elementwise_against_list():
    assert compare("all >", [0.5, 0.6, 0.7], None, 0.0, [0.4, 0.5, 0.6])[0] is True
    assert compare("all >", [0.5, 0.6, 0.7], None, 0.0, [0.4, 0.65, 0.6])[0] is False
    assert compare("all >", [0.5, 0.6, 0.7], None, 0.1, [0.4, 0.65, 0.6])[0] is True
    with pytest.raises(ValueError):
        compare("all >", [0.5, 0.6], None, 0.0, [0.4, 0.5, 0.6])


def test_compare_scalar_against_other_measurement_and_summaries():
    # metrics.json style {"mean", "std", "values"} entries compare by their mean
    assert compare(">", {"mean": 0.8, "std": 0.1}, None, 0.0, {"mean": 0.7, "std": 0.2})[0] is True
    assert compare(">", {"mean": 0.6, "std": 0.1}, None, 0.0, {"mean": 0.7, "std": 0.2})[0] is False


def spearman_reference(x, y):
    """Plain-NumPy Spearman (no ties): Pearson correlation of the ranks."""
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def test_spearman_matches_reference_and_decides():
    x = [0.05, 0.1, 0.3, 0.2, 0.6]
    y = [0.04, 0.03, -0.01, 0.02, -0.05]
    rho_ref = spearman_reference(x, y)  # = -1.0 here: y falls exactly as x rises
    holds, rho, _ = compare("spearman <", x, -0.7, 0.0, y)
    assert rho == pytest.approx(rho_ref)
    assert holds is True
    y2 = [0.01, 0.03, -0.01, 0.05, 0.02]
    holds2, rho2, _ = compare("spearman <", x, -0.7, 0.0, y2)
    assert rho2 == pytest.approx(spearman_reference(x, y2))
    assert holds2 is False
    assert compare("spearman >", x, 0.5, 0.0, [1, 2, 4, 3, 5])[0] is True


@pytest.mark.parametrize(
    "comparison, measured, against",
    [(">", [1.0], None), ("all >", 1.0, None), ("increasing", [1.0], None), ("spearman <", [1, 2], [2, 1]),
     (">", "high", None), ("all >", [], None)],
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
    assert ok[0].expected_text() == "gain > 0"
    bad = [
        {"claims": []},
        {"claims": [claim(id="Bad Id")]},
        {"claims": [claim(), claim()]},                        # duplicate id
        {"claims": [claim(comparison="~")]},
        {"claims": [claim(value=None)]},                       # '>' needs a value
        {"claims": [claim(comparison="increasing")]},          # trend takes no value
        {"claims": [claim(comparison="spearman <", value=-0.7)]},  # needs against
        {"claims": [claim(comparison="between", value=[1, 0])]},
        {"claims": [claim(tolerance=-1)]},
        {"claims": [claim(status="not_reproduced")]},          # needs a reason
        {"claims": [claim(extra_key=1)]},
        {"claims": [claim(source={"file": "r.json"})]},
    ]
    for doc in bad:
        with pytest.raises(ClaimsError) as err:
            parse_claims(doc, tmp_path / "claims.yaml")
        assert "claims.yaml" in str(err.value)
    with pytest.raises(ClaimsError, match="not valid YAML"):
        p = tmp_path / "broken.yaml"
        p.write_text("claims: [\n")
        load_claims(p)


def loader(docs):
    def load(file):
        if file not in docs:
            raise FileNotFoundError(file)
        return docs[file]
    return load


def test_evaluate_claim_verdicts():
    c = parse_claims({"claims": [claim()]})[0]
    assert evaluate_claim(c, loader({"r.json": {"gain": 0.1}})).verdict == "reproduced"
    out = evaluate_claim(c, loader({"r.json": {"gain": -0.1}}))
    assert (out.passed, out.verdict, out.measured) == (False, "not reproduced", -0.1)
    missing = evaluate_claim(c, loader({}))
    assert (missing.passed, missing.verdict) == (False, "missing")
    assert evaluate_claim(c, loader({"r.json": {"other": 1}})).verdict == "missing"
    assert evaluate_claim(c, loader({"r.json": {"gain": [1, 2]}})).verdict == "invalid"


def test_known_not_reproduced_passes_only_while_it_still_disagrees():
    c = parse_claims({"claims": [claim(status="not_reproduced", reason="measured gain -0.1 at every seed")]})[0]
    still = evaluate_claim(c, loader({"r.json": {"gain": -0.1}}))
    assert (still.passed, still.holds, still.verdict) == (True, False, "not reproduced (known)")
    changed = evaluate_claim(c, loader({"r.json": {"gain": 0.2}}))
    assert (changed.passed, changed.holds) == (False, True)
    assert "update claims.yaml" in changed.verdict


def test_render_markdown_shows_measured_and_verdicts():
    claims = parse_claims({"claims": [claim(), claim(id="c2", status="not_reproduced", reason="why not")]})
    outs = [evaluate_claim(c, loader({"r.json": {"gain": 0.25}})) for c in claims]
    md = render_markdown(outs)
    assert "| `c1` | MFH |" in md and "0.25" in md
    assert "PASS: reproduced" in md and "FAIL: now reproduces" in md
    assert "why not" in md


# --------------------------------------------------------------------------- the repository's claims file

def test_repository_claims_file_is_valid():
    claims = load_claims(REPO / "claims.yaml")
    assert len(claims) >= 8
    papers = {c.paper for c in claims}
    assert {"MFH", "NTDH"} <= papers
    for c in claims:
        assert c.command, f"{c.id}: give the command that regenerates it"


# --------------------------------------------------------------------------- the check stage

def write_inputs(tmp_path: Path, claims_doc, results, fail_on_mismatch=True) -> list[str]:
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims_doc))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["check"] = {"claims": "claims.yaml", "fail_on_mismatch": fail_on_mismatch}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name, doc in results.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    return ["--params", str(tmp_path / "params.yaml"), "--claims", str(tmp_path / "claims.yaml"),
            "--root", str(tmp_path), "--out-dir", str(tmp_path / "reports")]


def run_check(tmp_path: Path, claims_doc, results, *extra, fail_on_mismatch=True) -> int:
    """The check stage's exit status, run in this process (as `python -m stages.check` would)."""
    from stages import check

    argv = write_inputs(tmp_path, claims_doc, results, fail_on_mismatch) + list(extra)
    old = sys.argv
    sys.argv = ["stages/check.py", *argv]
    try:
        check.main(check.run)
    except SystemExit as stop:
        return int(stop.code or 0)
    finally:
        sys.argv = old
    return 0


def test_check_stage_fails_when_an_expectation_is_flipped(tmp_path):
    results = {"data/reports/experiments/x.json": {"gain": [0.01, 0.02, 0.05], "rho": -0.9}}
    src = {"file": "data/reports/experiments/x.json", "path": "gain"}
    doc = {"claims": [
        claim(id="rises", source=src, comparison="increasing", value=None),
        claim(id="rho", source={"file": src["file"], "path": "rho"}, comparison="<", value=-0.7),
    ]}
    assert run_check(tmp_path, doc, results) == 0
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [(c["id"], c["passed"], c["measured"]) for c in report["claims"]] == [
        ("rises", True, [0.01, 0.02, 0.05]), ("rho", True, -0.9)]
    assert {"id", "expected", "measured", "passed"} <= set(report["claims"][0])

    doc["claims"][0]["comparison"] = "decreasing"  # flip one expectation
    assert run_check(tmp_path, doc, results) == 1
    report = json.loads((tmp_path / "reports" / "claims.json").read_text())
    assert [c["passed"] for c in report["claims"]] == [False, True]
    assert "FAIL" in (tmp_path / "reports" / "claims.md").read_text()

    assert run_check(tmp_path, doc, results, "--report-only") == 0
    assert run_check(tmp_path, doc, results, fail_on_mismatch=False) == 0


def test_check_stage_reports_a_broken_claims_file(tmp_path):
    assert run_check(tmp_path, {"claims": [claim(comparison="≈")]}, {}) == 2


def test_check_cli_flipping_a_repository_claim_fails(tmp_path):
    """The real command on the repository's claims file with one expectation flipped, against
    results that satisfy the original: exit status 1, and 0 for the original file."""
    claims_doc = yaml.safe_load((REPO / "claims.yaml").read_text())
    target = next(c for c in claims_doc["claims"] if c["id"] == "mfh-gamma-kd-gain-rises")
    claims_doc["claims"] = [target]
    results = {target["source"]["file"]: {"derived": {"by_general_share": {"kd_gain": [-0.02, 0.0, 0.03]}}}}
    argv = write_inputs(tmp_path, claims_doc, results)
    cmd = [sys.executable, "-m", "stages.check", *argv]
    ok = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    target["comparison"] = "decreasing"
    write_inputs(tmp_path, claims_doc, results)
    flipped = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert flipped.returncode == 1
    assert "mfh-gamma-kd-gain-rises" in flipped.stderr


# --------------------------------------------------------------------------- noisy comparisons and filtering

def summary_stat(values):
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": len(v), "values": list(v)}


def test_significance_decides_only_beyond_k_standard_errors():
    from cmkd.claims import compare_significant

    a, b = summary_stat([0.80, 0.82, 0.81]), summary_stat([0.70, 0.71, 0.69])
    se = math.sqrt(a["std"] ** 2 / 3 + b["std"] ** 2 / 3)  # by hand: both s.d. 0.01 -> se = 0.00816
    assert se == pytest.approx(math.sqrt(2 * 0.01 ** 2 / 3))
    assert compare_significant(">", a, None, 0.0, b, 2.0)[0] is True      # +0.11 >> 2 se
    assert compare_significant("<", a, None, 0.0, b, 2.0)[0] is False     # the other side, decided
    close = summary_stat([0.705, 0.715, 0.695])                           # +0.005 < 2 se
    assert compare_significant(">", close, None, 0.0, b, 2.0)[0] is None
    assert compare_significant(">", a, 0.75, 0.0, None, 2.0)[0] is True  # against a plain value
    with pytest.raises(TypeError):
        compare_significant(">", 0.8, None, 0.0, b, 2.0)


def test_inconclusive_claims_are_reported_not_failed():
    doc = {"claims": [claim(source={"file": "m.json", "path": "rows.x.f1"}, against={"file": "m.json", "path": "rows.y.f1"},
                            value=None, significance=2.0)]}
    c = parse_claims(doc)[0]
    assert "beyond 2 s.e." in c.expected_text()
    rows = {"x": {"f1": summary_stat([0.705, 0.715, 0.695])}, "y": {"f1": summary_stat([0.70, 0.71, 0.69])}}
    out = evaluate_claim(c, loader({"m.json": {"rows": rows}}))
    assert (out.passed, out.holds) == (True, None) and out.verdict.startswith("inconclusive")
    rows["x"]["f1"] = summary_stat([0.60, 0.61, 0.59])
    out = evaluate_claim(c, loader({"m.json": {"rows": rows}}))
    assert (out.passed, out.holds, out.verdict) == (False, False, "not reproduced")
    with pytest.raises(ClaimsError, match="significance"):
        parse_claims({"claims": [claim(comparison="increasing", value=None, significance=2.0)]})


def test_filter_and_empty_report():
    from cmkd.claims import filter_claims

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
    assert run_check(tmp_path, doc, results) == 1  # the experiment claim fails when all are checked


def test_optional_claims_skip_absent_results():
    c = parse_claims({"claims": [claim(optional=True)]})[0]
    out = evaluate_claim(c, loader({"r.json": {"rows": {}}}))
    assert (out.passed, out.verdict) == (True, "skipped (results absent)")
    assert evaluate_claim(c, loader({"r.json": {"gain": -1.0}})).passed is False  # present: decided as usual
    with pytest.raises(ClaimsError, match="optional"):
        parse_claims({"claims": [claim(optional="yes")]})
