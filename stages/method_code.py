"""Stage `method_code`: per training stage, the hash of every source file it runs
(cmkd/pipeline/codedeps.py):

    data/method_code/<run>.json                 distill@<dataset>-<run>: stages/train.py, the
                                                training code and the run's method modules, and
                                                the run's and STUDENT's selections in tuned.yaml
    data/method_code/stages/teacher.json        train_teacher@<dataset>
    data/method_code/stages/student.json        train_student@<dataset> (and STUDENT's selection)
    data/method_code/stages/experiments.json    exp_*: stages/experiment.py, the analysis code
                                                and the methods the experiments use

Each of those stages depends on its file, so editing or adding one method module reruns only
the runs that use it, and dvc.lock holds one entry where it held a dozen source files. A run's
tuned.yaml selection is in its file rather than a DVC param of the distill stage, so a run that
tuned.yaml does not name yet (a new method) needs no entry there.

Reads the source with `ast` and never imports torch: the stage takes well under a second."""

import json
from pathlib import Path

from cmkd.config import STUDENT_RUN, STUDENT_TUNING, TEACHER_RUN, load_params
from cmkd.errors import ConfigError
from cmkd.pipeline.codedeps import stage_code
from cmkd.pipeline.layout import METHOD_CODE, TUNED_FILE
from cmkd.pipeline.tuning import load_tuned
from cmkd.utils.atomic import atomic_dir
from stages._common import main, parser


def _write(path: Path, name: str, files: dict[str, str], **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": name, "files": files, **extra}, indent=2, sort_keys=True) + "\n")


def run() -> None:
    args = parser(__doc__).parse_args()
    params = load_params(args.params)
    runs = params.get("runs") or {}
    tuned = load_tuned(Path(args.params).with_name(TUNED_FILE))
    root = Path.cwd()
    with atomic_dir(METHOD_CODE) as out:
        for name in params.get("methods") or []:
            if name not in runs:
                raise ConfigError("methods", f"unknown run {name!r}: not a key of `runs` (known: {sorted(runs)})")
            _write(out / f"{name}.json", name, stage_code(root, "stages/train.py", runs[name]),
                   tuned=tuned.get(name) or {}, student_tuned=tuned.get(STUDENT_TUNING) or {})
        _write(out / "stages" / "teacher.json", "teacher", stage_code(root, "stages/train.py", TEACHER_RUN))
        _write(out / "stages" / "student.json", "student", stage_code(root, "stages/train.py", STUDENT_RUN),
               tuned=tuned.get(STUDENT_TUNING) or {})
        # the experiments' methods (kd, ntdh_mask, MG-KD's ...) and the baselines they train
        used = [params.get("experiments") or {}, TEACHER_RUN, STUDENT_RUN]
        _write(out / "stages" / "experiments.json", "experiments", stage_code(root, "stages/experiment.py", used))


if __name__ == "__main__":
    main(run)
