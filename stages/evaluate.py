"""Stage `evaluate@<dataset>`: every run's test metrics -> data/reports/<dataset>/
(metrics.json with per-seed detail, table.md, scores.csv and curves.csv for `dvc plots`,
methods.png) and metrics/<dataset>/<row>.json, the few numbers per row that git and DVC keep
(`dvc metrics`, `dvc exp show`). Rows are judged against STUDENT with the margin the claims file
(params `check.claims`) declares for the table's metric (cmkd.reporting.claims.table_margins)."""

import json

from cmkd.data.datasets.paired import is_paired
from cmkd.data.h5 import read_attrs
from cmkd.data.registry import is_smoke_test
from cmkd.errors import ConfigError
from cmkd.pipeline.layout import dataset_metrics, metrics_dir, prepared_file, report_dir, runs_dir
from cmkd.reporting.claims import table_margins
from cmkd.reporting.curves import curves_csv
from cmkd.reporting.judgeability import judgeability, split_class_counts
from cmkd.reporting.tables import bar_figure, collect, markdown_table, metrics_file_name, metrics_summary, scores_csv
from cmkd.training.resolve import origin_note, roles_for_prepared
from cmkd.utils.atomic import atomic_dir, atomic_path, write_json, write_text
from cmkd.utils.determinism import provenance
from stages._common import main, parser, start

SMOKE_NOTE = ("**Smoke test, not a result.** `{ds}` is a small sample generated offline to exercise "
              "the code path end to end; its numbers say nothing about the methods.\n\n")

# A user's own data (data.<name>.kind: paired): how its models were chosen, and that tuned.yaml
# (the tuning protocol's selection) has nothing for it, so every run uses params.yaml's values.
PAIRED_NOTE = "**Your own data.** {models} {tuning}\n\n"
UNTUNED_NOTE = ("Hyper-parameters: params.yaml's `runs` (selected_on: default; tuned.yaml has no selection for "
                "`{ds}`: `dvc repro tuning/dvc.yaml` makes one, docs/tuning.md).")
TUNED_NOTE = "Hyper-parameters: tuned.yaml's selection on the validation split where marked, else params.yaml's `runs`."


def run() -> None:
    p = parser(__doc__)
    p.add_argument("--dataset", required=True)
    args = p.parse_args()
    params = start(args)
    ds = args.dataset
    names = ["teacher", "student"] + list(params["methods"])
    claims_file = (params.get("check") or {}).get("claims")
    if not isinstance(claims_file, str) or not claims_file:
        raise ConfigError("check.claims", "must name the claims file whose `margins` the tables judge with")
    report = collect((runs_dir(ds) / name for name in names), params.get("runs"), table_margins(claims_file))
    if report["provenance"] is None:  # runs that predate provenance records: this process's
        report["provenance"] = {**provenance(), "recorded_by": "evaluate"}
    attrs = read_attrs(prepared_file(ds))
    out = report_dir(ds)
    # A teacher at chance, or below STUDENT, leaves every KD row nothing to distil: the table says so first
    seeds = (report["rows"].get("teacher", {}).get(report["metric"]) or {}).get("seeds") or []
    report["judgeability"] = judgeability(report, split_class_counts(prepared_file(ds), seeds))
    notes = ""
    if is_smoke_test(ds, params["data"][ds]):
        report["smoke_test"] = True
        notes = SMOKE_NOTE.format(ds=ds) + notes
    if is_paired(params["data"][ds]):
        note = origin_note(roles_for_prepared(params, ds, prepared_file(ds)))
        report["models_origin"] = note
        tuned = any(row.get("selected_on") == "val" for row in report["rows"].values())
        notes = PAIRED_NOTE.format(models=note, tuning=(TUNED_NOTE if tuned else UNTUNED_NOTE).format(ds=ds)) + notes
    table = markdown_table(report, ds, (attrs["teacher_modality"], attrs["student_modality"]), notes)
    write_json(dataset_metrics(ds), report)
    write_text(out / "table.md", table)
    write_text(out / "scores.csv", scores_csv(report))
    # DVCLive's per-epoch validation score of every run (mean over seeds), one line per run
    write_text(out / "curves.csv", curves_csv((runs_dir(ds) / name for name in names), "val", report["metric"]))
    with atomic_path(out / "methods.png") as tmp:
        bar_figure(report, ds, tmp.with_suffix(".png"))
        tmp.with_suffix(".png").replace(tmp)
    with atomic_dir(metrics_dir(ds)) as tmp:  # a whole new folder: rows dropped from `methods` go
        for row, numbers in metrics_summary(report).items():
            (tmp / metrics_file_name(row)).write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(run)
