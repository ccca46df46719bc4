"""Stage `diagnose@<dataset>`: will KD help here? From the trained TEACHER and the no-KD STUDENT
(data/runs/<dataset>/{teacher,student}) on the validation split, the indicators of
cmkd/diagnosis.py and the predicted KD gain of the committed predictor (diagnosis_predictor.json)
-> data/diagnosis/<dataset>.json and .md. Runs before, and independent of, every distill stage.

    python -m stages diagnose --dataset synthetic
"""

from pathlib import Path

from cmkd.utils.atomic import write_json, write_text
from cmkd.utils.determinism import provenance
from cmkd.diagnosis.report import apply_predictor, check_config, diagnosis_markdown, load_predictor, measure_dataset
from cmkd.errors import ConfigError
from cmkd.pipeline.layout import DIAGNOSIS, PREDICTOR_FILE, prepared_file, run_dir
from stages._common import main, parser, start


def run() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--out-dir", default=str(DIAGNOSIS))
    args = p.parse_args()
    params = start(args)
    ds = args.dataset
    if ds not in params["models"]:
        raise ConfigError(f"models.{ds}", "missing")
    cfg = check_config(params.get("diagnosis"))
    predictor = load_predictor(Path(args.params).with_name(PREDICTOR_FILE))
    result = measure_dataset(prepared_file(ds), run_dir(ds, "teacher"), run_dir(ds, "student"), params["models"][ds],
                             params["seeds"], ds, cfg)
    result = apply_predictor(result, predictor, cfg)
    result["provenance"] = provenance()
    out = Path(args.out_dir)
    write_json(out / f"{ds}.json", result)
    write_text(out / f"{ds}.md", diagnosis_markdown(result))


if __name__ == "__main__":
    main(run)
