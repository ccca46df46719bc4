"""`python -m stages readme [--check]`: rewrite README.md's generated blocks (compact results tables,
claims' verdicts, the diagnosis's standing) and the whole results page docs/results.md from
data/reports/ after a run;
`--check` exits 1 when either is not current. See cmkd/reporting/readme.py."""

import sys
from pathlib import Path

from cmkd.config import load_params
from cmkd.pipeline.layout import REPORTS
from cmkd.reporting.readme import blocks, replace_blocks, results_page
from cmkd.utils.atomic import write_text
from stages._common import main, parser


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--readme", default="README.md")
    p.add_argument("--results-page", default="docs/results.md")
    p.add_argument("--reports", default=str(REPORTS))
    p.add_argument("--check", action="store_true", help="only check that README.md and the results page are current")
    args = p.parse_args()
    datasets = load_params(args.params)["datasets"]
    readme, page = Path(args.readme), Path(args.results_page)
    reports = Path(args.reports)
    wanted = {
        readme: replace_blocks(readme.read_text(), blocks(reports, datasets)),
        page: results_page(reports, datasets),
    }
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path}: results differ from {reports} (run `python -m stages readme`)", file=sys.stderr)
        if stale:
            sys.exit(1)
        print(f"{readme}, {page}: current", file=sys.stderr)
        return
    for path in stale:
        write_text(path, wanted[path])
        print(f"{path}: updated from {reports}", file=sys.stderr)


if __name__ == "__main__":
    main(run)
