"""Reports: aggregate per-run metrics over seeds, tables in the papers' style, figures."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmkd.reporting.judgeability import judgeability_note
from cmkd.training.metrics import primary_metric
from cmkd.utils.stats import (
    ALPHA,
    POWER,
    holm,
    min_detectable_effect,
    paired,
    t_interval,
    table_verdict,
    two_sided_p,
)

BASELINES = ("teacher", "student")


def _mean_std(values: Sequence[float], seeds: Sequence[str] | None = None) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    # Sample standard deviation (ddof=1) as the papers' "mean +- std over runs"; 0 for one seed.
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    out = {"mean": float(arr.mean()), "std": std, "values": [float(v) for v in arr], "n": int(len(arr))}
    if seeds is not None:
        out["seeds"] = [str(s) for s in seeds]  # which seed each value is: the pairing key
    return out


def aggregate_run(run_metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{deployable: {metric: {mean, std, values, n, seeds}}} over the seeds of one run."""
    per_deployable: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for seed, seed_result in run_metrics["seeds"].items():
        for name, metrics in seed_result["test"].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)):
                    per_deployable.setdefault(name, {}).setdefault(metric, []).append((str(seed), float(value)))
    return {name: {m: _mean_std([v for _, v in pairs], [s for s, _ in pairs]) for m, pairs in metrics.items()}
            for name, metrics in per_deployable.items()}


def vs_student(row: Mapping[str, Any], student: Mapping[str, Any], margin: float = 0.0) -> dict[str, Any]:
    """Paired per-seed differences row - STUDENT on the seeds both have:
    {mean, ci95, n, p, p_margin, p_holm, verdict}.

    Same seed = same initialisation and batch order (cmkd.training.distributed.seed_everything), so the
    difference removes the seed's own luck; the interval is the t distribution's. `p`: two-sided paired
    t test against 0; `p_margin`: two-sided test of "beyond +-margin" (cmkd.utils.stats.two_sided_p).
    Alone, the row is its own family (`p_holm` = `p_margin`); `collect` adjusts over the table (holm_adjust).
    """
    student_by_seed = dict(zip(student.get("seeds") or [str(i) for i in range(student["n"])], student["values"]))
    seeds = row.get("seeds") or [str(i) for i in range(row["n"])]
    common = [(v, student_by_seed[s]) for s, v in zip(seeds, row["values"]) if s in student_by_seed]
    if not common:
        return {"mean": None, "ci95": None, "n": 0, "p": None, "p_margin": None, "p_holm": None,
                "verdict": "indistinguishable"}
    diff = paired([a for a, _ in common], [b for _, b in common])
    df = diff["n"] - 1
    out = {"mean": diff["mean"], "ci95": diff["ci95"], "n": diff["n"],
           "p": two_sided_p(diff["mean"], diff["sem"], df),
           "p_margin": two_sided_p(diff["mean"], diff["sem"], df, margin)}
    out["p_holm"] = out["p_margin"]
    out["verdict"] = table_verdict(out["mean"], out["ci95"], out["p_holm"], margin)
    return out


def holm_adjust(rows: Mapping[str, Any], margin: float, alpha: float = ALPHA) -> list[str]:
    """Holm over the table: every row's `vs_student.p_margin` becomes `p_holm` adjusted over all rows
    compared with STUDENT (the family: every row with a verdict, `<run>/<branch>` rows included,
    TEACHER and STUDENT not), and its verdict is decided again from it. Returns the family."""
    family = [name for name, row in rows.items() if (row.get("vs_student") or {}).get("p_margin") is not None]
    adjusted = holm([rows[name]["vs_student"]["p_margin"] for name in family])
    for name, p in zip(family, adjusted):
        vs = rows[name]["vs_student"]
        vs["p_holm"] = p
        vs["verdict"] = table_verdict(vs["mean"], vs["ci95"], p, margin, alpha)
    return family


