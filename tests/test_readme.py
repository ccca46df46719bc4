"""The README's result blocks and docs/results.md are generated from a reports folder, byte for byte."""

import json
import re
import subprocess
import sys

import pytest

from cmkd.reporting.readme import ReadmeError, blocks, compact_claims, compact_table, replace_blocks, results_page
from cmkd.reporting.tables import markdown_table
from tests.conftest import REPO


def _stat(mean, std=0.01):
    return {"mean": mean, "std": std, "n": 3, "values": [mean] * 3}


# a report as cmkd.reporting.tables.collect builds it: the table comes from the real writer, not a copy of its format
REPORT = {
    "metric": "f1_weighted",
    "rows": {
        "teacher": {"method": "teacher", "f1_weighted": _stat(0.9)},
        "student": {"method": "supervised", "f1_weighted": _stat(0.5)},
        "at": {"method": "at", "skipped": "method 'at' needs image inputs"},
        "good": {"method": "kd", "f1_weighted": _stat(0.6, 0.02), "hyperparameters": {"temperature": 4.0},
                 "selected_on": "val",
                 "vs_student": {"mean": 0.1, "ci95": [0.05, 0.15], "p_holm": 0.0004, "verdict": "better"}},
        "bad": {"method": "dkd", "f1_weighted": _stat(0.4), "hyperparameters": {"beta": 8.0}, "selected_on": "params",
                "vs_student": {"mean": -0.1, "ci95": [-0.2, -0.01], "p_holm": 0.04, "verdict": "worse"}},
        "same": {"method": "kd", "f1_weighted": _stat(0.51), "hyperparameters": {"temperature": 2.0},
                 "selected_on": "val",
                 "vs_student": {"mean": 0.01, "ci95": [-0.02, 0.04], "p_holm": 1.0, "verdict": "indistinguishable"}},
        "close": {"method": "kd", "f1_weighted": _stat(0.501), "hyperparameters": {"temperature": 1.0},
                  "selected_on": "val",
                  "vs_student": {"mean": 0.001, "ci95": [-0.003, 0.004], "p_holm": 1.0, "verdict": "equivalent"}},
    },
    "margin": {"kind": "table_f1", "value": 0.005, "reason": "half a point"},
    "multiplicity": {"method": "holm", "alpha": 0.05, "family": ["good", "bad", "same", "close"]},
    "mde": {"power": 0.8, "alpha": 0.05, "n": 3, "rows": 4, "sd_diff": 0.02, "df_pooled": 8, "margin": 0.005,
            "effect": 0.0497, "effect_verdict": 0.09},
}
TABLE = markdown_table(REPORT, "toy", ("a", "b"))
CLAIMS = """# Paper claims

Verdicts: 1 reproduced, 1 inconclusive; 2 of 2 as expected. A verdict is `reproduced` only when ... not reproduced.

| claim | paper | tests | paper's statement | test | measured | verdict | expected | |
|---|---|---|---|---|---|---|---|---|
| `x` | MFH |  | a statement with a \\| pipe | `a > b` | 0.5 | reproduced | reproduced | ok |
| `y` | NTDH | definition | another | `c > d` | 0.1 | inconclusive | inconclusive | ok |

## Notes

- `y` (inconclusive): why.
"""
CHANGED = """# Paper claims

## CHANGED: 1 verdict differs from claims.yaml

- **CHANGED** `x`: verdict **not reproduced**, expected reproduced

A new verdict that is right is recorded in claims.yaml.

""" + CLAIMS.split("\n\n", 1)[1]
README = ("# T\n\n<!-- results:start (gen) -->\nold table\n<!-- results:end -->\n\ntext\n\n"
          "<!-- claims:start -->\nold\n<!-- claims:end -->\n\n"
          "<!-- diagnosis:start -->\nold prior\n<!-- diagnosis:end -->\n")
