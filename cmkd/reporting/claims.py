"""Paper claims, checked against the pipeline's results.

A claims file (``claims.yaml`` at the repository root) lists what the papers say, each claim in
a form a program can decide, and the configuration the claims were made for:

```yaml
configuration:                           # sha256 (16 hex) of each params subset a claim depends on
  experiments.mfh_gamma: 0123456789abcdef
claims:
  - id: mfh-gamma-kd-gain-rises          # unique, [a-z0-9_-]
    paper: MFH                           # short paper name
    statement: KD gain over no-KD rises with the share of modality-general features.
    paper_reports: Fig. 2 ...            # optional: what the paper reports, in words / numbers
    tests: definition                    # optional: definition | variant (of the paper's method)
    source:                              # the measurement
      file: data/reports/experiments/mfh_gamma.json
      path: points[*].kd_gain            # JSON path, see `resolve_path`
    x: {file: ..., path: points[*].general_share}   # trends: the x axis (default: point index)
    against: {file: ..., path: ...}      # optional second measurement (pairwise comparisons)
    comparison: increasing               # see COMPARISONS
    value: 0.0                           # threshold (or [lo, hi] for `between`)
    tolerance: 0.0                       # slack in the paper's favour (exact numbers only; see below)
    paired: true                         # optional; false forces Welch's test between two samples
    expected_verdict: reproduced         # reproduced | not_reproduced | inconclusive | not_run
    reason: ...                          # required unless expected_verdict is reproduced
    depends_on: [experiments.mfh_gamma]  # params keys whose values the claim was made for
    optional: true                       # optional: results absent -> not_run, reported, not enforced
    command: dvc repro exp_mfh_gamma     # what regenerates the number (for the docs)
```

Verdicts. Every claim ends as ``reproduced`` (the paper's comparison holds, significantly),
``not_reproduced`` (significantly the other way; for a threshold, the interval lies on the
wrong side), ``inconclusive`` (neither) or ``not_run`` (its results files are missing or
unreadable, or lack the JSON path; the detail names the file and why). A claim `passed` exactly
when its verdict equals `expected_verdict`, and is `changed` otherwise. The check reports every
changed claim loudly and succeeds; only its strict mode (`--strict`, for regression tests) fails
on a changed claim, unless the claim is not enforced: the current params differ from its
recorded configuration (`depends_on` keys whose hash differs), or it is optional and its
results are absent.

Measurements are exact numbers or per-seed samples: summaries ``{"mean", "sem" or "std",
"n", ["values", "seeds"]}`` (the experiments' points, the main tables' rows). Exact numbers are
compared as written (with the tolerance). Samples are tested at one-sided alpha = 0.05 with the
t distribution:

- ``>``, ``>=``, ``<``, ``<=`` against a value: one-sample t test of mean - value (n - 1 df);
  against another sample: paired t test of the per-seed differences when both carry values for
  the same seeds (``seeds`` when present, else position), else Welch's t test.
- ``all <op>`` over k points: every point significant (intersection-union test: at most alpha
  under the null); not reproduced when some point is significant the other way at alpha / k
  (Bonferroni). ``any <op>``: some point significant at alpha / k; not reproduced when every
  point is significantly the other way.
- ``==`` (|m - v| <= tolerance) and ``between`` (value [lo, hi]): both one-sided tests against the
  bounds (TOST); not reproduced when the mean is significantly outside (alpha / 2 each side).
- ``increasing`` / ``decreasing``: per seed, the least-squares slope of the values on `x`
  (the point index by default; per-seed x values when `x` resolves to samples), then a
  one-sample t test of the slopes against 0. Lists of exact numbers: the last value exceeds
  (falls below) the first by more than the tolerance and no step goes back by more than it.

A sample of one seed cannot be tested: inconclusive. Tolerances on samples shift the tested
bound in the paper's favour and are not used by the repository's claims.

Everything here is pure: `load_claims` parses and validates, `evaluate_claim` decides one claim
against already-loaded JSON documents (and the params it runs under), `render_markdown` formats
the report, `record_configuration` rewrites a claims file's configuration hashes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cmkd.errors import ConfigError, DataFormatError
from cmkd.utils.jsonable import jsonable
from cmkd.utils.stats import ALPHA, one_sided, seed_slopes, welch

SCALAR_OPS = (">", ">=", "<", "<=")
ELEMENTWISE = tuple(f"{q} {op}" for q in ("all", "any") for op in SCALAR_OPS)
TRENDS = ("increasing", "decreasing")
COMPARISONS = SCALAR_OPS + ("==", "between") + ELEMENTWISE + TRENDS
VERDICTS = ("reproduced", "not_reproduced", "inconclusive", "untestable", "not_run")
TESTS = ("definition", "variant")
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_KNOWN_KEYS = {"id", "paper", "statement", "paper_reports", "source", "against", "x", "comparison", "value",
               "tolerance", "expected_verdict", "reason", "command", "optional", "tests", "depends_on", "paired",
               "margin", "restates", "inert_if"}
_TOP_KEYS = ("claims", "configuration", "margins")
#: the params-like key under which tuned.yaml's selections are hashed (`depends_on: [tuned.kdv1.digits]`)
TUNED_KEY = "tuned"
_REPLACED = {"status": "replaced by `expected_verdict` (reproduced | not_reproduced | inconclusive | not_run)",
             "significance": "replaced by calibrated t tests at alpha 0.05 (see cmkd/reporting/claims.py)"}

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
class Margin:
    """The smallest difference that counts as an effect for one kind of comparison (claims.yaml
    `margins`): `value` in the compared quantity's unit, `reason` why that size."""

    kind: str
    value: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "reason": self.reason}


NO_MARGIN = Margin("none", 0.0, "no margin declared: any significant difference counts")


