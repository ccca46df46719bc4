"""Paper claims, checked against the pipeline's results.

A claims file (``claims.yaml`` at the repository root) lists what the papers say, each claim in
a form a program can decide:

```yaml
claims:
  - id: mfh-gamma-kd-gain-rises          # unique, [a-z0-9_-]
    paper: MFH                           # short paper name
    statement: KD gain over no-KD rises with the share of modality-general features.
    paper_reports: Fig. 2 ...            # optional: what the paper reports, in words / numbers
    significance: 2.0                    # optional, see "Noisy comparisons"
    optional: true                       # optional: absent results skip the claim (e.g. a run
                                         # the user left out of `methods`) instead of failing it
    source:                              # the measurement
      file: data/reports/experiments/mfh_gamma.json
      path: series.kd_gain_mean          # JSON path, see `resolve_path`
    against:                             # optional second measurement (pairwise comparisons)
      file: ...
      path: ...
    comparison: increasing               # see COMPARISONS
    value: 0.0                           # threshold (or [lo, hi] for `between`)
    tolerance: 0.01                      # slack in the paper's favour, decided before any run
    status: reproduces                   # or not_reproduced (with `reason`)
    reason: ...                          # required when status is not_reproduced
    command: dvc repro exp_mfh_gamma     # what regenerates the number (for the docs)
```

Comparisons (``m`` the measured value, ``a`` the `against` value, ``v`` the value, ``t`` the
tolerance; the tolerance always relaxes the test by ``t`` in the paper's favour):

- ``>``, ``>=``, ``<``, ``<=``: scalar m against v (or a): ``m > v - t`` etc.
- ``==``: ``|m - v| <= t``;  ``between``: ``lo - t <= m <= hi + t`` with value ``[lo, hi]``.
- ``all >`` / ``all >=`` / ``all <`` / ``all <=`` / ``any >`` / ``any <``: element-wise over a
  list m, against v or element-wise against a list a of the same length.
- ``increasing`` / ``decreasing``: a sequence m whose last value exceeds (falls below) the
  first by more than ``t`` and that never steps back by more than ``t``; here ``t`` is the noise
  band of one point, so it both forgives a small step back and demands a rise above noise.
- ``spearman >`` / ``spearman <``: the Spearman rank correlation of m and a against v.

Noisy comparisons: a scalar comparison (``>``, ``>=``, ``<``, ``<=``) between summaries
``{"mean", "std", "n"}`` (the main tables' metrics.json entries) may set ``significance: k``.
The claim then holds when the difference of the means is beyond k standard errors in the
paper's direction, fails when it is beyond k standard errors the other way, and is
"inconclusive (within k s.e.)" otherwise: the seeds cannot decide it, which is reported, not
counted as a failure.

Recording what does not reproduce: a claim that a run showed not to hold is kept in the file
with ``status: not_reproduced`` and a ``reason`` written from the measured numbers; its paper
expectation (comparison, value, tolerance) stays exactly as the paper states it, never loosened.
Such a claim passes the check only while the measurement still disagrees with the paper (the
verdict reads "not reproduced (known)"), so a later change that makes it hold is flagged
("now reproduces: update claims.yaml") instead of going unnoticed. A claim whose results file
or path is missing fails with the verdict "missing", unless the claim is `optional` (a claim on a
main-table run the user may leave out of `methods`): then it is "skipped (results absent)".

Everything here is pure: `load_claims` parses and validates, `evaluate_claim` decides one claim
against already-loaded JSON documents, `render_markdown` formats the report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml
from scipy.stats import spearmanr

from cmkd.errors import DataFormatError

SCALAR_OPS = (">", ">=", "<", "<=")
ELEMENTWISE = tuple(f"{q} {op}" for q in ("all", "any") for op in SCALAR_OPS)
COMPARISONS = SCALAR_OPS + ("==", "between") + ELEMENTWISE + ("increasing", "decreasing", "spearman >", "spearman <")
PAIRWISE_ONLY = ("spearman >", "spearman <")
STATUSES = ("reproduces", "not_reproduced")
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_KNOWN_KEYS = {"id", "paper", "statement", "paper_reports", "source", "against", "comparison", "value",
               "tolerance", "status", "reason", "command", "significance", "optional"}

_OPS: dict[str, Callable[[float, float, float], bool]] = {
    ">": lambda m, v, t: m > v - t,
    ">=": lambda m, v, t: m >= v - t,
    "<": lambda m, v, t: m < v + t,
    "<=": lambda m, v, t: m <= v + t,
}


class ClaimsError(DataFormatError):
    """The claims file is malformed; the message names the file and the claim."""


class ResultMissing(LookupError):
    """A claim's results file or JSON path does not exist (yet)."""


