"""The README's result blocks and the results page, generated from a run's reports (never typed by hand).

README.md holds three generated blocks between marker comments, short enough for a first read:

    <!-- results:start --> ... <!-- results:end -->     per dataset: run, score, vs STUDENT, verdict
    <!-- claims:start -->  ... <!-- claims:end -->      the claims' verdicts, one line each
    <!-- diagnosis:start --> ... <!-- diagnosis:end --> how far the KD-gain predictor can be trusted
                                                        (validation.json's `summary`, worded from its numbers)

docs/results.md is generated whole: every dataset's data/reports/<ds>/table.md (with the
hyper-parameters each run used) and data/reports/claims.md (statements, tests, measured values).
The README's rows are cut from the same table.md files, so the two never disagree.

`python -m stages readme` rewrites both from data/reports/ after a run (`--check` only says
whether they are current). Pure functions here; the command is in stages/readme.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from cmkd.errors import CmkdError

BLOCKS = ("results", "claims", "diagnosis")
COMMAND = "python -m stages readme"
# table.md's vs-STUDENT cell starts with one of these (cmkd.reporting.tables.ARROWS)
VERDICTS = {"↑": "better", "↓": "worse", "≡": "equivalent", "≈": "indistinguishable"}


class ReadmeError(CmkdError):
    pass


def _demote(markdown: str, to_level: int) -> str:
    """Headings shifted so the shallowest one sits at `to_level` (the page's nesting)."""
    levels = [len(m.group(1)) for m in re.finditer(r"^(#+) ", markdown, re.M)]
    if not levels:
        return markdown
    shift = to_level - min(levels)
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", markdown, flags=re.M)


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row; `\\|` inside a cell is text, not a border."""
    inner = line.strip()
    if not (inner.startswith("|") and inner.endswith("|")):
        raise ValueError("not a table row")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner[1:-1])]


def _table_text(reports: Path, ds: str) -> tuple[Path, str]:
    path = Path(reports) / ds / "table.md"
    if not path.is_file():
        raise ReadmeError(f"{path}: missing (run the pipeline for dataset {ds!r} first)")
    return path, path.read_text()


def _claims_text(reports: Path) -> tuple[Path, str]:
    path = Path(reports) / "claims.md"
    if not path.is_file():
        raise ReadmeError(f"{path}: missing (run `dvc repro check` first)")
    return path, path.read_text()


def _diagnosis_text(reports: Path) -> str:
    path = Path(reports) / "diagnosis" / "validation.json"
    try:
        summary = json.loads(path.read_text()).get("summary")
    except (OSError, json.JSONDecodeError) as err:
        raise ReadmeError(f"{path}: cannot read it (run `dvc repro diagnosis_validation` first): {err}") from None
    if not isinstance(summary, str):
        raise ReadmeError(f"{path}: no `summary` sentence (rerun `dvc repro diagnosis_validation`)")
    return summary


def compact_table(table_md: str, source: str | Path, level: int = 3) -> str:
    """One dataset's table.md (cmkd.reporting.tables.markdown_table) cut to run | score | vs STUDENT | verdict
    (the difference and its interval; the Holm-adjusted p, the rule and the detectable effect stay in table.md).

    A paragraph before the heading (the smoke-test note) is kept; of the footer the seed count and
    the notes on rows whose mechanism was inert (†N). Anything not in table.md's format is an error
    naming `source` and the line."""
    lines = table_md.strip().splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("#")), None)
    if head is None:
        raise ReadmeError(f"{source}: no heading (expected table.md as written by the evaluate stage)")
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if len(rows) < 2 or rows != list(range(rows[0], rows[0] + len(rows))):
        raise ReadmeError(f"{source}: expected one Markdown table")
    header = _cells(lines[rows[0]])
    if len(header) != 5 or header[0] != "run" or not header[3].startswith("vs STUDENT"):
        raise ReadmeError(f"{source}:{rows[0] + 1}: table header {header} is not "
                          "run | method | <metric> | vs STUDENT ... | hyper-parameters")
    out = ["| run | score | vs STUDENT [95% CI] | verdict |", "|---|---|---|---|"]
    for i in rows[2:]:
        cells = _cells(lines[i])
        if len(cells) == 4 and cells[2] == "n/a":  # a method not defined for this task
            out.append(f"| {cells[0]} | n/a |  | {cells[3]} |")
            continue
        if len(cells) != 5:
            raise ReadmeError(f"{source}:{i + 1}: expected 5 cells, got {len(cells)}")
        run, score, vs = cells[0], cells[2], cells[3]
        if not vs:  # TEACHER, STUDENT
            out.append(f"| {run} | {score} |  |  |")
            continue
        arrow, _, difference = vs.partition(" ")
        difference = difference.partition(", p ")[0]  # the Holm p stays in table.md (docs/results.md)
        if arrow not in VERDICTS:
            raise ReadmeError(f"{source}:{i + 1}: vs STUDENT cell {vs!r} does not start with one of {list(VERDICTS)}")
        out.append(f"| {run} | {score} | {difference} | {VERDICTS[arrow]} |")
    footer = " ".join(lines[rows[-1] + 1:])
    seeds = re.search(r"Seeds per row: \d+\.", footer)
    # a row marked inert (†N) must not be read as the method's result where the table is shown
    inert_notes = [line for line in lines[rows[-1] + 1:] if line.startswith("†")]
    parts = ["\n".join(lines[:head]).strip(), _demote(lines[head], level), "\n".join(out),
             " ".join([seeds.group(0)] if seeds else []), "\n\n".join(inert_notes)]
    return "\n\n".join(p for p in parts if p)


def compact_claims(claims_md: str, source: str | Path) -> str:
    """claims.md (cmkd.reporting.claims.render_markdown) cut to its verdict counts and claim | paper | verdict.
    A CHANGED section stays whole: a verdict that moved must be seen where people look."""
    text = claims_md.strip()
    counts = re.search(r"^Verdicts: (.*?)\. A verdict is", text, re.M)
    if counts is None:
        if "No claim reads these results." in text:
            return "No claim reads these results."
        raise ReadmeError(f"{source}: no 'Verdicts: ...' line (expected claims.md as written by the check stage)")
    changed = re.search(r"^## CHANGED.*?(?=^Verdicts: )", text, re.M | re.S)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| claim |")), None)
    if start is None:
        raise ReadmeError(f"{source}: no claims table")
    header = _cells(lines[start])
    # `recorded`: the verdict of the last committed run (a regression lock); older reports said `expected`
    lock = "recorded" if "recorded" in header else "expected"
    try:
        columns = [header.index(name) for name in ("claim", "paper", "verdict", lock)]
    except ValueError:
        raise ReadmeError(f"{source}:{start + 1}: claims table header {header} "
                          "lacks claim, paper, verdict or recorded") from None
    out = [f"| claim | paper | verdict | {lock} |", "|---|---|---|---|"]
    for i in range(start + 2, len(lines)):
        if not lines[i].startswith("|"):
            break
        cells = _cells(lines[i])
        if len(cells) != len(header):
            raise ReadmeError(f"{source}:{i + 1}: expected {len(header)} cells, got {len(cells)}")
        out.append("| " + " | ".join(cells[c] for c in columns) + " |")
    parts = [_demote(changed.group(0).strip(), 4) if changed else "", f"Verdicts: {counts.group(1)}.", "\n".join(out)]
    return "\n\n".join(p for p in parts if p)


def blocks(reports: Path, datasets: Sequence[str]) -> dict[str, str]:
    """The README's generated blocks: the compact tables in the order of `datasets`, the claims, the
    diagnosis's standing."""
    tables = [compact_table(text, path) for path, text in (_table_text(reports, ds) for ds in datasets)]
    path, claims = _claims_text(reports)
    return {"results": "\n\n".join(tables), "claims": compact_claims(claims, path),
            "diagnosis": _diagnosis_text(reports)}


RESULTS_INTRO = """\
Each row is mean ± std over the seeds. **vs STUDENT** is the mean of the per-seed differences to
STUDENT (same seed: same initialisation and batch order, so the seed's own luck cancels) with its
95% interval from the t distribution, and the p of a two-sided paired t test that the difference
lies beyond the table's margin (claims.yaml `margins`: `table_f1`, `table_miou`), Holm-adjusted over
every row of the table compared with STUDENT (`discom_kd/teacher_modality` included). ↑ / ↓ (better
/ worse): that p < 0.05, so the interval lies beyond the margin; **≡** (equivalent): the interval lies
inside plus or minus the margin; **≈** (indistinguishable): neither, whatever the row's mean. Under
each table: its minimum detectable effect at 80% power from the pooled spread of the per-seed
differences. The last column holds the hyper-parameters the run used (`(params)`: params.yaml's
values, not selected on the validation split; see [tuning.md](tuning.md)). `methods.png` beside each
table draws the same: bars coloured by the verdict with the interval as a whisker around STUDENT's
mean + the difference. `discom_kd/teacher_modality` is DisCoM-KD's other branch (it sees the
teacher's modality), so its comparison is not a KD gain. Every row's per-seed values, p-values and
the table's `margin`, `multiplicity` and `mde` are in `data/reports/<dataset>/metrics.json`; what the
verdicts of the claims mean and how each test is calibrated: [reproducing.md](reproducing.md)."""


def results_page(reports: Path, datasets: Sequence[str]) -> str:
    """docs/results.md, whole: every dataset's table.md, then claims.md, under a generated-file header."""
    tables = [_demote(text.strip(), 3) for _, text in (_table_text(reports, ds) for ds in datasets)]
    _, claims = _claims_text(reports)
    claims_body = re.sub(r"\A# [^\n]*\n+", "", claims.strip() + "\n").strip()
    parts = [
        f"<!-- generated by `{COMMAND}` from data/reports/; do not edit -->",
        "# Results of the default run",
        f"Generated by `{COMMAND}` from the last run's reports (`data/reports/<dataset>/table.md`, "
        f"`data/reports/claims.md`); `{COMMAND} --check` says whether this page and the README are current. "
        "The README shows the same rows without the hyper-parameters.",
        RESULTS_INTRO,
        "## Main tables",
        *tables,
        "## Paper claims",
        _demote(claims_body, 3),
    ]
    return "\n\n".join(parts) + "\n"


def replace_blocks(readme: str, generated: dict[str, str]) -> str:
    """`readme` with the text between each block's markers replaced by `generated[block]`."""
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- {name}:start[^>]*-->\n).*?(\n<!-- {name}:end -->)", re.S)
        if len(pattern.findall(readme)) != 1:
            raise ReadmeError(f"README.md: needs exactly one '<!-- {name}:start -->' ... '<!-- {name}:end -->' pair")
        # re.sub calls the lambda before the loop moves on: `body` cannot be a later block's
        readme = pattern.sub(lambda m: m.group(1) + body.strip() + m.group(2), readme)  # noqa: B023
    return readme
