"""Stages `check` and `check_tables@<dataset>`: compare results with the papers' claims.

Reads params `check.claims` (the claims file); evaluates the claims whose results files lie
under `--sources` (all by default: `check` takes the synthetic experiments,
`check_tables@<dataset>` the main table of one dataset); writes claims.json and claims.md to
`--out-dir`. A claim whose verdict differs from its expected verdict (claims.yaml) is reported
loudly: a WARNING line per claim, a CHANGED section at the top of claims.md, `"changed": true`
in claims.json; the stage still exits 0, so a user's `dvc repro` never stops because the
science came out differently on their machine. `--strict` (regression tests) exits 1 when an
enforced claim changed. A claim is enforced only under the params it was made for (claims.yaml
`configuration`, the claim's `depends_on`); under any other params it is reported, marked "not
enforced". A claim whose results files are missing or unreadable ends as `not_run`.
`--record-configuration` rewrites the claims file's configuration hashes from the current
params and tuned.yaml (`tuned.<run>.<dataset>` keys; after a run whose verdicts are the ones
recorded). See cmkd/reporting/claims.py.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cmkd.errors import DataFormatError
from cmkd.pipeline.layout import REPORTS, TUNED_FILE
from cmkd.reporting.claims import (
    ResultMissing,
    changed_line,
    check_params,
    evaluate_all,
    filter_claims,
    load_claims,
    record_configuration,
    render_markdown,
    report_json,
    summary_line,
    with_tuned,
)
from cmkd.utils.atomic import write_json, write_text
from stages._common import main, parser, start

log = logging.getLogger("check")


def json_loader(root: Path) -> Callable[[str], Any]:
    """Load (once) the results files claims read; paths are relative to `root`."""
    cache: dict[str, Any] = {}

    def load(file: str) -> Any:
        if file not in cache:
            try:
                cache[file] = json.loads((root / file).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ResultMissing(f"{file} does not exist") from None
            except OSError as err:  # permissions, a folder, an I/O error
                raise ResultMissing(f"{file} cannot be read ({err.strerror or err})") from None
            except UnicodeDecodeError as err:
                raise ResultMissing(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
            except json.JSONDecodeError as err:
                raise ResultMissing(f"{file} is not valid JSON ({err})") from None
        return cache[file]

    return load


def _read_tuned(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataFormatError(path, f"not valid YAML: {err}") from None


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--claims", help="claims file (default: params check.claims)")
    p.add_argument("--out-dir", default=str(REPORTS), help="where claims.json and claims.md go")
    p.add_argument("--root", default=".", help="folder the claims' result files are relative to")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when an enforced claim's verdict differs from its expected verdict "
                        "(regression tests; without it a changed verdict is reported and the stage succeeds)")
    p.add_argument("--sources", default="", help="check only the claims whose results files start with this prefix")
    p.add_argument("--record-configuration", action="store_true",
                   help="write the current params' hashes into the claims file's `configuration` and exit")
    p.add_argument("--tuned", default=TUNED_FILE,
                   help="the tuned selections (`tuned.<run>.<dataset>` in a claim's depends_on; absent: none)")
    args = p.parse_args()
    params = start(args)
    claims_file = args.claims or check_params(params)
    params = with_tuned(params, _read_tuned(Path(args.tuned)))
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
        if o.changed:
            log.warning("%s %s", "CHANGED" if o.enforced else "changed (not enforced)", changed_line(o))
        else:
            log.info("%-22s %s: %s (recorded %s)%s", "unchanged", o.claim.id, o.verdict, o.claim.expected_verdict,
                     f"; {o.note}" if o.note else "")
    log.info("%s; report in %s", summary_line(outcomes), out / "claims.md")
    failed = [o.claim.id for o in outcomes if o.fails_check]
    if failed and args.strict:
        log.error("--strict: claims whose verdict changed: %s", ", ".join(failed))
        sys.exit(1)
    if failed:
        log.warning("%d claim(s) changed verdict (%s); see %s. The stage succeeds; `python -m stages check "
                    "--strict` fails on them", len(failed), ", ".join(failed), out / "claims.md")


if __name__ == "__main__":
    main(run)
