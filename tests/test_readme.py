"""The README's result blocks are generated from a reports folder, byte for byte."""

import subprocess
import sys

import pytest

from cmkd.reporting.readme import ReadmeError, blocks, replace_blocks
from tests.conftest import REPO

TABLE = "### toy: a → b (f1 weighted × 100, mean ± std over seeds)\n\n| run | method | f1_weighted | vs STUDENT |\n|---|---|---|---|\n| TEACHER | teacher | 90.00 ± 1.00 |  |\n"
CLAIMS = "# Paper claims\n\n1 of 1 claims pass.\n\n| claim | result |\n|---|---|\n| `x` | PASS: reproduced |\n"
README = "# T\n\n<!-- results:start (gen) -->\nold table\n<!-- results:end -->\n\ntext\n\n<!-- claims:start -->\nold\n<!-- claims:end -->\n"


def _reports(tmp_path):
    (tmp_path / "reports" / "toy").mkdir(parents=True, exist_ok=True)
    (tmp_path / "reports" / "toy" / "table.md").write_text(TABLE)
    (tmp_path / "reports" / "claims.md").write_text(CLAIMS)
    return tmp_path / "reports"


def test_blocks_hold_the_reports_and_nothing_else_changes(tmp_path):
    new = replace_blocks(README, blocks(_reports(tmp_path), ["toy"]))
    assert "old table" not in new and "\nold\n" not in new
    assert "#### toy: a → b" in new and "| TEACHER | teacher | 90.00 ± 1.00 |  |" in new
    assert "| `x` | PASS: reproduced |" in new and "Paper claims" not in new
    assert new.startswith("# T\n\n<!-- results:start (gen) -->\n") and "\n\ntext\n\n" in new
    assert replace_blocks(new, blocks(_reports(tmp_path), ["toy"])) == new  # idempotent


def test_missing_markers_or_reports_are_one_clear_error(tmp_path):
    with pytest.raises(ReadmeError, match="results:start"):
        replace_blocks("# no markers\n", {"results": "x"})
    with pytest.raises(ReadmeError, match="dataset 'other'"):
        blocks(_reports(tmp_path), ["other"])


def test_the_command_writes_what_the_generator_returns_and_check_agrees(tmp_path):
    reports = _reports(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    params = tmp_path / "params.yaml"
    params.write_text("datasets: [toy]\n")
    cmd = [sys.executable, "-m", "stages", "readme", "--readme", str(readme), "--reports", str(reports), "--params", str(params)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CMKD_STAGE_SERVER": "0"}
    assert subprocess.run(cmd + ["--check"], cwd=REPO, env=env, capture_output=True).returncode == 1
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    assert readme.read_text() == replace_blocks(README, blocks(reports, ["toy"]))
    assert subprocess.run(cmd + ["--check"], cwd=REPO, env=env, capture_output=True).returncode == 0


def test_the_readme_has_both_blocks():
    text = (REPO / "README.md").read_text()
    for name in ("results", "claims"):
        assert text.count(f"<!-- {name}:start") == 1 and text.count(f"<!-- {name}:end -->") == 1