@dataclass(frozen=True)
class InertCheck:
    """When the mechanism a claim tests is off. Either `equals` (the value at `source` equals it,
    e.g. a selected `k_fraction` of 1.0 keeps every channel; `reason` says so) or, without
    `equals`, a mechanism record ``{"inert": bool, "reason": str, ...}`` at `source` (a run's
    measured activity). Absent results or records mean "not known to be inert"."""

    source: Source
    equals: Any = None
    reason: str = ""

    def inert(self, load: Loader) -> str | None:
        """The reason the mechanism is off, or None when it is not known to be."""
        try:
            value = measure(self.source, load)
        except ResultMissing:
            return None
        if self.equals is not None:
            same = (_is_number(value) and _is_number(self.equals) and math.isclose(value, self.equals)) \
                or value == self.equals
            return f"{self.reason} ({self.source.describe()} = {_fmt(value)})" if same else None
        if isinstance(value, Mapping) and value.get("inert") is True:
            why = value.get("reason") or "the run recorded its mechanism as inert"
            share = value.get("active_share")
            extra = f", active share {_fmt(float(share))}" if _is_number(share) else ""
            return f"{why} ({self.source.describe()}{extra})"
        return None


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
    x: Source | None = None
    expected_verdict: str = "reproduced"
    reason: str = ""
    paper_reports: str = ""
    command: str = ""
    optional: bool = False
    tests: str = ""
    paired: bool = True
    #: (params key, recorded hash) for every key the claim depends on
    configuration: tuple[tuple[str, str], ...] = ()
    margin: Margin = NO_MARGIN
    #: the id of the claim this one restates (its verdict is not counted a second time)
    restates: str = ""
    inert_if: tuple[InertCheck, ...] = ()

    def expected_text(self) -> str:
        """The paper's expectation in one line, e.g. ``points[*].kd_gain increasing in gamma``."""
        slack = f" (slack {_fmt(self.tolerance)})" if self.tolerance else ""
        rhs = self.against.path if self.against is not None else _fmt(self.value)
        if self.comparison in TRENDS:
            over = f" in {self.x.path}" if self.x is not None else ""
            return f"{self.source.path} {self.comparison}{over}{slack}"
        if self.comparison == "between":
            return f"{self.source.path} in {_fmt(self.value)}{slack}"
        if self.comparison == "==":
            return f"{self.source.path} == {rhs} +- {_fmt(self.tolerance)}"
        return f"{self.source.path} {self.comparison} {rhs}{slack}"

    def config_differences(self, params: Mapping[str, Any] | None) -> list[str]:
        """The `depends_on` keys whose value in `params` differs from the recorded one."""
        if params is None:
            return []
        return [key for key, digest in self.configuration if params_hash(params, key) != digest]


@dataclass
class Outcome:
    """One claim's verdict, as written to claims.json."""

    claim: Claim
    measured: Any
    verdict: str
    detail: str = ""
    against_measured: Any = None
    statistics: dict[str, Any] = field(default_factory=dict)
    enforced: bool = True
    note: str = ""

    @property
    def passed(self) -> bool:
        """The verdict equals the one recorded from the last committed run (`expected_verdict`):
        a regression lock, not evidence for the paper."""
        return self.verdict == self.claim.expected_verdict

    @property
    def changed(self) -> bool:
        """The verdict differs from the recorded `expected_verdict` (reported loudly)."""
        return not self.passed

    @property
    def fails_check(self) -> bool:
        """Changed and enforced: what the check's strict mode fails on."""
        return self.enforced and self.changed

    def to_json(self) -> dict[str, Any]:
        c = self.claim
        out = {
            "id": c.id,
            "paper": c.paper,
            "statement": c.statement,
            "expected": c.expected_text(),
            "measured": jsonable(self.measured),
            "verdict": self.verdict,
            "expected_verdict": c.expected_verdict,
            "passed": self.passed,
            "changed": self.changed,
            "enforced": self.enforced,
            "source": c.source.describe(),
            "margin": c.margin.to_json(),
        }
        if c.restates:
            out["restates"] = c.restates
        if c.against is not None:
            out["against"] = c.against.describe()
            out["against_measured"] = jsonable(self.against_measured)
        for key in ("tests", "reason", "paper_reports", "command"):
            if getattr(c, key):
                out[key] = getattr(c, key)
        if self.statistics:
            out["statistics"] = jsonable(self.statistics)
        if self.detail:
            out["detail"] = self.detail
        if self.note:
            out["note"] = self.note
        return out


# --------------------------------------------------------------------------- configuration

def check_params(params: Mapping[str, Any]) -> str:
    """The params `check` block (optional), validated; returns the claims file (`check.claims`,
    default claims.yaml). There is no params switch for failing: a changed verdict never fails
    the check stage, `python -m stages check --strict` does. (Here rather than in cmkd.config,
    which is part of every training stage's code hash.)"""
    check = params.get("check")
    if check is None:
        return "claims.yaml"
    if not isinstance(check, Mapping):
        raise ConfigError("check", "must be a mapping (`claims: <file>`)")
    if "fail_on_mismatch" in check:
        raise ConfigError("check.fail_on_mismatch", "was removed: the check stage reports a changed verdict and "
                          "succeeds; `python -m stages check --strict` fails on it (delete the key)")
    unknown = sorted(set(check) - {"claims"})
    if unknown:
        raise ConfigError(f"check.{unknown[0]}", "unknown key; known: claims")
    claims = check.get("claims", "claims.yaml")
    if not (isinstance(claims, str) and claims.strip()):
        raise ConfigError("check.claims", f"must be a file name, got {claims!r}")
    return claims


def with_tuned(params: Mapping[str, Any], tuned: Mapping[str, Any] | None) -> dict[str, Any]:
    """params with tuned.yaml's selections under `tuned` (<run>: {<dataset>: {...}}), so a claim can
    depend on `tuned.<run>.<dataset>`: the hyper-parameters its runs trained with come from both."""
    if TUNED_KEY in params:
        raise ConfigError(TUNED_KEY, "is reserved for tuned.yaml's selections in the claims' configuration")
    if tuned is not None and not isinstance(tuned, Mapping):
        raise ConfigError(TUNED_KEY, f"tuned.yaml must be a mapping, got {type(tuned).__name__}")
    return {**params, TUNED_KEY: dict(tuned or {})}


