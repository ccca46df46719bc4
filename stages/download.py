"""Stage `download@<dataset>`: fetch (or, for generated data, record) a dataset's raw files."""

from cmkd.data.registry import dataset_module
from cmkd.pipeline.layout import raw_dir
from cmkd.utils.atomic import atomic_dir
from stages._common import SCRATCH, main, parser, start


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    args = p.parse_args()
    params = start(args, data_only=True)
    module = dataset_module(args.dataset, cfg=params["data"][args.dataset])
    with atomic_dir(raw_dir(args.dataset), scratch=SCRATCH) as tmp:
        module.download(params["data"][args.dataset], tmp, progress=not args.no_progress)


if __name__ == "__main__":
    main(run)