VALIDATION = {"summary": "The predicted KD gain is **a prior** (exploratory): SENTENCE.", "spearman_heldout": 0.3}


def _reports(tmp_path, claims=CLAIMS):
    (tmp_path / "reports" / "toy").mkdir(parents=True, exist_ok=True)
    (tmp_path / "reports" / "toy" / "table.md").write_text(TABLE)
    (tmp_path / "reports" / "claims.md").write_text(claims)
    (tmp_path / "reports" / "diagnosis").mkdir(exist_ok=True)
    (tmp_path / "reports" / "diagnosis" / "validation.json").write_text(json.dumps(VALIDATION))
    return tmp_path / "reports"


def test_compact_table_keeps_run_score_interval_and_verdict_and_drops_hyperparameters():
    compact = compact_table(TABLE, "toy/table.md")
    lines = compact.splitlines()
    assert lines[0] == "### toy: a → b (f1 weighted × 100, mean ± std over seeds)"
    table = [line for line in lines if line.startswith("|")]
    assert table[:2] == ["| run | score | vs STUDENT [95% CI] | verdict |", "|---|---|---|---|"]
    assert table[2:] == [
        "| TEACHER | 90.00 ± 1.00 |  |  |",
        "| STUDENT | 50.00 ± 1.00 |  |  |",
        "| at | n/a |  | skipped: method 'at' needs image inputs |",
        "| bad | 40.00 ± 1.00 | -10.00 [-20.00, -1.00] | worse |",
        "| close | 50.10 ± 1.00 | +0.10 [-0.30, +0.40] | equivalent |",
        "| good | 60.00 ± 2.00 | +10.00 [+5.00, +15.00] | better |",
        "| same | 51.00 ± 1.00 | +1.00 [-2.00, +4.00] | indistinguishable |",
    ]
    assert lines[-1] == "Seeds per row: 3."  # the rule, the margin and the detectable effect stay in table.md
    assert "Minimum detectable effect" in TABLE and "Minimum detectable" not in compact and ", p " not in compact
    assert "T=4" not in compact and "β=8" not in compact and "(params)" not in compact and "| kd |" not in compact


def test_compact_table_keeps_the_notes_on_inert_rows():
    note = "†1 good: mechanism inert: the mask kept every row; this row measures KD, not good's mechanism."
    marked = TABLE.replace("| good |", "| good †1 |") + "\n" + note + "\n"
    compact = compact_table(marked, "toy/table.md")
    assert "| good †1 | 60.00 ± 2.00 |" in compact
    assert compact.endswith("Seeds per row: 3.\n\n" + note)
    assert "†" not in compact_table(TABLE, "toy/table.md")


def test_compact_table_keeps_the_smoke_test_note_and_refuses_other_formats():
    note = "**Smoke test, not a result.** `toy` is a sample.\n\n"
    assert compact_table(note + TABLE, "t.md").startswith(note + "### toy: a → b")
    with pytest.raises(ReadmeError, match=r"t\.md: no heading"):
        compact_table("| a |\n|---|\n", "t.md")
    with pytest.raises(ReadmeError, match=r"t\.md:3: table header"):
        compact_table("### x\n\n| run | score |\n|---|---|\n", "t.md")
    with pytest.raises(ReadmeError, match=r"t\.md:10: vs STUDENT cell '\? \+1.00, p < 0.001'"):
        compact_table(TABLE.replace("↑ +10.00 [+5.00, +15.00]", "? +1.00"), "t.md")
    # a table.md written before the Holm p (no ", p ..."): the same compact rows
    old = re.sub(r", p (< )?[0-9.]+ \|", " |", TABLE)
    assert ", p " not in old and compact_table(old, "t.md") == compact_table(TABLE, "t.md")


