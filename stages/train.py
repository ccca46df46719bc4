"""Stages `train_teacher@<dataset>`, `train_student@<dataset>` and `distill@<dataset>-<run>`.

    python -m stages train --dataset digits --role teacher
    python -m stages train --dataset digits --role student
    python -m stages train --dataset digits --run kdv1
"""

import shutil
import tempfile
from pathlib import Path

from cmkd.config import STUDENT_RUN, TEACHER_RUN
from cmkd.errors import ConfigError
from cmkd.pipeline.layout import TUNED_FILE, checkpoint_dir, prepared_file, run_dir
from cmkd.pipeline.train import train_run
from cmkd.pipeline.tuning import load_tuned, tuned_run_config, tuned_train_params
from cmkd.training.config import TrainConfig
from cmkd.training.distributed import distributed_info, init_distributed_from_env
from cmkd.training.resolve import models_of, roles_for_prepared
from cmkd.utils.atomic import atomic_dir
from stages._common import SCRATCH, main, parser, seed_workers, start


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--role", choices=["teacher", "student"], help="train the TEACHER or STUDENT baseline")
    group.add_argument("--run", help="a distillation run: a key of `runs` in params.yaml")
    args = p.parse_args()
    params = start(args)
    init_distributed_from_env()
    ds = args.dataset
    name = args.role or args.run
    selected_on = "default"
    # The tuning protocol's selection (tuned.yaml, beside params.yaml): runs.<run> and STUDENT's training.
    tuned = load_tuned(Path(args.params).with_name(TUNED_FILE))
    if args.role == "teacher":
        run_cfg, train_key = TEACHER_RUN, "teacher"
    elif args.role == "student":
        run_cfg, train_key = STUDENT_RUN, "student"
    else:
        if args.run not in params["runs"]:
            raise ConfigError(f"runs.{args.run}", "missing: --run must name a key of `runs`")
        run_cfg, selected_on = tuned_run_config(params["runs"][args.run], tuned, ds, args.run)
        train_key = "student"
    prepared = prepared_file(ds)
    # params.yaml's models / train blocks, or a paired dataset's defaults (data/resolved/<ds>/)
    roles = roles_for_prepared(params, ds, prepared)
    train_params = roles[train_key]["train"]
    if train_key == "student":
        # STUDENT's selected lr is the recipe of STUDENT and of every distill run (docs/tuning.md):
        # a KD row then differs from STUDENT by its KD term only. The TEACHER is not tuned.
        train_params, student_on = tuned_train_params(train_params, tuned, ds)
        if args.role == "student":
            selected_on = student_on
    train_cfg = TrainConfig.from_params(train_params, f"train.{ds}.{train_key}")
    teacher_cfg = TrainConfig.from_params(roles["teacher"]["train"], f"train.{ds}.teacher")
    checkpoints = checkpoint_dir(ds, name)
    rank, _ = distributed_info()
    # Under torchrun only rank 0 writes the stage's outputs; the other ranks train alongside.
    target = atomic_dir(run_dir(ds, name), scratch=SCRATCH) if rank == 0 else tempfile.TemporaryDirectory()
    with target as out:
        out = Path(out)
        train_run(
            dataset=ds, prepared=prepared, run_name=name, run_cfg=run_cfg,
            models=models_of(roles), train_cfg=train_cfg, seeds=params["seeds"], out_dir=out,
            checkpoint_root=checkpoints,
            teacher_dir=run_dir(ds, "teacher") if args.run else None, teacher_train_cfg=teacher_cfg,
            cache_train_logits=args.role == "teacher", progress=not args.no_progress,
            seed_workers=seed_workers(), selected_on=selected_on,
        )
    # The outputs are in place; checkpoints only served to resume an interrupted run.
    if rank == 0:
        shutil.rmtree(checkpoints, ignore_errors=True)


if __name__ == "__main__":
    main(run)