@dataclass(frozen=True)
class Source:
    file: str
    path: str

    def describe(self) -> str:
        return f"{self.file}:{self.path}"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    statement: str
    source: Source
    comparison: str
    value: Any = None
    tolerance: float = 0.0
    against: Source | None = None
    status: str = "reproduces"
    reason: str = ""
    paper_reports: str = ""
    command: str = ""
    significance: float | None = None
    optional: bool = False

    def expected_text(self) -> str:
        """The paper's expectation in one line, e.g. ``spearman(m, a) < -0.7``."""
        slack = f" (slack {_fmt(self.tolerance)})" if self.tolerance else ""
        if self.significance:
            slack += f" beyond {_fmt(self.significance)} s.e."
        rhs = self.against.path if self.against is not None else _fmt(self.value)
        if self.comparison in ("increasing", "decreasing"):
            return f"{self.source.path} {self.comparison}{slack}"
        if self.comparison in PAIRWISE_ONLY:
            op = self.comparison.split()[1]
            return f"spearman({self.source.path}, {self.against.path}) {op} {_fmt(self.value)}{slack}"
        if self.comparison == "between":
            return f"{self.source.path} in {_fmt(self.value)}{slack}"
        if self.comparison == "==":
            return f"{self.source.path} == {rhs} +- {_fmt(self.tolerance)}"
        return f"{self.source.path} {self.comparison} {rhs}{slack}"


@dataclass
class Outcome:
    """One claim's verdict, as written to claims.json."""

    claim: Claim
    measured: Any
    holds: bool | None  # the paper's comparison on the measurement; None when it is missing
    passed: bool
    verdict: str
    detail: str = ""
    against_measured: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        out = {
            "id": c.id,
            "paper": c.paper,
            "statement": c.statement,
            "expected": c.expected_text(),
            "measured": _jsonable(self.measured),
            "passed": self.passed,
            "holds": self.holds,
            "verdict": self.verdict,
            "status": c.status,
            "source": c.source.describe(),
        }
        if c.against is not None:
            out["against"] = c.against.describe()
            out["against_measured"] = _jsonable(self.against_measured)
        for key in ("reason", "paper_reports", "command"):
            if getattr(c, key):
                out[key] = getattr(c, key)
        if self.detail:
            out["detail"] = self.detail
        return out


# --------------------------------------------------------------------------- loading