def test_compact_claims_reads_the_recorded_column_of_the_current_report():
    from cmkd.reporting.claims import evaluate_claim, parse_claims, render_markdown

    claims = parse_claims({"claims": [{"id": "x", "paper": "MFH", "statement": "s", "comparison": ">", "value": 0.0,
                                       "source": {"file": "r.json", "path": "gain"}}]})
    md = render_markdown([evaluate_claim(claims[0], lambda file: {"gain": 0.5})])
    compact = compact_claims(md, "claims.md")
    assert "| claim | paper | verdict | recorded |" in compact and "| `x` | MFH | reproduced | reproduced |" in compact
    assert "unchanged from the recorded verdicts" in compact and "as expected" not in compact


def test_compact_claims_lists_each_claim_with_its_verdict_and_keeps_a_changed_section():
    compact = compact_claims(CLAIMS, "claims.md")
    assert compact.splitlines() == [
        "Verdicts: 1 reproduced, 1 inconclusive; 2 of 2 as expected.", "",
        "| claim | paper | verdict | expected |", "|---|---|---|---|",
        "| `x` | MFH | reproduced | reproduced |",
        "| `y` | NTDH | inconclusive | inconclusive |",
    ]
    changed = compact_claims(CHANGED, "claims.md")
    assert changed.startswith("#### CHANGED: 1 verdict differs from claims.yaml\n\n- **CHANGED** `x`")
    assert changed.endswith(compact)
    with pytest.raises(ReadmeError, match="claims.md: no 'Verdicts"):
        compact_claims("# Paper claims\n\nnothing\n", "claims.md")


def test_the_results_page_is_whole_generated_and_holds_every_column(tmp_path):
    page = results_page(_reports(tmp_path), ["toy"])
    assert page.startswith("<!-- generated by `python -m stages readme` from data/reports/; do not edit -->\n\n"
                           "# Results of the default run\n")
    assert page.endswith("\n") and not page.endswith("\n\n")
    assert "\n### toy: a → b (f1 weighted × 100" in page
    # hyper-parameters and the Holm-adjusted p kept
    assert "| bad | dkd | 40.00 ± 1.00 | ↓ -10.00 [-20.00, -1.00], p 0.04 | β=8 (params) |" in page
    assert "| good | kd | 60.00 ± 2.00 | ↑ +10.00 [+5.00, +15.00], p < 0.001 | T=4 |" in page
    assert "| close | kd | 50.10 ± 1.00 | ≡ +0.10 [-0.30, +0.40], p 1.00 | T=1 |" in page
    assert "Minimum detectable effect at 80% power" in page
    assert "| `x` | MFH |  | a statement with a \\| pipe | `a > b` | 0.5 | reproduced | reproduced | ok |" in page
    assert "\n## Paper claims\n" in page and "\n### Notes\n" in page and "\n# Paper claims" not in page
    order = [page.index(h) for h in ("## Main tables", "### toy", "## Paper claims", "### Notes")]
    assert order == sorted(order)
    assert results_page(_reports(tmp_path), ["toy"]) == page  # deterministic


def test_blocks_hold_the_compact_reports_and_nothing_else_changes(tmp_path):
    new = replace_blocks(README, blocks(_reports(tmp_path), ["toy"]))
    assert "old table" not in new and "\nold\n" not in new
    assert "### toy: a → b" in new and "| good | 60.00 ± 2.00 | +10.00 [+5.00, +15.00] | better |" in new
    assert "| `x` | MFH | reproduced | reproduced |" in new and "Paper claims" not in new and "statement" not in new
    assert "old prior" not in new
    assert "<!-- diagnosis:start -->\n" + VALIDATION["summary"] + "\n<!-- diagnosis:end -->" in new
    assert new.startswith("# T\n\n<!-- results:start (gen) -->\n") and "\n\ntext\n\n" in new
    assert replace_blocks(new, blocks(_reports(tmp_path), ["toy"])) == new  # idempotent


