"""Stage `resolve`: what each dataset's stages use, in files DVC can track. Per dataset of
`datasets`, data/resolved/<name>/:

    teacher.json, student.json   the role's model and training (cmkd/training/resolve.py): params.yaml's
                                 blocks, or for a user's paired data the defaults chosen from
                                 its input shapes with params.yaml's overrides over them
    sources.json                 a paired dataset's split files and their sha256 (a registered
                                 dataset's download stage fetches its own: a constant)

The training, diagnosis and report stages depend on these files instead of `models.<name>` /
`train.<name>` params keys, which a paired dataset need not have (DVC fails on a missing params
key). DVC runs this stage on every `dvc repro` (always_changed): the user's files live outside
the repository, where no dependency in dvc.yaml can name them (`data.<name>.path` cannot be
interpolated in a stage template). A file whose content is unchanged keeps its hash, so only
what a change touches reruns. A split file's sha256 is reused while its size, mtime and inode
are the previous run's (stat.json), so unchanged large files are not read again.
"""

import json
from pathlib import Path

from cmkd.data.datasets.paired import input_shapes, is_paired, sha256, split_paths
from cmkd.pipeline.layout import RESOLVED
from cmkd.training.resolve import ROLES, resolve_roles
from cmkd.utils.atomic import write_json
from stages._common import main, parser, start


def write_if_changed(path: Path, obj) -> None:
    if not path.exists() or json.loads(path.read_text()) != json.loads(json.dumps(obj)):
        write_json(path, obj)


def checksums(cfg, key: str, stat_file: Path) -> dict[str, str]:
    """{file name: sha256} of the split files, reusing the previous run's for unchanged stats."""
    previous = json.loads(stat_file.read_text()) if stat_file.exists() else {}
    stats, sums = {}, {}
    for path in split_paths(cfg, key).values():
        st = path.stat()
        stat = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        old = previous.get(path.name) or {}
        digest = old["sha256"] if {k: old.get(k) for k in stat} == stat and "sha256" in old else sha256(path)
        stats[path.name] = {**stat, "sha256": digest}
        sums[path.name] = digest
    write_if_changed(stat_file, stats)
    return sums


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(RESOLVED))
    args = p.parse_args()
    params = start(args, data_only=True)
    for ds in params["datasets"]:
        cfg, out = params["data"][ds], Path(args.out_dir) / ds
        if is_paired(cfg):
            shapes = input_shapes(cfg, f"data.{ds}")  # the headers: missing files and arrays fail here
            sources = {"kind": "paired", "sha256": checksums(cfg, f"data.{ds}", out / "stat.json")}
        else:
            shapes, sources = None, {"kind": "registered", "fetched_by": f"download@{ds}"}
        roles = resolve_roles(params, ds, shapes)
        for role in ROLES:
            write_if_changed(out / f"{role}.json", roles[role])
        write_if_changed(out / "sources.json", sources)


if __name__ == "__main__":
    main(run)
