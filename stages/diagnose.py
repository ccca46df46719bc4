"""Stage `diagnose@<dataset>`: will KD help here? From the trained TEACHER and the no-KD STUDENT
(data/runs/<dataset>/{teacher,student}) on the validation split, the indicators of
cmkd/diagnosis/indicators.py and the predicted KD gain of the committed predictor (diagnosis_predictor.json)
-> data/diagnosis/<dataset>.json and .md. Runs before, and independent of, every distill stage.

    python -m stages diagnose --dataset synthetic
"""

from pathlib import Path

from cmkd.diagnosis.report import apply_predictor, check_config, diagnosis_markdown, load_predictor, measure_dataset
from cmkd.pipeline.layout import DIAGNOSIS, PREDICTOR_FILE, prepared_file, run_dir
from cmkd.reporting.judgeability import judgeability, split_class_counts
from cmkd.reporting.tables import collect
from cmkd.training.resolve import models_of, origin_note, roles_for_prepared
from cmkd.utils.atomic import write_json, write_text
from cmkd.utils.determinism import provenance
from stages._common import main, parser, start


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--out-dir", default=str(DIAGNOSIS))
    args = p.parse_args()
    params = start(args)
    ds = args.dataset
    prepared = prepared_file(ds)
    roles = roles_for_prepared(params, ds, prepared)  # the models train_*@<ds> trained
    cfg = check_config(params.get("diagnosis"))
    predictor = load_predictor(Path(args.params).with_name(PREDICTOR_FILE))
    result = measure_dataset(prepared_file(ds), run_dir(ds, "teacher"), run_dir(ds, "student"), models_of(roles),
                             params["seeds"], ds, cfg)
    result = apply_predictor(result, predictor, cfg)
    # the same record as the table's (stage evaluate): a teacher at chance or below STUDENT has nothing to give
    pair = collect([run_dir(ds, "teacher"), run_dir(ds, "student")])
    result["judgeability"] = judgeability(pair, split_class_counts(prepared, params["seeds"]))
    result["provenance"] = provenance()
    note = origin_note(roles)  # a paired dataset's models chosen from its input shapes
    if note:
        result["models_origin"] = note
    out = Path(args.out_dir)
    write_json(out / f"{ds}.json", result)
    write_text(out / f"{ds}.md", (f"{note}\n\n" if note else "") + diagnosis_markdown(result))


if __name__ == "__main__":
    main(run)
