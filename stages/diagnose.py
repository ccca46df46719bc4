"""Stage `diagnose@<dataset>`: will KD help here? From the trained TEACHER and the no-KD STUDENT
(data/runs/<dataset>/{teacher,student}) on the validation split, the indicators of
cmkd/diagnosis.py and the predicted KD gain of the committed predictor (diagnosis_predictor.json)
-> data/diagnosis/<dataset>.json and .md. Runs before, and independent of, every distill stage.

    python -m stages diagnose --dataset synthetic
"""

from pathlib import Path

from cmkd.atomic import write_json, write_text
from cmkd.determinism import provenance
from cmkd.diagnosis_report import apply_predictor, check_config, diagnosis_markdown, load_predictor, measure_dataset
from cmkd.resolve import models_of, origin_note, roles_for_prepared
from stages._common import DATA, main, parser, start

PREDICTOR_FILE = "diagnosis_predictor.json"


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--out-dir", default=f"{DATA}/diagnosis")
    args = p.parse_args()
    params = start(args)
    ds = args.dataset
    prepared = Path(DATA) / "prepared" / f"{ds}.h5"
    roles = roles_for_prepared(params, ds, prepared)  # the models train_*@<ds> trained
    cfg = check_config(params.get("diagnosis"))
    predictor = load_predictor(Path(args.params).with_name(PREDICTOR_FILE))
    runs = Path(DATA) / "runs" / ds
    result = measure_dataset(prepared, runs / "teacher", runs / "student", models_of(roles), params["seeds"], ds, cfg)
    result = apply_predictor(result, predictor, cfg)
    result["provenance"] = provenance()
    note = origin_note(roles)  # a paired dataset's models chosen from its input shapes
    if note:
        result["models_origin"] = note
    out = Path(args.out_dir)
    write_json(out / f"{ds}.json", result)
    write_text(out / f"{ds}.md", (f"{note}\n\n" if note else "") + diagnosis_markdown(result))


if __name__ == "__main__":
    main(run)
