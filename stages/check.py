"""Stages `check` and `check_tables@<dataset>`: compare results with the papers' claims.

Reads params `check.claims` (the claims file) and `check.fail_on_mismatch`; evaluates the
claims whose results files lie under `--sources` (all by default: `check` takes the synthetic
experiments, `check_tables@<dataset>` the main table of one dataset); writes claims.json and
claims.md to `--out-dir`; exits 1 when an enforced claim's verdict differs from its expected
verdict, unless `--report-only` is given or `check.fail_on_mismatch` is false. A claim is
enforced only under the params it was made for (claims.yaml `configuration`, the claim's
`depends_on`); under any other params it is reported, marked "not enforced".
`--record-configuration` rewrites the claims file's configuration hashes from the current
params (after a run whose verdicts are the ones recorded). See cmkd/claims.py.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from cmkd.atomic import write_json, write_text
from cmkd.claims import (
    ResultMissing, evaluate_all, filter_claims, load_claims, record_configuration, render_markdown, report_json,
    summary_line,
)
from cmkd.errors import ConfigError
from stages._common import DATA, main, parser, start

log = logging.getLogger("check")


def json_loader(root: Path) -> Callable[[str], Any]:
    """Load (once) the results files claims read; paths are relative to `root`."""
    cache: dict[str, Any] = {}

    def load(file: str) -> Any:
        if file not in cache:
            try:
                cache[file] = json.loads((root / file).read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{file} does not exist") from None
            except json.JSONDecodeError as err:
                raise ResultMissing(f"{file} is not valid JSON ({err})") from None
        return cache[file]

    return load


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--claims", help="claims file (default: params check.claims)")
    p.add_argument("--out-dir", default=f"{DATA}/reports", help="where claims.json and claims.md go")
    p.add_argument("--root", default=".", help="folder the claims' result files are relative to")
    p.add_argument("--report-only", action="store_true", help="write the report but never fail")
    p.add_argument("--sources", default="", help="check only the claims whose results files start with this prefix")
    p.add_argument("--record-configuration", action="store_true",
                   help="write the current params' hashes into the claims file's `configuration` and exit")
    args = p.parse_args()
    params = start(args)
    check = params.get("check") or {}
    claims_file = args.claims or check.get("claims", "claims.yaml")
    fail_on_mismatch = check.get("fail_on_mismatch", True)
    if not isinstance(fail_on_mismatch, bool):
        raise ConfigError("check.fail_on_mismatch", f"must be true or false, got {fail_on_mismatch!r}")
    if args.record_configuration:
        path = Path(claims_file)
        text = record_configuration(path.read_text(), params, path)
        write_text(path, text)
        log.info("recorded the configuration of %s from %s", path, args.params)
        return

    claims = filter_claims(load_claims(claims_file), args.sources)
    outcomes = evaluate_all(claims, json_loader(Path(args.root)), params)
    out = Path(args.out_dir)
    write_json(out / "claims.json", report_json(outcomes))
    title = f"Paper claims on {args.sources.rstrip('/')}" if args.sources else "Paper claims"
    write_text(out / "claims.md", render_markdown(outcomes, title))

    for o in outcomes:
        mark = "ok" if o.passed else ("changed, not enforced" if not o.enforced else "CHANGED")
        log.info("%-22s %s: %s (expected %s)%s", mark, o.claim.id, o.verdict, o.claim.expected_verdict,
                 f"; {o.note}" if o.note else "")
    log.info("%s; report in %s", summary_line(outcomes), out / "claims.md")
    failed = [o for o in outcomes if o.fails_check]
    if failed and fail_on_mismatch and not args.report_only:
        log.error("claims whose verdict changed: %s", ", ".join(o.claim.id for o in failed))
        sys.exit(1)


if __name__ == "__main__":
    main(run)
