"""Stage `diagnosis_validation`: does the diagnosis predict the KD gain? Every sweep point of the
batched experiments (data/reports/experiments/*.json) and every main dataset with a diagnosis and
a kdv1 row is a condition; the predictor is fit leaving one whole sweep out and predicts it ->
data/reports/diagnosis/validation.json (with bootstrap intervals over sweeps, `spearman_heldout_ci95`
and `sign_accuracy_ci95`, and the `summary` sentence: a prior or a prediction), validation.md and
validation.png (predicted vs measured).

    python -m stages diagnosis_validation
    python -m stages diagnosis_validation --write-predictor   # = python -m stages diagnosis_fit

It also fits the predictor on every condition and records whether the committed
diagnosis_predictor.json is that fit (`predictor_up_to_date`); `--write-predictor` rewrites it.
"""

import json
from pathlib import Path

from cmkd.diagnosis.report import (
    check_config,
    collect_conditions,
    fit_committed,
    validate,
    validation_figure,
    validation_markdown,
)
from cmkd.pipeline.layout import DIAGNOSIS_VALIDATION, EXPERIMENTS, PREDICTOR_FILE, measured_diagnosis_file
from cmkd.utils.atomic import atomic_path, write_json, write_text
from cmkd.utils.determinism import provenance
from stages._common import main, parser, start


def run(write_predictor: bool = False) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--experiments-dir", default=str(EXPERIMENTS))
    p.add_argument("--out-dir", default=str(DIAGNOSIS_VALIDATION))
    p.add_argument("--write-predictor", action="store_true",
                   help=f"rewrite {PREDICTOR_FILE} from every condition, then validate")
    args = p.parse_args()
    params = start(args)
    cfg = check_config(params.get("diagnosis"))
    main_inputs = {ds: measured_diagnosis_file(ds) for ds in params["datasets"]}
    conditions = collect_conditions(Path(args.experiments_dir), main_inputs)
    predictor_path = Path(args.params).with_name(PREDICTOR_FILE)
    if write_predictor or args.write_predictor:
        write_json(predictor_path, fit_committed(conditions, cfg))
    committed = json.loads(predictor_path.read_text()) if predictor_path.is_file() else None
    result = {**validate(conditions, cfg, committed), "provenance": provenance()}
    out = Path(args.out_dir)
    write_json(out / "validation.json", result)
    write_text(out / "validation.md", validation_markdown(result))
    with atomic_path(out / "validation.png") as tmp:
        validation_figure(result, tmp)


if __name__ == "__main__":
    main(run)