def detectable_effect(rows: Mapping[str, Any], metric: str, family: Sequence[str], margin: float,
                      alpha: float = ALPHA, power: float = POWER) -> dict[str, Any] | None:
    """The table's minimum detectable effect from the paired spread: the pooled standard deviation of
    the per-seed differences to STUDENT over the family's rows (each row's variance weighted by its
    n - 1), n the fewest seeds a row of the family has. `effect`: the true difference the two-sided
    paired t test at `alpha` finds with `power`; `effect_verdict`: the one at which a better / worse
    verdict has that power at Holm's strictest step (alpha / k) and beyond the margin. None when no
    row has two seeds or the differences do not vary."""
    student = rows.get("student", {}).get(metric)
    if student is None:
        return None
    by_seed = dict(zip(student.get("seeds") or [str(i) for i in range(student["n"])], student["values"]))
    ss, dfs, ns = 0.0, 0, []
    for name in family:
        stat = rows[name][metric]
        seeds = stat.get("seeds") or [str(i) for i in range(stat["n"])]
        d = np.asarray([v - by_seed[s] for s, v in zip(seeds, stat["values"]) if s in by_seed], dtype=np.float64)
        if len(d) >= 2:
            ss += float(((d - d.mean()) ** 2).sum())
            dfs += len(d) - 1
            ns.append(len(d))
    if not dfs or ss <= 0:
        return None
    sd, n, k = math.sqrt(ss / dfs), min(ns), len(family)
    return {"power": power, "alpha": alpha, "n": n, "rows": k, "sd_diff": sd, "df_pooled": dfs, "margin": margin,
            "effect": min_detectable_effect(sd, n, power, alpha),
            "effect_verdict": min_detectable_effect(sd, n, power, alpha / k, margin)}


def collect(run_dirs: Iterable[Path], run_configs: Mapping[str, Any] | None = None,
            margins: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Read every run's metrics.json into one dict keyed by row name.

    The trained network of a run is its row (`teacher`, `student`, `kdv1`, ...); runs with
    several deployable networks (DisCoM-KD) add one row per extra network, `<run>/<name>`.
    Every row but TEACHER and STUDENT gets `vs_student` (paired against STUDENT, per seed) and
    the `hyperparameters` it ran with: the run's own record (`hyperparameters`, `selected_on`
    at the top of its metrics.json, written when they were selected on the validation split),
    else its entry in `run_configs` (params.yaml `runs`), marked `selected_on: "params"`.
    `provenance` is the runs' own record (top-level `provenance` of their metrics.json).
    A run whose method has a mechanism that can be inert carries its record as the row's
    `mechanism`: {"name", "active_share", "inert", "reason", "measures"} (cmkd.training.activity).

    `margins`: {primary metric: {kind, value, reason}}, the smallest difference to STUDENT that counts
    (cmkd.reporting.claims.table_margins, claims.yaml `margins`); none for the metric means 0. The
    report carries it as `margin`, the Holm family as `multiplicity` and the table's minimum
    detectable effect as `mde` (detectable_effect).
    """
    rows: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    task = None
    for run_dir in run_dirs:
        path = Path(run_dir) / "metrics.json"
        metrics = json.loads(path.read_text())
        task = metrics["task"]
        run = metrics["run"]
        if isinstance(metrics.get("provenance"), Mapping):
            provenance[run] = metrics["provenance"]
        if metrics.get("skipped"):  # the method is not defined for this task: an n/a row
            rows[metrics["run"]] = {"method": metrics["method"], "skipped": metrics["skipped"]}
            continue
        agg = aggregate_run(metrics)
        main = "model" if "model" in agg else "student"
        extra: dict[str, Any] = {}
        if run not in BASELINES:
            if "hyperparameters" in metrics:
                extra = {"hyperparameters": metrics["hyperparameters"],
                         "selected_on": metrics.get("selected_on", "val")}
            else:
                cfg = dict((run_configs or {}).get(run) or {})
                cfg.pop("method", None)
                extra = {"hyperparameters": cfg, "selected_on": "params"}
        if isinstance(metrics.get("mechanism"), Mapping):
            extra["mechanism"] = dict(metrics["mechanism"])
        rows[run] = {"method": metrics["method"], **agg[main], **extra}
        for name, values in agg.items():
            if name != main:
                rows[f"{run}/{name}"] = {"method": metrics["method"], **values, **extra}
    metric = primary_metric(task) if task else None
    margin = dict((margins or {}).get(metric) or {"kind": "none", "value": 0.0,
                                                     "reason": "no margin declared for this metric"})
    student = rows.get("student", {}).get(metric)
    family: list[str] = []
    if student is not None:
        for name, row in rows.items():
            if name not in BASELINES and metric in row:
                row["vs_student"] = vs_student(row[metric], student, margin["value"])
        family = holm_adjust(rows, margin["value"])
    return {"task": task, "metric": metric, "rows": rows, "provenance": _merge_provenance(provenance),
            "margin": margin, "multiplicity": {"method": "holm", "alpha": ALPHA, "family": family},
            "mde": detectable_effect(rows, metric, family, margin["value"]) if family else None}


def _merge_provenance(by_run: Mapping[str, Any]) -> dict[str, Any] | None:
    """One provenance for the table: the runs' common record; runs that differ are named."""
    if not by_run:
        return None
    first = by_run.get("student") or next(iter(by_run.values()))
    merged = dict(first)
    differ = sorted(run for run, p in by_run.items() if p != first)
    if differ:
        merged["runs_that_differ"] = {run: by_run[run] for run in differ}
    return merged