def load_claims(path: str | Path) -> list[Claim]:
    """Parse and validate a claims file; every problem names the file and the claim."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClaimsError(path, "file not found") from None
    except yaml.YAMLError as err:
        raise ClaimsError(path, f"not valid YAML: {err}") from None
    return parse_claims(doc, path)


def parse_claims(doc: Any, path: str | Path = "claims.yaml") -> list[Claim]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("claims"), list) or not doc["claims"]:
        raise ClaimsError(path, "must be a mapping with a non-empty list under `claims`")
    claims: list[Claim] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["claims"]):
        where = f"claims[{i}]"
        if not isinstance(raw, Mapping):
            raise ClaimsError(path, f"{where}: must be a mapping")
        if isinstance(raw.get("id"), str):
            where = f"claim {raw['id']!r}"
        claim = _parse_claim(raw, path, where)
        if claim.id in seen:
            raise ClaimsError(path, f"{where}: duplicate id")
        seen.add(claim.id)
        claims.append(claim)
    return claims


def _parse_claim(raw: Mapping[str, Any], path: str | Path, where: str) -> Claim:
    def fail(problem: str) -> ClaimsError:
        return ClaimsError(path, f"{where}: {problem}")

    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known: {sorted(_KNOWN_KEYS)}")
    for key in ("id", "paper", "statement", "comparison"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise fail(f"`{key}` must be a non-empty string")
    if not _ID.match(raw["id"]):
        raise fail("`id` may hold only lower-case letters, digits, '_' and '-'")
    comparison = raw["comparison"]
    if comparison not in COMPARISONS:
        raise fail(f"unknown comparison {comparison!r}; known: {list(COMPARISONS)}")
    source = _parse_source(raw.get("source"), fail, "source")
    against = _parse_source(raw["against"], fail, "against") if raw.get("against") is not None else None
    value = raw.get("value")
    if comparison in PAIRWISE_ONLY and against is None:
        raise fail(f"comparison {comparison!r} needs `against`")
    if comparison == "between":
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value) and value[0] <= value[1]):
            raise fail("comparison 'between' needs `value: [lo, hi]` with lo <= hi")
    elif comparison in ("increasing", "decreasing"):
        if value is not None or against is not None:
            raise fail(f"comparison {comparison!r} takes neither `value` nor `against`")
    elif comparison in PAIRWISE_ONLY or against is None:
        if not _is_number(value):
            raise fail(f"comparison {comparison!r} needs a numeric `value`")
    elif value is not None:
        raise fail("give either `value` or `against`, not both")
    tolerance = raw.get("tolerance", 0.0)
    if not _is_number(tolerance) or tolerance < 0:
        raise fail("`tolerance` must be a number >= 0")
    if comparison == "==" and against is None and value is None:
        raise fail("comparison '==' needs `value` or `against`")
    status = raw.get("status", "reproduces")
    if status not in STATUSES:
        raise fail(f"`status` must be one of {list(STATUSES)}")
    reason = raw.get("reason", "")
    if status == "not_reproduced" and not (isinstance(reason, str) and reason.strip()):
        raise fail("status not_reproduced needs a `reason` (what was measured and why it differs)")
    for key in ("paper_reports", "command"):
        if key in raw and not isinstance(raw[key], str):
            raise fail(f"`{key}` must be a string")
    if not isinstance(raw.get("optional", False), bool):
        raise fail("`optional` must be true or false")
    significance = raw.get("significance")
    if significance is not None:
        if not _is_number(significance) or significance <= 0:
            raise fail("`significance` must be a number > 0 (standard errors)")
        if comparison not in SCALAR_OPS:
            raise fail(f"`significance` applies to {list(SCALAR_OPS)} only")
    return Claim(
        id=raw["id"], paper=raw["paper"], statement=" ".join(raw["statement"].split()), source=source,
        comparison=comparison, value=value, tolerance=float(tolerance), against=against, status=status,
        reason=" ".join(str(reason).split()), paper_reports=" ".join(raw.get("paper_reports", "").split()),
        command=raw.get("command", ""), significance=None if significance is None else float(significance),
        optional=raw.get("optional", False),
    )


def _parse_source(raw: Any, fail: Callable[[str], ClaimsError], key: str) -> Source:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("file"), str) or not isinstance(raw.get("path"), str):
        raise fail(f"`{key}` must be a mapping with string `file` and `path`")
    try:
        parse_path(raw["path"])
    except ValueError as err:
        raise fail(f"`{key}.path`: {err}") from None
    return Source(raw["file"], raw["path"])


# --------------------------------------------------------------------------- JSON paths

_TOKEN = re.compile(r'\.?([A-Za-z0-9_\-]+)|\[(-?\d+|\*)\]|\["([^"]*)"\]|\.?(\*)')


def parse_path(path: str) -> list[str | int]:
    """Split a JSON path into keys: ``a.b[0]["x.y"].*.c`` -> ['a', 'b', 0, 'x.y', '*', 'c'].

    ``*`` (or ``[*]``) maps the rest of the path over every element of a list (or value of a
    mapping) and yields a list.
    """
    if not path:
        raise ValueError("empty path")
    tokens: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None or m.end() == pos or (pos == 0 and path[0] == "."):
            raise ValueError(f"cannot parse path {path!r} at position {pos}")
        name, index, quoted, star = m.groups()
        if name is not None:
            tokens.append(name)
        elif index is not None:
            tokens.append("*" if index == "*" else int(index))
        elif quoted is not None:
            tokens.append(quoted)
        else:
            tokens.append("*")
        pos = m.end()
    return tokens


def resolve_path(doc: Any, path: str) -> Any:
    """The value at `path` in a loaded JSON document; raises ResultMissing when absent."""
    return _resolve(doc, parse_path(path), path)


def _resolve(node: Any, tokens: Sequence[str | int], path: str) -> Any:
    for i, tok in enumerate(tokens):
        if tok == "*":
            items = list(node.values()) if isinstance(node, Mapping) else node
            if not isinstance(items, list):
                raise ResultMissing(f"{path}: '*' applied to a {type(node).__name__}")
            return [_resolve(item, tokens[i + 1:], path) for item in items]
        if isinstance(tok, int):
            if not isinstance(node, list) or not -len(node) <= tok < len(node):
                raise ResultMissing(f"{path}: no element [{tok}]")
            node = node[tok]
        else:
            if isinstance(node, Mapping) and tok in node:
                node = node[tok]
            elif isinstance(node, list) and tok.lstrip("-").isdigit():
                node = node[int(tok)]
            else:
                raise ResultMissing(f"{path}: no key {tok!r}")
    return node


# --------------------------------------------------------------------------- evaluation

Loader = Callable[[str], Any]


def evaluate_claim(claim: Claim, load: Loader) -> Outcome:
    """Decide one claim. `load(file)` returns the parsed JSON of a results file or raises
    FileNotFoundError / ResultMissing."""
    try:
        measured = resolve_path(load(claim.source.file), claim.source.path)
        against = resolve_path(load(claim.against.file), claim.against.path) if claim.against else None
    except (FileNotFoundError, ResultMissing) as err:
        if claim.optional:
            return Outcome(claim, None, None, True, "skipped (results absent)", detail=f"results not found: {err}")
        return Outcome(claim, None, None, False, "missing", detail=f"results not found: {err}")
    try:
        if claim.significance:
            holds, shown, detail = compare_significant(claim.comparison, measured, claim.value, claim.tolerance, against, claim.significance)
        else:
            holds, shown, detail = compare(claim.comparison, measured, claim.value, claim.tolerance, against)
    except (TypeError, ValueError) as err:
        return Outcome(claim, _jsonable(measured), None, False, "invalid", detail=str(err), against_measured=against)
    if holds is None:
        return Outcome(claim, shown, None, True, f"inconclusive (within {_fmt(claim.significance)} s.e.)", detail=detail,
                       against_measured=against)
    if claim.status == "reproduces":
        verdict = "reproduced" if holds else "not reproduced"
        passed = holds
    else:
        verdict = "now reproduces: update claims.yaml" if holds else "not reproduced (known)"
        passed = not holds
    return Outcome(claim, shown, holds, passed, verdict, detail=detail, against_measured=against)


def compare(comparison: str, measured: Any, value: Any, tolerance: float, against: Any = None) -> tuple[bool, Any, str]:
    """Apply a comparison; returns (holds, the measured value to show, a one-line detail).

    Raises ValueError / TypeError when the measurement has the wrong shape for the comparison.
    """
    t = float(tolerance)
    if comparison in SCALAR_OPS:
        m = _number(measured, "measured")
        rhs = _number(against, "against") if against is not None else float(value)
        return bool(_OPS[comparison](m, rhs, t)), m, f"{_fmt(m)} {comparison} {_fmt(rhs)}"
    if comparison == "==":
        m = _number(measured, "measured")
        rhs = _number(against, "against") if against is not None else float(value)
        return abs(m - rhs) <= t, m, f"|{_fmt(m)} - {_fmt(rhs)}| = {_fmt(abs(m - rhs))}"
    if comparison == "between":
        m = _number(measured, "measured")
        lo, hi = float(value[0]), float(value[1])
        return lo - t <= m <= hi + t, m, f"{_fmt(m)} in [{_fmt(lo)}, {_fmt(hi)}]"
    if comparison in ELEMENTWISE:
        quantifier, op = comparison.split()
        ms = _numbers(measured, "measured")
        if against is not None:
            rhs = _numbers(against, "against")
            if len(rhs) != len(ms):
                raise ValueError(f"measured has {len(ms)} values but against has {len(rhs)}")
        else:
            rhs = [float(value)] * len(ms)
        each = [bool(_OPS[op](m, r, t)) for m, r in zip(ms, rhs)]
        holds = all(each) if quantifier == "all" else any(each)
        return holds, ms, f"{sum(each)}/{len(each)} elements satisfy {op}"
    if comparison in ("increasing", "decreasing"):
        ms = _numbers(measured, "measured")
        if len(ms) < 2:
            raise ValueError("a trend needs at least two values")
        sign = 1.0 if comparison == "increasing" else -1.0
        steps = [sign * (b - a) for a, b in zip(ms, ms[1:])]
        overall = sign * (ms[-1] - ms[0])
        holds = overall > t and min(steps) >= -t
        return holds, ms, f"first->last {_fmt(ms[-1] - ms[0])}, worst step {_fmt(sign * min(steps))}"
    if comparison in PAIRWISE_ONLY:
        ms, rhs = _numbers(measured, "measured"), _numbers(against, "against")
        if len(ms) != len(rhs) or len(ms) < 3:
            raise ValueError(f"spearman needs two sequences of equal length >= 3, got {len(ms)} and {len(rhs)}")
        rho = float(spearmanr(ms, rhs).statistic)
        if math.isnan(rho):
            raise ValueError("spearman correlation is undefined (a constant sequence)")
        op = comparison.split()[1]
        return bool(_OPS[op](rho, float(value), t)), rho, f"rho = {_fmt(rho)} over {len(ms)} points"
    raise ValueError(f"unknown comparison {comparison!r}")


def compare_significant(comparison: str, measured: Any, value: Any, tolerance: float, against: Any, k: float) -> tuple[bool | None, Any, str]:
    """`compare` for summaries {"mean", "std", "n"}: True / False when the difference of the
    means lies beyond k standard errors (plus the tolerance) on the paper's side / the other
    side, None (inconclusive) in between."""
    if comparison not in SCALAR_OPS:
        raise ValueError(f"significance applies to {SCALAR_OPS} only")
    m_mean, m_var = _summary(measured, "measured")
    if against is not None:
        a_mean, a_var = _summary(against, "against")
    else:
        a_mean, a_var = float(value), 0.0
    se = math.sqrt(m_var + a_var)
    diff = m_mean - a_mean if comparison.startswith(">") else a_mean - m_mean  # > 0: the paper's side
    margin = k * se
    detail = f"difference {_fmt(m_mean - a_mean)}, s.e. {_fmt(se)}"
    if diff + tolerance > margin:
        return True, m_mean, detail
    if diff + tolerance < -margin:
        return False, m_mean, detail
    return None, m_mean, detail


def _summary(x: Any, what: str) -> tuple[float, float]:
    """(mean, squared standard error of the mean) of a {"mean", "std", "n"} summary."""
    if not (isinstance(x, Mapping) and all(_is_number(x.get(k)) for k in ("mean", "std", "n")) and x["n"] >= 2):
        raise TypeError(f"{what} must be a summary with mean, std and n >= 2 for a significance test, got {x!r}")
    return float(x["mean"]), float(x["std"]) ** 2 / float(x["n"])


def filter_claims(claims: Sequence[Claim], prefix: str) -> list[Claim]:
    """The claims whose results files (source and against) all lie under `prefix`."""
    return [c for c in claims if c.source.file.startswith(prefix) and (c.against is None or c.against.file.startswith(prefix))]


def evaluate_all(claims: Sequence[Claim], load: Loader) -> list[Outcome]:
    return [evaluate_claim(c, load) for c in claims]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    verdicts: dict[str, int] = {}
    for o in outcomes:
        verdicts[o.verdict] = verdicts.get(o.verdict, 0) + 1
    return {
        "total": len(outcomes),
        "passed": sum(o.passed for o in outcomes),
        "failed": sum(not o.passed for o in outcomes),
        "verdicts": verdicts,
    }


def report_json(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {"summary": summary(outcomes), "claims": [o.to_json() for o in outcomes]}


def render_markdown(outcomes: Sequence[Outcome], title: str = "Paper claims") -> str:
    s = summary(outcomes)
    if not outcomes:
        return f"# {title}\n\nNo claim reads these results.\n"
    lines = [
        f"# {title}",
        "",
        f"{s['passed']} of {s['total']} claims pass ({', '.join(f'{v}: {n}' for v, n in sorted(s['verdicts'].items()))}).",
        "",
        "| claim | paper | paper's statement | expected | measured | result |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        c = o.claim
        mark = "PASS" if o.passed else "FAIL"
        measured = _fmt(o.measured) if o.measured is not None else "n/a"
        if o.detail:
            measured += f" ({o.detail})"
        lines.append(f"| `{c.id}` | {c.paper} | {_md(c.statement)} | `{_md(c.expected_text())}` | {_md(measured)} | {mark}: {o.verdict} |")
    notes = [o for o in outcomes if o.claim.reason or o.verdict in ("missing", "invalid")]
    if notes:
        lines += ["", "## Notes", ""]
        for o in notes:
            text = o.claim.reason if o.claim.reason else o.detail
            lines.append(f"- `{o.claim.id}` ({o.verdict}): {_md(text)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- helpers

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(x: Any, what: str) -> float:
    if isinstance(x, Mapping) and "mean" in x:  # {"mean", "std", "values"} summaries compare by mean
        x = x["mean"]
    if not _is_number(x):
        raise TypeError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _numbers(x: Any, what: str) -> list[float]:
    if not isinstance(x, list) or not x:
        raise TypeError(f"{what} must be a non-empty list of numbers, got {x!r}")
    return [_number(v, what) for v in x]


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return x


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