def test_missing_markers_or_reports_are_one_clear_error(tmp_path):
    with pytest.raises(ReadmeError, match="results:start"):
        replace_blocks("# no markers\n", {"results": "x"})
    with pytest.raises(ReadmeError, match="dataset 'other'"):
        blocks(_reports(tmp_path), ["other"])
    with pytest.raises(ReadmeError, match="dataset 'other'"):
        results_page(_reports(tmp_path), ["other"])
    reports = _reports(tmp_path)
    (reports / "diagnosis" / "validation.json").write_text(json.dumps({"spearman_heldout": 0.3}))
    with pytest.raises(ReadmeError, match="validation.json: no `summary`"):
        blocks(reports, ["toy"])
    (reports / "diagnosis" / "validation.json").unlink()
    with pytest.raises(ReadmeError, match="diagnosis_validation"):
        blocks(reports, ["toy"])


def test_the_command_writes_both_files_and_check_agrees(tmp_path):
    reports = _reports(tmp_path)
    readme, page = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(README)
    params = tmp_path / "params.yaml"
    params.write_text("datasets: [toy]\n")
    cmd = [sys.executable, "-m", "stages", "readme", "--readme", str(readme), "--results-page", str(page),
           "--reports", str(reports), "--params", str(params)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    assert subprocess.run(cmd + ["--check"], cwd=REPO, env=env, capture_output=True).returncode == 1
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    assert readme.read_text() == replace_blocks(README, blocks(reports, ["toy"]))
    assert page.read_text() == results_page(reports, ["toy"])
    assert subprocess.run(cmd + ["--check"], cwd=REPO, env=env, capture_output=True).returncode == 0
    page.write_text(page.read_text().replace("β=8", "β=2"))  # a stale results page alone fails the check
    assert subprocess.run(cmd + ["--check"], cwd=REPO, env=env, capture_output=True).returncode == 1


def _block(text, name):
    return re.search(rf"<!-- {name}:start[^>]*-->\n(.*?)\n<!-- {name}:end -->", text, re.S).group(1)


def test_the_committed_readme_is_cut_from_the_committed_results_page():
    readme = (REPO / "README.md").read_text()
    page = (REPO / "docs" / "results.md").read_text()
    main, claims = page.split("\n## Main tables\n", 1)[1].split("\n## Paper claims\n", 1)
    tables = [t for t in re.split(r"(?m)^(?=### )", main.strip()) if t]
    assert len(tables) == len(re.findall(r"(?m)^### ", _block(readme, "results"))) >= 2
    assert "\n\n".join(compact_table(t, "docs/results.md") for t in tables) == _block(readme, "results")
    assert compact_claims(claims, "docs/results.md") == _block(readme, "claims")


def test_the_committed_readme_numbers_are_the_committed_metrics():
    """Every row of the README's tables against metrics/<dataset>/<row>.json (git-tracked, from the same run;
    rounded there to 4 decimals, here to 2 of the percentage: they may differ by one last digit)."""
    readme = (REPO / "README.md").read_text()
    checked = 0
    for section in _block(readme, "results").split("### ")[1:]:
        ds = section.split(":", 1)[0]
        for line in section.splitlines()[4:]:
            if not line.startswith("|"):
                continue
            run, score, vs, verdict = [c.strip() for c in line.strip("|").split("|")]
            run = run.split(" †")[0]  # a row marked inert keeps its metrics file name
            path = REPO / "metrics" / ds / (run.lower().replace("/", ".") + ".json")
            if score == "n/a":
                assert not path.exists()
                continue
            metrics = json.loads(path.read_text())
            assert abs(float(score.split(" ± ")[0]) - 100 * metrics["f1_weighted"]) <= 0.01 + 1e-9, (ds, run)
            if vs:
                assert abs(float(vs.split(" ")[0]) - 100 * metrics["vs_student"]) <= 0.01 + 1e-9, (ds, run)
                assert verdict == metrics["verdict"], (ds, run)
            checked += 1
    assert checked == len(list((REPO / "metrics").glob("*/*.json")))
