"""Stage `diagnosis_report@<dataset>`: the diagnosis beside the measured KD gain ->
data/reports/<dataset>/diagnosis.json and .md: {"indicators", "predicted_kd_gain": {"mean",
"ci95"}, "measured_kd_gain": kdv1 - STUDENT (paired mean, accuracy) or null when kdv1 did not run,
"comparison": in-sample when the committed predictor was fit with this dataset's gain};
the same JSON as data/diagnosis/measured/<dataset>.json, where diagnosis_validation reads it.

    python -m stages diagnosis_report --dataset synthetic
"""

import json

from cmkd.diagnosis.report import dataset_report, diagnosis_markdown
from cmkd.errors import DataFormatError
from cmkd.pipeline.layout import dataset_metrics, diagnosis_file, measured_diagnosis_file, report_dir
from cmkd.utils.atomic import write_json, write_text
from cmkd.utils.determinism import provenance
from stages._common import main, parser


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    args = p.parse_args()
    ds = args.dataset
    diag_path = diagnosis_file(ds)
    metrics_path = dataset_metrics(ds)
    try:
        diagnosis = json.loads(diag_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(diag_path, f"cannot read the diagnosis (run diagnose@{ds}): {err}") from None
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    report = {**dataset_report(diagnosis, metrics), "provenance": provenance()}
    out = report_dir(ds)
    write_json(out / "diagnosis.json", report)
    write_text(out / "diagnosis.md", diagnosis_markdown({**diagnosis, **report}))
    write_json(measured_diagnosis_file(ds), report)  # diagnosis_validation's input


if __name__ == "__main__":
    main(run)
