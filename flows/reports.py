"""The pipeline run's Markdown artifact: stage outcomes, result tables, paper claims.

The files are read through a reader (relative path -> text or None): the workspace's by
default, an experiment's (`flows.experiments.read_at`) for a run with overrides."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPORTS_DIR = Path("data") / "reports"
Reader = Callable[[str], "str | None"]


def workspace_reader(root: Path) -> Reader:
    def read(rel: str) -> str | None:
        path = Path(root) / rel
        return path.read_text() if path.is_file() else None
    return read


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def grid_markdown(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """Any rows as a Markdown table of `columns` (the artifact's small tables; the results table is
    cmkd.reporting.tables.markdown_table's)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _datasets(read: Reader) -> list[str] | None:
    try:
        params = yaml.safe_load(read("params.yaml") or "") or {}
    except yaml.YAMLError:
        return None
    datasets = params.get("datasets")
    return [str(d) for d in datasets] if isinstance(datasets, list) else None


def _claims_markdown(read: Reader) -> str | None:
    md = read(f"{REPORTS_DIR}/claims.md")
    if md is not None:
        return md.strip() + "\n"
    js = f"{REPORTS_DIR}/claims.json"
    text = read(js)
    if text is None:
        return None
    try:
        claims = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"`{js}` is not valid JSON: {exc}\n"
    if isinstance(claims, dict) and isinstance(claims.get("claims"), list):
        claims = claims["claims"]
    if isinstance(claims, list) and all(isinstance(c, dict) for c in claims):
        columns: list[str] = []
        for claim in claims:
            columns += [k for k in claim if k not in columns]
        return grid_markdown(columns, claims)
    return "```json\n" + json.dumps(claims, indent=2, sort_keys=True) + "\n```\n"


def changed_claims(root: Path, datasets: Sequence[str] | None = None,
                   read: Reader | None = None) -> list[dict[str, Any]]:
    """Every claim whose verdict differs from its recorded expectation, from the check stages'
    claims.json (data/reports/ and data/reports/<dataset>/): the claim, the report it is in, its
    verdict, the expected verdict and whether it is enforced. `datasets`: params.yaml's by default.
    Unreadable reports are skipped. `read`: the workspace's files by default."""
    root = Path(root)
    reports = root / REPORTS_DIR
    if read is None:
        read = workspace_reader(root)
    if datasets is None:
        datasets = _datasets(read) or sorted(p.parent.name for p in reports.glob("*/claims.json"))
    rows = []
    for path in [f"{REPORTS_DIR}/claims.json"] + [f"{REPORTS_DIR}/{d}/claims.json" for d in datasets]:
        try:
            doc = json.loads(read(path) or "")
        except ValueError:
            continue
        claims = doc.get("claims") if isinstance(doc, dict) else None
        for c in claims if isinstance(claims, list) else []:
            if not isinstance(c, dict):
                continue
            changed = c.get("changed", c.get("verdict") != c.get("expected_verdict"))
            if not changed:
                continue
            why = [c.get("detail") if c.get("verdict") == "not_run" else None, c.get("note")]
            rows.append({"claim": c.get("id"), "report": path, "verdict": c.get("verdict"),
                         "recorded": c.get("expected_verdict"), "enforced": c.get("enforced", True),
                         "note": "; ".join(str(w) for w in why if w)})
    return rows


def changed_claims_markdown(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The artifact's first section when a verdict changed (None when none did)."""
    if not rows:
        return None
    n = len(rows)
    return (f"## CHANGED: {n} claim verdict{'s' if n > 1 else ''} differ{'' if n > 1 else 's'} from claims.yaml\n\n"
            + grid_markdown(["claim", "verdict", "recorded", "enforced", "report", "note"], rows)
            + "\nThe check stages report a changed verdict and succeed; `python -m stages check --strict` "
              "fails on an enforced one.\n")


def _demote(markdown: str) -> str:
    """Headings one level down, so an embedded report nests under the artifact's sections."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.strip().splitlines()) + "\n"


def diagnosis_markdown(read: Reader, datasets: Sequence[str]) -> str | None:
    """The diagnosis section ("Will KD help?"): each dataset's diagnosis (beside the measured
    gain when diagnosis_report ran) and the predictor's validation; None when none exists."""
    parts = []
    for dataset in datasets:
        for path in (f"{REPORTS_DIR}/{dataset}/diagnosis.md", f"data/diagnosis/{dataset}.md"):
            if (text := read(path)) is not None:
                parts.append(_demote(_demote(text)))
                break
    validation = read(f"{REPORTS_DIR}/diagnosis/validation.md")
    if validation is not None:
        parts.append(_demote(_demote(validation)))
    return "## Will KD help? (diagnosis)\n\n" + "\n".join(parts) if parts else None


def pipeline_markdown(repo_root: str | Path, stages: Sequence[Mapping[str, Any]],
                      experiment: str | None = None, failed: bool = False, read: Reader | None = None) -> str:
    """The pipeline run's artifact: the claims whose verdict changed first (when any did), the
    diagnosis (when diagnose ran), then stage outcomes, every dataset's table, the claim results.
    `read`: where the files come from (the workspace's by default; an experiment's)."""
    root = Path(repo_root)
    reports = root / REPORTS_DIR
    read = read or workspace_reader(root)
    parts = ["# cmkd pipeline run\n"]
    changed = changed_claims_markdown(changed_claims(root, read=read))
    if changed is not None:
        parts.append(changed)
    datasets = _datasets(read)
    diagnosis = diagnosis_markdown(read, datasets or sorted(p.stem for p in (root / "data" / "diagnosis").glob("*.md")))
    if diagnosis is not None:
        parts.append(diagnosis)
    if experiment:
        parts.append(f"Parameter overrides were run as DVC experiment `{experiment}`; the tables are "
                     f"the experiment's (`dvc exp show`, `dvc exp apply {experiment}`).\n")
    if failed:
        parts.append("**The run failed**: see the failed stages below; the tables are the "
                     "last ones written.\n")
    parts.append("## Stages\n")
    parts.append(grid_markdown(["stage", "status", "seconds", "attempts"], stages))
    if datasets is None:
        datasets = sorted(p.parent.name for p in reports.glob("*/table.md"))
    for dataset in datasets:
        table = f"{REPORTS_DIR}/{dataset}/table.md"
        text = read(table)
        parts.append(f"## {dataset}\n")
        parts.append(text.strip() + "\n" if text is not None else f"(no `{table}`)\n")
    parts.append("## Paper claims\n")
    claims = _claims_markdown(read)
    parts.append(claims if claims is not None else f"(no `{REPORTS_DIR}/claims.md` or `claims.json`)\n")
    return "\n".join(parts)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(data, Mapping):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
