"""Where the pipeline's files lie, relative to the repository root: every path under data/,
metrics/ and reports/ that a stage reads or writes, defined once. The stage scripts take their
paths from here; dvc.yaml and tuning/dvc.yaml, DVC's map of the same files, necessarily repeat
them (tests/test_layout.py checks that they agree). Inside a run's folder (seed<k>/model.pt,
metrics.json, ...) the layout is cmkd/pipeline/train.py's.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
# Temporary outputs (a stage's folder before its rename into place): outside every stage's
# dependencies, on the same filesystem as data/.
SCRATCH = DATA / ".tmp"
RAW = DATA / "raw"
PREPARED = DATA / "prepared"
RUNS = DATA / "runs"
CHECKPOINTS = DATA / "checkpoints"
REPORTS = DATA / "reports"
EXPERIMENTS = REPORTS / "experiments"
DIAGNOSIS = DATA / "diagnosis"
DIAGNOSIS_VALIDATION = REPORTS / "diagnosis"
METHOD_CODE = DATA / "method_code"
PLOTS_PAGE = DATA / "plots_offline.html"
TUNING = DATA / "tuning"
RESOLVED = DATA / "resolved"  # each dataset's model and training per role, and its source files' checksums
TUNING_REPORTS = Path("reports") / "tuning"
# Beside params.yaml (git-tracked inputs)
PREDICTOR_FILE = "diagnosis_predictor.json"
TUNED_FILE = "tuned.yaml"


def raw_dir(dataset: str) -> Path:
    return RAW / dataset


def prepared_file(dataset: str) -> Path:
    return PREPARED / f"{dataset}.h5"


def runs_dir(dataset: str) -> Path:
    return RUNS / dataset


def run_dir(dataset: str, run: str) -> Path:
    """A training stage's output: `teacher`, `student` or a distillation run of `runs`."""
    return RUNS / dataset / run


def checkpoint_dir(dataset: str, run: str) -> Path:
    """Resumable checkpoints, outside DVC's outputs (a killed stage resumes instead of restarting)."""
    return CHECKPOINTS / dataset / run


def report_dir(dataset: str) -> Path:
    return REPORTS / dataset


def dataset_metrics(dataset: str) -> Path:
    """evaluate's per-seed detail of every row: read by diagnosis_report and check_tables."""
    return REPORTS / dataset / "metrics.json"


def metrics_dir(dataset: str) -> Path:
    """The few numbers per row that git and DVC keep (`dvc metrics`, `dvc exp show`)."""
    return METRICS / dataset


def experiment_file(name: str, suffix: str = ".json") -> Path:
    return EXPERIMENTS / f"{name}{suffix}"


def diagnosis_file(dataset: str, suffix: str = ".json") -> Path:
    return DIAGNOSIS / f"{dataset}{suffix}"


def measured_diagnosis_file(dataset: str) -> Path:
    """diagnosis_report's copy of a dataset's report, where diagnosis_validation finds them all."""
    return DIAGNOSIS / "measured" / f"{dataset}.json"


def method_code_file(run: str) -> Path:
    """The code hashes of a distillation run (`stages/<name>.json` for teacher, student, experiments)."""
    return METHOD_CODE / f"{run}.json"


def tuning_teacher_dir(dataset: str) -> Path:
    """The TEACHER trained on the tuning seeds."""
    return TUNING / dataset / "teacher"


def tuning_evidence_file(dataset: str, run: str) -> Path:
    return TUNING_REPORTS / dataset / f"{run}.json"


def tuning_report(dataset: str, suffix: str = ".json") -> Path:
    return TUNING_REPORTS / f"{dataset}{suffix}"