def params_hash(params: Mapping[str, Any], key: str) -> str:
    """sha256 (first 16 hex digits) of the canonical JSON of params at dotted `key` (None if absent)."""
    node: Any = params
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    text = json.dumps(node, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_CONFIG_LINE = re.compile(r"^(\s+)([A-Za-z0-9_.\-]+):(\s*)(\S*)(\s*#.*)?$")


def record_configuration(text: str, params: Mapping[str, Any], path: str | Path = "claims.yaml") -> str:
    """The claims file `text` with every hash of its `configuration:` block set from `params`
    (comments and layout kept). Every key some claim depends on must already be listed there."""
    doc = yaml.safe_load(text)
    claims = parse_claims(doc, path, check_configuration=False)
    listed = set(doc.get("configuration") or {})
    needed = {key for c in claims for key, _ in c.configuration}
    missing = sorted(needed - listed)
    if missing:
        raise ClaimsError(path, f"`configuration` lacks {missing[0]!r}, which a claim depends on; add a line for it")
    lines = text.splitlines(keepends=True)
    inside = False
    for i, line in enumerate(lines):
        if line.startswith("configuration:"):
            inside = True
            continue
        if inside:
            if line.strip() and not line[0].isspace():
                break
            m = _CONFIG_LINE.match(line.rstrip("\n"))
            if m and m.group(2) in listed:
                indent, key, _, _, comment = m.groups()
                lines[i] = f"{indent}{key}: {params_hash(params, key)}{comment or ''}\n"
    return "".join(lines)


# --------------------------------------------------------------------------- loading

def read_claims_yaml(path: Path, missing: str = "file not found") -> Any:
    """The claims file's YAML document; a missing or unparsable file is a ClaimsError naming it."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ClaimsError(path, missing) from None
    except yaml.YAMLError as err:
        raise ClaimsError(path, f"not valid YAML: {err}") from None


def load_claims(path: str | Path) -> list[Claim]:
    """Parse and validate a claims file; every problem names the file and the claim."""
    path = Path(path)
    return parse_claims(read_claims_yaml(path), path)


def parse_claims(doc: Any, path: str | Path = "claims.yaml", check_configuration: bool = True) -> list[Claim]:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("claims"), list) or not doc["claims"]:
        raise ClaimsError(path, "must be a mapping with a non-empty list under `claims`")
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise ClaimsError(path, f"unknown top-level key {unknown[0]!r}; known: {', '.join(_TOP_KEYS)}")
    recorded = doc.get("configuration") or {}
    if not isinstance(recorded, Mapping) or not all(isinstance(v, str) or v is None for v in recorded.values()):
        raise ClaimsError(path, "`configuration` must map params keys to hashes (strings)")
    margins = parse_margins(doc.get("margins"), path)
    claims: list[Claim] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["claims"]):
        where = f"claims[{i}]"
        if not isinstance(raw, Mapping):
            raise ClaimsError(path, f"{where}: must be a mapping")
        if isinstance(raw.get("id"), str):
            where = f"claim {raw['id']!r}"
        claim = _parse_claim(raw, path, where, recorded, check_configuration, margins)
        if claim.id in seen:
            raise ClaimsError(path, f"{where}: duplicate id")
        seen.add(claim.id)
        claims.append(claim)
    by_id = {c.id: c for c in claims}
    for c in claims:
        if not c.restates:
            continue
        target = by_id.get(c.restates)
        if target is None or target.id == c.id:
            raise ClaimsError(path, f"claim {c.id!r}: `restates` must name another claim of the file, "
                                    f"got {c.restates!r}")
        if target.restates:
            raise ClaimsError(path, f"claim {c.id!r}: restates {target.id!r}, which itself restates "
                                    f"{target.restates!r}; name the original")
    return claims


def parse_margins(raw: Any, path: str | Path = "claims.yaml") -> dict[str, Margin]:
    """claims.yaml `margins`: ``<kind>: {value: number >= 0, reason: why this size}``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ClaimsError(path, "`margins` must map a kind of comparison to {value, reason}")
    margins = {}
    for kind, spec in raw.items():
        if not (isinstance(spec, Mapping) and set(spec) <= {"value", "unit", "reason"}):
            raise ClaimsError(path, f"margins.{kind}: must be a mapping with `value`, `reason` (and `unit`)")
        value, reason = spec.get("value"), spec.get("reason")
        if not (_is_number(value) and value >= 0):
            raise ClaimsError(path, f"margins.{kind}.value: must be a number >= 0, got {value!r}")
        if not (isinstance(reason, str) and reason.strip()):
            raise ClaimsError(path, f"margins.{kind}.reason: say why this size (a non-empty string)")
        margins[str(kind)] = Margin(str(kind), float(value), " ".join(reason.split()))
    return margins


#: the margin kind (claims.yaml `margins`) each table metric is judged with, against STUDENT
TABLE_MARGIN_KINDS = {"f1_weighted": "table_f1", "miou": "table_miou"}


def table_margins(path: str | Path) -> dict[str, dict[str, Any]]:
    """{table metric: {kind, value, reason}} from the claims file's `margins` (TABLE_MARGIN_KINDS),
    so the tables (cmkd.reporting.tables.collect) judge with the margin the claims declare, not a
    second copy. A metric whose kind the file does not declare is left out (its table: no margin)."""
    path = Path(path)
    doc = read_claims_yaml(path, "file not found (params `check.claims` names it)")
    margins = parse_margins(doc.get("margins") if isinstance(doc, Mapping) else None, path)
    return {metric: margins[kind].to_json() for metric, kind in TABLE_MARGIN_KINDS.items() if kind in margins}


def _parse_claim(raw: Mapping[str, Any], path: str | Path, where: str, recorded: Mapping[str, Any],
                 check_configuration: bool, margins: Mapping[str, Margin] | None = None) -> Claim:
    def fail(problem: str) -> ClaimsError:
        return ClaimsError(path, f"{where}: {problem}")

    for key, why in _REPLACED.items():
        if key in raw:
            raise fail(f"`{key}` was {why}")
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
    x = _parse_source(raw["x"], fail, "x") if raw.get("x") is not None else None
    if x is not None and comparison not in TRENDS:
        raise fail(f"`x` applies to {list(TRENDS)} only")
    value = raw.get("value")
    if comparison == "between":
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)
                and value[0] <= value[1]):
            raise fail("comparison 'between' needs `value: [lo, hi]` with lo <= hi")
    elif comparison in TRENDS:
        if value is not None or against is not None:
            raise fail(f"comparison {comparison!r} takes neither `value` nor `against` (its axis is `x`)")
    elif against is None:
        if not _is_number(value):
            raise fail(f"comparison {comparison!r} needs a numeric `value`")
    elif value is not None:
        raise fail("give either `value` or `against`, not both")
    tolerance = raw.get("tolerance", 0.0)
    if not _is_number(tolerance) or tolerance < 0:
        raise fail("`tolerance` must be a number >= 0")
    expected = raw.get("expected_verdict", "reproduced")
    if expected not in VERDICTS:
        raise fail(f"`expected_verdict` must be one of {list(VERDICTS)}, got {expected!r}")
    reason = raw.get("reason") or ""
    if expected != "reproduced" and not (isinstance(reason, str) and reason.strip()):
        raise fail(f"expected_verdict {expected} needs a `reason` (what was measured and why it differs)")
    for key in ("paper_reports", "command"):
        if key in raw and not isinstance(raw[key], str):
            raise fail(f"`{key}` must be a string")
    for key in ("optional", "paired"):
        if not isinstance(raw.get(key, False), bool):
            raise fail(f"`{key}` must be true or false")
    tests = raw.get("tests", "")
    if tests and tests not in TESTS:
        raise fail(f"`tests` must be one of {list(TESTS)}, got {tests!r}")
    depends_on = raw.get("depends_on", [])
    if not isinstance(depends_on, list) or not all(isinstance(k, str) and k for k in depends_on):
        raise fail("`depends_on` must be a list of params keys")
    margin = NO_MARGIN
    if raw.get("margin") is not None:
        kind = raw["margin"]
        if not isinstance(kind, str) or kind not in (margins or {}):
            raise fail(f"`margin` must name one of the file's `margins` ({sorted(margins or {})}), got {kind!r}")
        margin = (margins or {})[kind]
        if comparison in ("==", "between") and margin.value > 0:
            raise fail(f"comparison {comparison!r} is an equivalence test: its bounds are its margin")
    restates = raw.get("restates") or ""
    if not isinstance(restates, str):
        raise fail("`restates` must be the id of another claim")
    inert_if = raw.get("inert_if") or []
    if not isinstance(inert_if, list):
        raise fail("`inert_if` must be a list of {file, path[, equals, reason]}")
    checks = []
    for i, spec in enumerate(inert_if):
        if not isinstance(spec, Mapping) or not set(spec) <= {"file", "path", "equals", "reason"}:
            raise fail(f"inert_if[{i}]: must be a mapping with file, path and optionally equals, reason")
        src = _parse_source(spec, fail, f"inert_if[{i}]")
        if "equals" in spec and not (isinstance(spec.get("reason"), str) and spec["reason"].strip()):
            raise fail(f"inert_if[{i}]: `equals` needs a `reason` (why that value switches the mechanism off)")
        checks.append(InertCheck(src, spec.get("equals"), " ".join(str(spec.get("reason", "")).split())))
    if check_configuration:
        for key in depends_on:
            if not isinstance(recorded.get(key), str):
                raise fail(f"depends on {key!r}, which has no hash under `configuration` "
                           "(python -m stages check --record-configuration writes them)")
    return Claim(
        id=raw["id"], paper=raw["paper"], statement=" ".join(raw["statement"].split()), source=source,
        comparison=comparison, value=value, tolerance=float(tolerance), against=against, x=x,
        expected_verdict=expected, reason=" ".join(str(reason).split()),
        paper_reports=" ".join(raw.get("paper_reports", "").split()), command=raw.get("command", ""),
        optional=raw.get("optional", False), tests=tests, paired=raw.get("paired", True),
        configuration=tuple((k, str(recorded.get(k))) for k in depends_on),
        margin=margin, restates=restates, inert_if=tuple(checks),
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
        if isinstance(tok, int) or (isinstance(node, list) and tok.lstrip("-").isdigit()):
            index = int(tok)
            if not isinstance(node, list) or not -len(node) <= index < len(node):
                raise ResultMissing(f"{path}: no element [{index}]")
            node = node[index]
        else:
            if isinstance(node, Mapping) and tok in node:
                node = node[tok]
            else:
                raise ResultMissing(f"{path}: no key {tok!r}")
    return node


# --------------------------------------------------------------------------- evaluation

Loader = Callable[[str], Any]


@dataclass(frozen=True)
class Sample:
    """A measurement: an exact number (sem None, n 0) or a per-seed sample's summary."""

    mean: float
    sem: float | None = None
    n: int = 0
    values: tuple[float, ...] | None = None
    seeds: tuple[str, ...] | None = None

    @property
    def exact(self) -> bool:
        return self.n == 0

    @property
    def testable(self) -> bool:
        return self.exact or (self.n >= 2 and self.sem is not None)


def as_sample(x: Any, what: str) -> Sample:
    """A number or a summary {"mean", "sem" | "std", "n", ["values", "seeds"]} as a Sample."""
    if isinstance(x, Mapping) and "mean" in x:
        mean = _number(x["mean"], f"{what}.mean")
        values = x.get("values")
        if isinstance(values, list) and values:
            v = np.asarray(_numbers(values, f"{what}.values"))
            n = len(v)
            sem = float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else None
            seeds = x.get("seeds")
            seeds = tuple(str(s) for s in seeds) if isinstance(seeds, list) and len(seeds) == n else None
            return Sample(mean, sem, n, tuple(float(a) for a in v), seeds)
        n = x.get("n")
        if not (_is_number(n) and n >= 1):
            raise TypeError(f"{what} is a summary without `values` or `n`: {x!r}")
        if _is_number(x.get("sem")):
            sem = float(x["sem"])
        elif _is_number(x.get("std")):
            sem = float(x["std"]) / math.sqrt(n)
        else:
            raise TypeError(f"{what} is a summary without `values`, `sem` or `std`: {x!r}")
        return Sample(mean, sem if n > 1 else None, int(n))
    return Sample(_number(x, what))


def _pairs(a: Sample, b: Sample) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-seed values of a and b on the seeds both have (by `seeds`, else by position)."""
    if a.values is None or b.values is None:
        return None
    if a.seeds is not None and b.seeds is not None:
        other = dict(zip(b.seeds, b.values))
        common = [(v, other[s]) for s, v in zip(a.seeds, a.values) if s in other]
        if len(common) < 2:
            return None
        return np.array([p for p, _ in common]), np.array([q for _, q in common])
    if len(a.values) != len(b.values):
        return None
    return np.asarray(a.values), np.asarray(b.values)


def difference(a: Sample, b: Sample, paired: bool = True) -> tuple[float, float, float, str] | None:
    """(a - b, standard error, df, test name); None when it cannot be tested (n < 2)."""
    if a.exact and b.exact:
        return a.mean - b.mean, 0.0, math.inf, "exact"
    if not (a.testable and b.testable):
        return None
    if b.exact:
        return a.mean - b.mean, a.sem, a.n - 1, "one-sample t"
    if a.exact:
        return a.mean - b.mean, b.sem, b.n - 1, "one-sample t"
    pairs = _pairs(a, b) if paired else None
    if pairs is not None:
        d = pairs[0] - pairs[1]
        return float(d.mean()), float(d.std(ddof=1)) / math.sqrt(len(d)), len(d) - 1, "paired t"
    diff, se, df = welch(a.mean, a.sem, a.n, b.mean, b.sem, b.n)
    return diff, se, df, "Welch t"


def scalar_p(op: str, a: Sample, b: Sample, tolerance: float = 0.0,
             paired: bool = True) -> tuple[float, float, dict[str, Any]]:
    """(p of the paper's side, p of the other side, statistics) of `a op b` (op in SCALAR_OPS)."""
    sign = 1.0 if op.startswith(">") else -1.0
    if a.exact and b.exact:  # exact numbers: the comparison as written
        holds = _OPS[op](a.mean, b.mean, tolerance)
        return (0.0, 1.0, {"test": "exact"}) if holds else (1.0, 0.0, {"test": "exact"})
    d = difference(a, b, paired)
    if d is None:
        return 1.0, 1.0, {"test": "untestable (fewer than 2 seeds)"}
    diff, se, df, name = d
    p_paper, p_other = one_sided(sign * diff + tolerance, se, df)
    return p_paper, p_other, {"test": name, "difference": diff, "se": se, "df": df, "p": p_paper}


def decide(effect: float, se: float, df: float, margin: float = 0.0, alpha: float = ALPHA) -> tuple[str, str]:
    """(verdict, why) for an estimated `effect` in the paper's direction (positive: the paper's
    way) with standard error `se`, against the smallest effect that counts, `margin`:

    - reproduced: the effect exceeds the margin, one-sided at `alpha` (with margin 0: the
      interval excludes 0 in the paper's direction);
    - not_reproduced: the effect is significantly the other way (one-sided at `alpha`), or both
      one-sided tests place it inside (-margin, +margin) (TOST: no effect of a size that counts);
    - inconclusive: neither.

    Each wrong verdict has probability at most `alpha` at its boundary: `reproduced` when the
    true effect is exactly the margin, `not_reproduced` when it is exactly the margin or 0 the
    other way."""
    if one_sided(effect - margin, se, df)[0] < alpha:
        return "reproduced", "beyond the margin" if margin > 0 else "significant"
    if one_sided(effect, se, df)[1] < alpha:
        return "not_reproduced", "significantly the other way"
    if margin > 0 and one_sided(effect + margin, se, df)[0] < alpha and one_sided(effect - margin, se, df)[1] < alpha:
        return "not_reproduced", "inside the margin"
    return "inconclusive", ""


def _decide_exact(holds: bool, effect: float, margin: float) -> tuple[str, str]:
    """Exact numbers: the comparison as written, and a difference smaller than the margin is no effect."""
    if holds and (margin == 0 or effect >= margin):
        return "reproduced", ""
    if margin > 0 and abs(effect) < margin:
        return "not_reproduced", "inside the margin"
    return "not_reproduced", "the other way"


def scalar_test(op: str, a: Sample, b: Sample, tolerance: float = 0.0, paired: bool = True, margin: float = 0.0,
                alpha: float = ALPHA) -> tuple[str, dict[str, Any]]:
    """(verdict, statistics) of `a op b` (op in SCALAR_OPS) against the margin."""
    sign = 1.0 if op.startswith(">") else -1.0
    p_paper, _, st = scalar_p(op, a, b, tolerance, paired)
    if st["test"] == "exact":
        effect = sign * (a.mean - b.mean) + tolerance
        verdict, why = _decide_exact(_OPS[op](a.mean, b.mean, tolerance), effect, margin)
    elif "se" not in st:
        return "inconclusive", st
    else:
        verdict, why = decide(sign * st["difference"] + tolerance, st["se"], st["df"], margin, alpha)
        if margin > 0:
            st["p_beyond_margin"] = one_sided(sign * st["difference"] + tolerance - margin, st["se"], st["df"])[0]
    if why:
        st["why"] = why
    return verdict, st


def measure(source: Source, load: Loader) -> Any:
    """The value at `source`; ResultMissing naming the file and why when the file is missing or
    unreadable (whatever `load` raises: OSError, ValueError such as invalid JSON, ResultMissing)
    or lacks the path."""
    try:
        doc = load(source.file)
    except FileNotFoundError:
        raise ResultMissing(f"{source.file} does not exist") from None
    except ResultMissing as err:
        text = str(err)
        raise ResultMissing(text if source.file in text else f"{source.file}: {text}") from None
    except (OSError, ValueError) as err:  # unreadable, a folder, not UTF-8, not JSON
        raise ResultMissing(f"{source.file} cannot be read ({type(err).__name__}: {err})") from None
    try:
        return resolve_path(doc, source.path)
    except ResultMissing as err:
        raise ResultMissing(f"{source.file} lacks {err}") from None


def evaluate_claim(claim: Claim, load: Loader, params: Mapping[str, Any] | None = None) -> Outcome:
    """Decide one claim. `load(file)` returns the parsed JSON of a results file or raises
    (FileNotFoundError, another OSError, ValueError, ResultMissing): a claim whose results are
    missing or unreadable ends as `not_run`, never an exception. `params` (params.yaml) decides
    whether it is enforced."""
    differ = claim.config_differences(params)
    note = f"not enforced: params differ from the claim's configuration: {', '.join(differ)}" if differ else ""
    try:
        measured = measure(claim.source, load)
        against = measure(claim.against, load) if claim.against else None
        x = measure(claim.x, load) if claim.x else None
    except ResultMissing as err:
        if claim.optional and not note:
            note = "not enforced: results absent or unreadable (optional claim)"
        return Outcome(claim, None, "not_run", detail=f"results unavailable: {err}", enforced=not note, note=note)
    try:
        verdict, shown, detail, statistics = compare(claim.comparison, measured, claim.value, claim.tolerance, against,
                                                     x=x, paired=claim.paired, margin=claim.margin.value)
    except (TypeError, ValueError) as err:
        return Outcome(claim, jsonable(measured), "not_run", detail=f"invalid measurement: {err}",
                       against_measured=against, enforced=not note, note=note)
    inert = [why for check in claim.inert_if if (why := check.inert(load)) is not None]
    if inert:  # the mechanism under test was off: the numbers say nothing about it
        statistics = {**statistics, "verdict_if_active": verdict}
        verdict, detail = "untestable", "mechanism inert: " + "; ".join(inert)
    return Outcome(claim, shown, verdict, detail=detail,
                   against_measured=_means(against) if against is not None else None,
                   statistics=statistics, enforced=not note, note=note)


def compare(comparison: str, measured: Any, value: Any, tolerance: float, against: Any = None, *, x: Any = None,
            paired: bool = True, alpha: float = ALPHA, margin: float = 0.0) -> tuple[str, Any, str, dict[str, Any]]:
    """Apply a comparison; returns (verdict, the measured value to show, a one-line detail,
    the test's statistics). `margin`: the smallest effect that counts (see `decide`; not used
    by the equivalence tests `==` and `between`, whose bounds are their margin). Raises
    ValueError / TypeError when the measurement has the wrong shape for the comparison."""
    t = float(tolerance)
    if comparison in SCALAR_OPS:
        a = as_sample(measured, "measured")
        b = as_sample(against, "against") if against is not None else Sample(float(value))
        verdict, st = scalar_test(comparison, a, b, t, paired, margin, alpha)
        return verdict, a.mean, _describe(comparison, a, b, st), st
    if comparison in ("==", "between"):
        a = as_sample(measured, "measured")
        if comparison == "==":
            b = as_sample(against, "against") if against is not None else Sample(float(value))
            lo_b, hi_b, shift = -t, t, b
        else:
            lo_b, hi_b, shift = float(value[0]) - t, float(value[1]) + t, Sample(0.0)
        # TOST: above the lower bound and below the upper bound, each one-sided at alpha
        above = scalar_p(">", a, _shifted(shift, lo_b), 0.0, paired)
        below = scalar_p("<", a, _shifted(shift, hi_b), 0.0, paired)
        if max(above[0], below[0]) < alpha:
            verdict = "reproduced"
        elif min(above[1], below[1]) < alpha / 2:
            verdict = "not_reproduced"
        else:
            verdict = "inconclusive"
        st = {"test": f"TOST ({above[2]['test']})", "p_above_lower": above[0], "p_below_upper": below[0]}
        return verdict, a.mean, f"{_fmt(a.mean)} within [{_fmt(lo_b)}, {_fmt(hi_b)}] of {_fmt(shift.mean)}", st
    if comparison in ELEMENTWISE:
        quantifier, op = comparison.split()
        ms = _list(measured, "measured")
        if against is not None:
            rhs = _list(against, "against")
            if len(rhs) != len(ms):
                raise ValueError(f"measured has {len(ms)} values but against has {len(rhs)}")
        else:
            rhs = [Sample(float(value))] * len(ms)
        k = len(ms)
        at_alpha = [scalar_test(op, m, r, t, paired, margin, alpha) for m, r in zip(ms, rhs)]
        at_bonferroni = [scalar_test(op, m, r, t, paired, margin, alpha / k)[0] for m, r in zip(ms, rhs)]
        first = [v for v, _ in at_alpha]
        if quantifier == "all":  # intersection-union: every point at alpha; Bonferroni the other way
            verdict = ("reproduced" if all(v == "reproduced" for v in first)
                       else "not_reproduced" if "not_reproduced" in at_bonferroni else "inconclusive")
        else:
            verdict = ("reproduced" if "reproduced" in at_bonferroni
                       else "not_reproduced" if all(v == "not_reproduced" for v in first) else "inconclusive")
        n_sig = sum(v == "reproduced" for v in first)
        test = at_alpha[0][1]["test"]
        st = {"test": test, "p": [s.get("p", 1.0) for _, s in at_alpha], "point_verdicts": first}
        if margin > 0:
            st["p_beyond_margin"] = [s.get("p_beyond_margin", 1.0) for _, s in at_alpha]
        what = "beyond the margin" if margin > 0 else "significant"
        return verdict, [m.mean for m in ms], f"{n_sig}/{k} points {what} ({test})", st
    if comparison in TRENDS:
        return _trend(comparison, measured, x, t, alpha, margin)
    raise ValueError(f"unknown comparison {comparison!r}")


def _trend(comparison: str, measured: Any, x: Any, tolerance: float, alpha: float,
           margin: float = 0.0) -> tuple[str, Any, str, dict[str, Any]]:
    """The slope test; the margin applies to the fitted change over the sweep (slope times the
    range of x), in the unit of the measured values."""
    ys = _list(measured, "measured")
    if len(ys) < 2:
        raise ValueError("a trend needs at least two points")
    sign = 1.0 if comparison == "increasing" else -1.0
    xs = _list(x, "x") if x is not None else [Sample(float(i)) for i in range(len(ys))]
    if len(xs) != len(ys):
        raise ValueError(f"measured has {len(ys)} points but x has {len(xs)}")
    means = [y.mean for y in ys]
    if all(y.exact for y in ys):  # exact numbers: a monotone rise (fall) beyond the tolerance
        order = np.argsort([p.mean for p in xs], kind="stable")
        ms = [means[i] for i in order]
        steps = [sign * (b - a) for a, b in zip(ms, ms[1:])]
        holds = sign * (ms[-1] - ms[0]) > tolerance and min(steps) >= -tolerance
        verdict, why = _decide_exact(holds, sign * (ms[-1] - ms[0]), margin)
        st = {"test": "exact", **({"why": why} if why else {})}
        return verdict, means, f"first->last {_fmt(ms[-1] - ms[0])}", st
    if any(y.values is None for y in ys) or len({len(y.values) for y in ys}) != 1:
        raise TypeError("a trend over samples needs per-seed `values`, the same seeds at every point")
    y = _aligned(ys)
    xv = _aligned(xs) if all(p.values is not None for p in xs) else np.array([p.mean for p in xs])
    if y.shape[1] < 2:
        return "inconclusive", means, "one seed: no slope test", {"test": "untestable (fewer than 2 seeds)"}
    slopes = seed_slopes(y, xv)
    n = len(slopes)
    mean, se = float(slopes.mean()), float(slopes.std(ddof=1)) / math.sqrt(n)
    p_paper, _ = one_sided(sign * mean + tolerance, se, n - 1)
    x_means = [p.mean for p in xs]
    span = max(x_means) - min(x_means)
    verdict, why = decide((sign * mean + tolerance) * span, se * span, n - 1, margin, alpha)
    st = {"test": "t test of per-seed slopes", "slope": mean, "se": se, "df": n - 1, "p": p_paper,
          "change_over_sweep": mean * span, "change_se": se * span}
    if margin > 0:
        st["p_beyond_margin"] = one_sided((sign * mean + tolerance) * span - margin, se * span, n - 1)[0]
    if why:
        st["why"] = why
    return (verdict, means, f"slope {_fmt(mean)} (s.e. {_fmt(se)}, {n} seeds, p {_fmt(p_paper)}; "
                            f"change over the sweep {_fmt(mean * span)})", st)


def _aligned(samples: Sequence[Sample]) -> np.ndarray:
    """[points, seeds] values, columns matched by `seeds` when every point has them."""
    if all(s.seeds is not None for s in samples):
        seeds = [sd for sd in samples[0].seeds if all(sd in s.seeds for s in samples)]
        return np.array([[dict(zip(s.seeds, s.values))[sd] for sd in seeds] for s in samples])
    return np.array([s.values for s in samples])


def _shifted(s: Sample, by: float) -> Sample:
    return Sample(s.mean + by, s.sem, s.n, None if s.values is None else tuple(v + by for v in s.values), s.seeds)


def _list(x: Any, what: str) -> list[Sample]:
    if not isinstance(x, list) or not x:
        raise TypeError(f"{what} must be a non-empty list, got {x!r}")
    return [as_sample(v, f"{what}[{i}]") for i, v in enumerate(x)]


def _means(x: Any) -> Any:
    if isinstance(x, list):
        return [_means(v) for v in x]
    if isinstance(x, Mapping) and "mean" in x:
        return x["mean"]
    return x


def _describe(op: str, a: Sample, b: Sample, st: Mapping[str, Any]) -> str:
    if st["test"] == "exact":
        return f"{_fmt(a.mean)} {op} {_fmt(b.mean)}"
    if "se" not in st:
        return f"{_fmt(a.mean)} vs {_fmt(b.mean)}: {st['test']}"
    return (f"difference {_fmt(st['difference'])} (s.e. {_fmt(st['se'])}, {st['test']}, df {_fmt(float(st['df']))}, "
            f"p {_fmt(st['p'])})")


def filter_claims(claims: Sequence[Claim], prefix: str) -> list[Claim]:
    """The claims whose results files (source, against, x) all lie under `prefix`."""
    return [c for c in claims if all(s is None or s.file.startswith(prefix) for s in (c.source, c.against, c.x))]


def evaluate_all(claims: Sequence[Claim], load: Loader, params: Mapping[str, Any] | None = None) -> list[Outcome]:
    return [evaluate_claim(c, load, params) for c in claims]


def summary(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts of each verdict over the independent claims (a claim that restates another is
    listed under `restating` and not counted again; inconclusive is never reproduced), how many
    verdicts are unchanged from the ones recorded after the last committed run (a regression
    lock, not evidence: `expected_verdict` is copied from an observed verdict), the changed
    claims, and those of them that are enforced (what `--strict` fails on)."""
    counted = [o for o in outcomes if not o.claim.restates]
    return {
        "total": len(counted),
        "verdicts": {v: sum(o.verdict == v for o in counted) for v in VERDICTS},
        "restating": {o.claim.id: o.claim.restates for o in outcomes if o.claim.restates},
        "unchanged": sum(o.passed for o in outcomes),
        "checked": len(outcomes),
        "changed": [o.claim.id for o in outcomes if o.changed],
        "not_enforced": [o.claim.id for o in outcomes if not o.enforced],
        "changed_enforced": [o.claim.id for o in outcomes if o.fails_check],
    }


def summary_line(outcomes: Sequence[Outcome]) -> str:
    s = summary(outcomes)
    counts = ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in s["verdicts"].items())
    if s["restating"]:
        n = len(s["restating"])
        counts += f" ({n} restating claim{'s' if n > 1 else ''} not counted again)"
    line = f"{counts}; {s['unchanged']} of {s['checked']} unchanged from the recorded verdicts"
    if s["not_enforced"]:
        line += f"; {len(s['not_enforced'])} not enforced"
    if s["changed_enforced"]:
        line += f"; {len(s['changed_enforced'])} changed verdict: {', '.join(s['changed_enforced'])}"
    return line


def changed_line(o: Outcome) -> str:
    """One changed claim in words: its id, the verdict measured and the one expected."""
    line = (f"{o.claim.id}: verdict {o.verdict.replace('_', ' ')}, recorded "
            f"{o.claim.expected_verdict.replace('_', ' ')}")
    extra = "; ".join(t for t in (o.detail if o.verdict in ("not_run", "untestable") else "", o.note) if t)
    return f"{line} ({extra})" if extra else line


def report_json(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {"summary": summary(outcomes), "claims": [o.to_json() for o in outcomes]}


def render_markdown(outcomes: Sequence[Outcome], title: str = "Paper claims") -> str:
    if not outcomes:
        return f"# {title}\n\nNo claim reads these results.\n"
    lines = [f"# {title}", ""] + _changed_section(outcomes) + [
        f"Verdicts: {summary_line(outcomes)}. A verdict is `reproduced` only when the paper's comparison holds "
        "beyond the claim's margin (one-sided, alpha 0.05, t distribution over seeds); `inconclusive` is not "
        "reproduced; `untestable`: the mechanism under test was inert. The column `recorded` is the verdict "
        "recorded after the last committed run (claims.yaml `expected_verdict`): it locks against regressions "
        "and is not the paper's prediction, which is `reproduced` for every claim.",
        "",
        "| claim | paper | tests | paper's statement | test | margin | measured | verdict | recorded | |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        c = o.claim
        measured = _fmt(o.measured) if o.measured is not None else "n/a"
        if o.detail:
            measured += f" ({o.detail})"
        if o.statistics.get("why") and o.verdict != "untestable":
            measured += f"; {o.statistics['why']}"
        mark = "ok" if o.passed else ("changed (not enforced)" if not o.enforced else "**CHANGED**")
        if c.restates:
            mark += f"; restates `{c.restates}`, not counted"
        margin = f"{_fmt(c.margin.value)} ({c.margin.kind})" if c.margin is not NO_MARGIN else "0"
        lines.append(f"| `{c.id}` | {c.paper} | {c.tests or ''} | {_md(c.statement)} | `{_md(c.expected_text())}` | "
                     f"{margin} | {_md(measured)} | {o.verdict.replace('_', ' ')} | "
                     f"{c.expected_verdict.replace('_', ' ')} | {mark} |")
    notes = [o for o in outcomes if o.claim.reason or o.note or o.verdict in ("not_run", "untestable")]
    if notes:
        lines += ["", "## Notes", ""]
        for o in notes:
            shown = o.detail if o.verdict in ("not_run", "untestable") else ""
            text = " ".join(t for t in (o.claim.reason, shown, o.note) if t)
            lines.append(f"- `{o.claim.id}` ({o.verdict.replace('_', ' ')}): {_md(text)}")
    margins = {o.claim.margin.kind: o.claim.margin for o in outcomes if o.claim.margin is not NO_MARGIN}
    if margins:
        lines += ["", "## Margins", "", "The smallest difference that counts as an effect, per kind of comparison "
                  "(claims.yaml `margins`):", ""]
        lines += [f"- `{m.kind}` {_fmt(m.value)}: {_md(m.reason)}" for m in margins.values()]
    return "\n".join(lines) + "\n"


def _changed_section(outcomes: Sequence[Outcome]) -> list[str]:
    """The report's first section when some verdict differs from its recorded expectation
    (nothing when none does, so an unchanged report keeps its bytes)."""
    changed = [o for o in outcomes if o.changed]
    if not changed:
        return []
    enforced = [o for o in changed if o.enforced]
    head = (f"## CHANGED: {len(changed)} verdict{'s' if len(changed) > 1 else ''} "
            f"differ{'' if len(changed) > 1 else 's'} from claims.yaml")
    lines = [head, ""]
    for o in sorted(changed, key=lambda o: not o.enforced):
        lines.append(f"- {'**CHANGED**' if o.enforced else 'changed (not enforced)'} `{o.claim.id}`: verdict "
                     f"**{o.verdict.replace('_', ' ')}**, recorded {o.claim.expected_verdict.replace('_', ' ')}"
                     + (f"; {_md(o.detail)}" if o.verdict == "not_run" and o.detail else "")
                     + (f"; {_md(o.note)}" if o.note else ""))
    lines += ["", (f"The check does not fail on {'them' if len(enforced) > 1 else 'it'} "
                   "(`python -m stages check --strict` does). " if enforced else "")
              + "A new verdict that is right is recorded as the claim's `expected_verdict` in claims.yaml "
              "(why in `reason`; the measured numbers are in this report).", ""]
    return lines


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