def metrics_summary(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The few numbers per row that git and DVC keep (`metrics/<dataset>/<row>.json`): the
    primary metric's mean with the 95% interval of that mean (`mean_ci95_lo`, `mean_ci95_hi`) and n;
    for rows compared with STUDENT the paired difference (`vs_student`) with its own 95% interval
    (`vs_student_ci95_lo`, `vs_student_ci95_hi`: the interval the verdict reads), the Holm-adjusted
    p (`p_holm`) and the `verdict`. Rounded to 4 decimals so `dvc metrics show` stays narrow; no
    interval for one seed."""
    metric = report["metric"]
    out: dict[str, dict[str, Any]] = {}
    for name, row in report["rows"].items():
        stat = row.get(metric)
        if stat is None:
            continue
        ci = t_interval(stat["values"])["ci95"]
        entry: dict[str, Any] = {metric: _round(stat["mean"]), "n": stat["n"]}
        if ci:  # one seed has no interval
            entry.update(mean_ci95_lo=_round(ci[0]), mean_ci95_hi=_round(ci[1]))
        if "vs_student" in row:
            vs = row["vs_student"]
            entry["vs_student"] = _round(vs["mean"])
            if vs.get("ci95"):
                entry.update(vs_student_ci95_lo=_round(vs["ci95"][0]), vs_student_ci95_hi=_round(vs["ci95"][1]))
            if vs.get("p_holm") is not None:
                entry["p_holm"] = _round(vs["p_holm"])
            entry["verdict"] = vs["verdict"]
        out[name] = entry
    return out


def metrics_file_name(row: str) -> str:
    """`discom_kd/teacher_modality` -> `discom_kd.teacher_modality.json`."""
    return row.replace("/", ".") + ".json"


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def compact_hyperparameters(hp: Mapping[str, Any], top: bool = True) -> str:
    """One short cell: `T=4, ce=0, kd=1`; nested entries as `base(method=kd, ...)`, flags by name
    (the row's own method is in its own column)."""
    parts = []
    for key, value in hp.items():
        if key == "method" and top:
            continue
        k = _SHORT.get(key, key)
        if isinstance(value, bool):
            if value:
                parts.append(k)
        elif isinstance(value, Mapping):
            parts.append(f"{k}({compact_hyperparameters(value, top=False)})")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{k}={'/'.join(_num(v) for v in value)}")
        else:
            parts.append(f"{k}={_num(value)}")
    return ", ".join(parts)


_SHORT = {"temperature": "T", "ce_weight": "ce", "kd_weight": "kd", "alpha": "α", "beta": "β", "lskd": "LSKD",
          "init_temperature": "T0", "warmup_epochs": "warmup", "temperatures": "Ts", "divergence_temperature": "T_div"}


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fmt(stat: Mapping[str, Any], scale: float = 100.0) -> str:
    return f"{scale * stat['mean']:.2f} ± {scale * stat['std']:.2f}"


ARROWS = {"better": "↑", "worse": "↓", "equivalent": "≡", "indistinguishable": "≈"}
#: marks a row whose mechanism was inert (its footnote says why and what the row measures)
INERT_MARK = "†"


def markdown_table(report: Mapping[str, Any], dataset: str, modalities: tuple[str, str], notes: str = "") -> str:
    """The papers' table: one row per run, mean ± std (x100), the paired difference to STUDENT
    with its 95% interval and Holm-adjusted p, marked by its verdict (↑ better, ↓ worse, ≡ equivalent,
    ≈ indistinguishable: cmkd.utils.stats.table_verdict), and the hyper-parameters the run used.
    A row whose mechanism was inert (`mechanism.inert`) is marked † with a footnote naming why and
    what the row measures instead. Under the table: the rule with the margin, and the table's minimum
    detectable effect (`mde`).

    It starts with "Nothing can be judged here" when the report's `judgeability` record
    (cmkd.reporting.judgeability) finds the teacher not above chance or not above STUDENT, then
    `notes` (the stage's own paragraphs), then the table."""
    metric = report["metric"]
    rows = report["rows"]
    lines = [
        judgeability_note(report.get("judgeability")) + notes +
        f"### {dataset}: {modalities[0]} → {modalities[1]} ({metric.replace('_', ' ')} × 100, mean ± std over seeds)",
        "",
        f"| run | method | {metric} | vs STUDENT: mean [95% CI], Holm p | hyper-parameters |",
        "|---|---|---|---|---|",
    ]
    order = [r for r in BASELINES if r in rows] + sorted(r for r in rows if r not in BASELINES)
    inert: list[tuple[str, Mapping[str, Any]]] = []  # rows whose mechanism did nothing, footnoted
    for name in order:
        row = rows[name]
        stat = row.get(metric)
        if rows[name].get("skipped"):
            lines.append(f"| {name} | {rows[name]['method']} | n/a | skipped: {rows[name]['skipped']} |")
            continue
        if stat is None:
            continue
        cell = ""
        vs = row.get("vs_student")
        if vs and vs["mean"] is not None:
            cell = f"{ARROWS[vs['verdict']]} {100 * vs['mean']:+.2f}"
            if vs["ci95"]:
                cell += f" [{100 * vs['ci95'][0]:+.2f}, {100 * vs['ci95'][1]:+.2f}]"
            if vs.get("p_holm") is not None:
                cell += f", p {_p(vs['p_holm'])}"
        hp = compact_hyperparameters(row.get("hyperparameters") or {})
        if hp and row.get("selected_on") not in (None, "val"):
            hp += f" ({row['selected_on']})"
        label = name.upper() if name in BASELINES else name
        mechanism = row.get("mechanism") or {}
        if mechanism.get("inert"):
            inert.append((name, mechanism))
            label += f" {INERT_MARK}{len(inert)}"
        lines.append(f"| {label} | {row['method']} | {_fmt(stat)} | {cell} | {hp} |")
    n = max((rows[r][metric]["n"] for r in rows if metric in rows[r]), default=0)
    margin = report.get("margin") or {"kind": "none", "value": 0.0}
    k = len((report.get("multiplicity") or {}).get("family") or [])
    m = f"±{100 * margin['value']:.2f}"
    where = f"margin `{margin['kind']}`, claims.yaml" if margin["kind"] != "none" else "no margin declared"
    lines += ["", f"Seeds per row: {n}. vs STUDENT: the mean of the per-seed differences to STUDENT (same seed: same "
              "initialisation and batch order) with its 95% t interval, and the p of a two-sided paired t test that "
              f"the difference lies beyond {m} ({where}), Holm-adjusted over the {k} rows compared with STUDENT. "
              f"↑ / ↓: that p < 0.05 (the interval then lies beyond the margin); ≡ equivalent: the interval lies "
              f"inside {m}; ≈ otherwise. Hyper-parameters marked (params) are params.yaml's, not selected on the "
              "validation split."]
    mde = report.get("mde")
    if mde:
        lines += ["", f"Minimum detectable effect at {100 * mde['power']:.0f}% power (two-sided paired t, "
                  f"n = {mde['n']} seeds, pooled SD of the per-seed differences {100 * mde['sd_diff']:.2f} "
                  f"over {mde['rows']} rows): "
                  f"{100 * mde['effect']:.2f} at alpha {mde['alpha']:g}; a ↑ / ↓ verdict (Holm's strictest step, "
                  f"alpha {mde['alpha']:g}/{mde['rows']}, beyond {m}) needs {100 * mde['effect_verdict']:.2f}."]
    for i, (name, mechanism) in enumerate(inert, start=1):
        lines.append(f"\n{INERT_MARK}{i} {name}: mechanism inert: {mechanism['reason']}; this row measures "
                     f"{mechanism.get('measures') or 'the method without its mechanism'}, not {name}'s mechanism.")
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    """A p-value in two significant digits; below 0.001 as "< 0.001"."""
    return "< 0.001" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def scores_csv(report: Mapping[str, Any]) -> str:
    """One line per row for `dvc plots` (bar chart of the primary metric)."""
    metric = report["metric"]
    lines = ["run,mean,std,vs_student,vs_student_lo,vs_student_hi,verdict,p_holm"]
    for name, row in report["rows"].items():
        if metric in row:
            vs = row.get("vs_student") or {}
            ci = vs.get("ci95") or [None, None]
            cells = [_csv(vs.get("mean")), _csv(ci[0]), _csv(ci[1]), vs.get("verdict", ""), _csv(vs.get("p_holm"))]
            lines.append(f"{name},{row[metric]['mean']:.6f},{row[metric]['std']:.6f}," + ",".join(cells))
    return "\n".join(lines) + "\n"


def _csv(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


COLOURS = {"better": "#2a9d8f", "worse": "#e76f51", "equivalent": "#e9c46a", "indistinguishable": "#a8b4c4",
           "baseline": "#666666"}


def bar_figure(report: Mapping[str, Any], dataset: str, path: Path) -> None:
    """Horizontal bars of each row's mean, coloured by the paired verdict against STUDENT.

    A row's whisker is the 95% interval of its paired difference to STUDENT, drawn around
    STUDENT's mean + that difference: a better / worse row's whisker stays clear of STUDENT's dashed
    line by more than the margin, an equivalent row's lies within the margin of it. TEACHER's and
    STUDENT's whiskers are the t intervals of their means.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    metric = report["metric"]
    rows = [(n, r) for n, r in report["rows"].items() if metric in r]
    rows.sort(key=lambda item: item[1][metric]["mean"])
    student = report["rows"].get("student", {}).get(metric)
    names, means, centres, lo, hi, colours = [], [], [], [], [], []
    for name, row in rows:
        mean = 100 * row[metric]["mean"]
        vs = row.get("vs_student")
        if vs and vs.get("ci95") and student is not None:
            centre = 100 * (student["mean"] + vs["mean"])
            a, b = 100 * (student["mean"] + vs["ci95"][0]), 100 * (student["mean"] + vs["ci95"][1])
            colour = COLOURS[vs["verdict"]]
        else:
            ci = t_interval(row[metric]["values"])["ci95"]
            centre = mean
            a, b = (100 * ci[0], 100 * ci[1]) if ci else (mean, mean)
            colour = COLOURS["baseline"] if name in BASELINES else COLOURS["indistinguishable"]
        names.append(name.upper() if name in BASELINES else name)
        means.append(mean)
        centres.append(centre)
        lo.append(centre - a)
        hi.append(b - centre)
        colours.append(colour)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.6))
    ax.barh(names, means, color=colours)
    ax.errorbar(centres, names, xerr=[lo, hi], fmt="none", ecolor="black", capsize=3, linewidth=1)
    if student is not None:
        ax.axvline(100 * student["mean"], color="black", linestyle="--", linewidth=1)
    handles = [Patch(color=COLOURS[k], label=label) for k, label in
               (("better", "better than STUDENT"), ("worse", "worse"), ("equivalent", "equivalent"),
                ("indistinguishable", "indistinguishable"))]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    low = min([c - low_err for c, low_err in zip(centres, lo)] + means) if means else 0.0
    ax.set_xlim(left=max(0.0, math.floor(low - 5)))
    ax.set_xlabel(f"{metric} × 100 (mean over seeds; whiskers: 95% CI of the paired difference to STUDENT, dashed)")
    ax.set_title(dataset)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
