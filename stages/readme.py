"""`python -m stages readme [--check]`: rewrite README.md's generated blocks (results tables,
claims) from data/reports/ after a run; `--check` exits 1 when README.md is not current.
See cmkd/reporting/readme.py."""

import sys
from pathlib import Path

from cmkd.utils.atomic import write_text
from cmkd.config import load_params
from cmkd.reporting.readme import blocks, replace_blocks
from cmkd.pipeline.layout import REPORTS
from stages._common import main, parser


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--readme", default="README.md")
    p.add_argument("--reports", default=str(REPORTS))
    p.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = p.parse_args()
    params = load_params(args.params)
    readme = Path(args.readme)
    current = readme.read_text()
    new = replace_blocks(current, blocks(Path(args.reports), params["datasets"]))
    if args.check:
        if new != current:
            print(f"{readme}: results differ from {args.reports} (run `python -m stages readme`)", file=sys.stderr)
            sys.exit(1)
        print(f"{readme}: current", file=sys.stderr)
    elif new != current:
        write_text(readme, new)
        print(f"{readme}: updated from {args.reports}", file=sys.stderr)


if __name__ == "__main__":
    main(run)
