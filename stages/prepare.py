"""Stage `prepare@<dataset>`: raw files -> data/prepared/<dataset>.h5."""

from cmkd.data.registry import dataset_module
from cmkd.pipeline.layout import prepared_file, raw_dir
from stages._common import main, parser, start


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    args = p.parse_args()
    params = start(args, data_only=True)
    module = dataset_module(args.dataset, cfg=params["data"][args.dataset])
    # prepare() writes through PreparedWriter, which renames into place only on success.
    module.prepare(params["data"][args.dataset], raw_dir(args.dataset), prepared_file(args.dataset),
                   progress=not args.no_progress)


if __name__ == "__main__":
    main(run)
