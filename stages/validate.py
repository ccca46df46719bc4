"""`python -m stages validate`: check params.yaml as a whole before any work starts.

`make repro` and the README's commands run it before `dvc repro`: DVC reads params.yaml while
it loads dvc.yaml, so a typo such as `datasets: [synthetc]` would otherwise surface as DVC's
"Parameters 'data.synthetc' are missing" instead of our one line naming the key and the known
names. A user's own paired data (data.<name>.kind: paired) is read too, in chunks: a missing
file or array, unequal lengths, bad labels, NaN or infinite values fail here, before any stage.
Exit status 2 and one line `error: <key>: <problem>` (or `error: <file>: <problem>`) on a bad
value; nothing is written."""

import sys

from cmkd.config import load_params, validate_params
from cmkd.data.datasets.paired import check_sources, is_paired
from cmkd.reporting.claims import check_params
from stages._common import main, parser


def run() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    validate_params(params)
    check_params(params)  # the check stages' block (cmkd.reporting.claims: not part of the training code)
    for ds in params["datasets"]:  # a user's own data: every check `prepare` makes, nothing written
        if is_paired(params["data"][ds]):
            check_sources(params["data"][ds], f"data.{ds}")
    print(f"{args.params}: ok", file=sys.stderr)


if __name__ == "__main__":
    main(run)
