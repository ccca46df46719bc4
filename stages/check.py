"""DVC stage `check`: compare the pipeline's results with the papers' claims.

Reads params `check.claims` (the claims file) and `check.fail_on_mismatch`; writes
data/reports/claims.json and data/reports/claims.md; exits 1 when a claim fails, unless
`--report-only` is given or `check.fail_on_mismatch` is false. See cmkd/claims.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from cmkd.atomic import write_json, write_text
from cmkd.claims import ResultMissing, evaluate_all, load_claims, render_markdown, report_json
from cmkd.errors import ConfigError, DataFormatError

log = logging.getLogger("check")


def json_loader(root: Path):
    cache: dict[str, Any] = {}

    def load(file: str) -> Any:
        if file not in cache:
            path = root / file
            try:
                cache[file] = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"{file} does not exist") from None
            except json.JSONDecodeError as err:
                raise ResultMissing(f"{file} is not valid JSON ({err})") from None
        return cache[file]

    return load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--claims", help="claims file (default: params check.claims)")
    ap.add_argument("--out-dir", default="data/reports", help="where claims.json and claims.md go")
    ap.add_argument("--root", default=".", help="folder the claims' result paths are relative to")
    ap.add_argument("--report-only", action="store_true", help="write the report but never fail")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    params = yaml.safe_load(Path(args.params).read_text()) or {}
    check = params.get("check") or {}
    claims_file = args.claims or check.get("claims", "claims.yaml")
    fail_on_mismatch = check.get("fail_on_mismatch", True)
    if not isinstance(fail_on_mismatch, bool):
        raise ConfigError("check.fail_on_mismatch", f"must be true or false, got {fail_on_mismatch!r}")

    claims = load_claims(claims_file)
    outcomes = evaluate_all(claims, json_loader(Path(args.root)))
    out = Path(args.out_dir)
    write_json(out / "claims.json", report_json(outcomes))
    write_text(out / "claims.md", render_markdown(outcomes))

    failed = [o for o in outcomes if not o.passed]
    for o in outcomes:
        log.info("%-4s %s: %s", "ok" if o.passed else "FAIL", o.claim.id, o.verdict)
    log.info("%d of %d claims pass; report in %s", len(outcomes) - len(failed), len(outcomes), out / "claims.md")
    if failed and fail_on_mismatch and not args.report_only:
        log.error("failed claims: %s", ", ".join(o.claim.id for o in failed))
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataFormatError) as err:
        print(f"check: {err}", file=sys.stderr)
        sys.exit(2)
