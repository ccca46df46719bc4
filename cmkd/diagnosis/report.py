"""The diagnosis stages' library side (stages/diagnose.py, diagnosis_report.py,
diagnosis_validation.py): measure a dataset's trained teacher / no-KD student pair on the
validation split, apply the committed predictor, and gather the conditions the predictor is fit
and validated on (the batched experiments' `diag_*` values and the main datasets' reports).

The formulas are in cmkd/diagnosis/indicators.py and predictor.py; this module reads checkpoints
and reports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmkd.diagnosis.indicators import INDICATORS, indicators
from cmkd.diagnosis.predictor import (
    _spearman,
    fit_predictor,
    indicator_correlations,
    leave_one_sweep_out,
    predict,
    standing,
    validation_summary,
)
from cmkd.errors import ConfigError, DataFormatError
from cmkd.reporting.judgeability import judgeability_note
from cmkd.utils.stats import t_interval

#: the experiments whose slices train a teacher and a no-KD student (cmkd/experiments/analysis.py)
SWEEPS = ("mfh_gamma", "mfh_alpha", "mfh_alg1", "ntdh_gap", "digits_noise")
MAIN = "main"
PREDICTOR_TARGET = "KD gain: plain KD student minus no-KD student, test accuracy as a fraction"
_CFG_KEYS = {"split", "ece_bins", "temperature", "probe_penalty", "max_rows", "batch_size", "predictor"}
_PREDICTOR_KEYS = {"features", "penalty"}
#: the held-out statistics diagnosis_predictor.json carries, so that `diagnose` can say how far to trust it
_VALIDATION_KEYS = ("conditions", "sweeps", "spearman_heldout", "spearman_heldout_ci95", "sign_accuracy",
                    "sign_accuracy_ci95")
VALIDATION_REPORT = "data/reports/diagnosis/validation.md"


def _num(x: float | None, fmt: str = "+.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _interval(ci: Sequence[float] | None, fmt: str = "+.2f") -> str:
    return "[-]" if ci is None else f"[{_num(ci[0], fmt)}, {_num(ci[1], fmt)}]"


def standing_sentence(validation: Mapping[str, Any] | None) -> str:
    """How far the predicted gain can be trusted, from the held-out numbers (validation.json or
    the copy in diagnosis_predictor.json): "a prior" until the held-out Spearman's interval over
    sweeps excludes 0 on the positive side. Generated, so it changes when the numbers do."""
    if not validation or validation.get("spearman_heldout_ci95") is None:
        return ("The predicted KD gain is **a prior** (exploratory): the predictor carries no held-out interval "
                "(run `python -m stages diagnosis_fit`).")
    ci = validation["spearman_heldout_ci95"]
    held = (f"held out by sweep, its Spearman with the measured gain is {_num(validation['spearman_heldout'])} "
            f"{_interval(ci)} (95% over sweeps), the sign right in {_num(validation['sign_accuracy'], '.0%')} "
            f"{_interval(validation['sign_accuracy_ci95'], '.0%')} of {validation['conditions']} conditions in "
            f"{validation['sweeps']} sweeps")
    if standing(ci) == "prediction":
        return f"The predicted KD gain is **a prediction**: {held}; the Spearman interval excludes 0."
    where = "lies below 0 (it ranks the wrong way)" if ci[1] < 0 else "contains 0"
    return f"The predicted KD gain is **a prior** (exploratory): {held}; the Spearman interval {where}."


def check_config(cfg: Any, key: str = "diagnosis") -> dict[str, Any]:
    """The params `diagnosis` section, checked: one clear error naming the bad key."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(key, "must be a mapping")
    unknown = sorted(set(cfg) - _CFG_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown; known: {sorted(_CFG_KEYS)}")
    missing = sorted(_CFG_KEYS - set(cfg))
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", "missing")
    pred = cfg["predictor"]
    if not isinstance(pred, Mapping) or set(pred) != _PREDICTOR_KEYS:
        raise ConfigError(f"{key}.predictor", f"must have exactly {sorted(_PREDICTOR_KEYS)}")
    bad = ([f for f in pred["features"] if f not in INDICATORS] if isinstance(pred["features"], list)
           else [pred["features"]])
    if bad or not pred["features"]:
        raise ConfigError(f"{key}.predictor.features",
                          f"must be a non-empty list of indicators {list(INDICATORS)}; bad: {bad}")
    if not float(pred["penalty"]) >= 0:
        raise ConfigError(f"{key}.predictor.penalty", "must be >= 0")
    if cfg["split"] not in ("val", "test"):
        raise ConfigError(f"{key}.split", f"must be val or test, got {cfg['split']!r}")
    return dict(cfg)


# --------------------------------------------------------------------------- one dataset's pair

@torch.no_grad()
def pair_outputs(teacher: torch.nn.Module, student: torch.nn.Module, data, batch_size: int, max_rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher logits, student logits, target and student features on `data` (a SplitData) as
    rows: [R, C], [R, C], [R], [R, D]. Segmentation maps become one row per valid pixel (their
    logits stand in for features), evenly thinned to at most `max_rows`."""
    teacher.eval()
    student.eval()
    zt, zs, ys, fs = [], [], [], []
    for batch in data.batches(batch_size):
        a, b, y = teacher(batch["teacher_input"]), student(batch["student_input"]), batch["target"]
        if a.dim() == 2:
            feats = getattr(student, "features", None)
            f = feats(batch["student_input"]) if feats is not None else b
            f = f.flatten(1) if f.dim() > 2 else f
        else:  # [N, C, H, W]: pixels as rows, the ignore label dropped
            c = a.shape[1]
            keep = y.reshape(-1) >= 0
            a, b, y = a.movedim(1, -1).reshape(-1, c)[keep], b.movedim(1, -1).reshape(-1, c)[keep], y.reshape(-1)[keep]
            f = b
        zt.append(a.float())
        zs.append(b.float())
        ys.append(y.long())
        fs.append(f.float())
    zt, zs, y, f = (torch.cat(x) for x in (zt, zs, ys, fs))
    if len(y) > max_rows:
        idx = torch.linspace(0, len(y) - 1, max_rows).round().long()
        zt, zs, y, f = zt[idx], zs[idx], y[idx], f[idx]
    return zt, zs, y, f


def measure_dataset(prepared: Path, teacher_dir: Path, student_dir: Path, models: Mapping[str, Any],
                    seeds: Sequence[int],
                    dataset: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Per reporting seed: the teacher and no-KD student checkpoints on the `cfg["split"]`
    split -> the indicators; their mean and t interval over seeds."""
    from cmkd.data.h5 import read_attrs, seed_root
    from cmkd.training.data import load_split
    from cmkd.training.networks import build_networks

    attrs = read_attrs(prepared)
    per_seed = {}
    for seed in seeds:
        nets = []
        for run_dir in (teacher_dir, student_dir):
            path = Path(run_dir) / f"seed{seed}" / "model.pt"
            if not path.is_file():
                raise DataFormatError(path, f"missing: the trained {run_dir.name} of seed {seed} (run "
                                            f"train_{run_dir.name}@{dataset})")
            nets.append(path)
        data = load_split(prepared, cfg["split"], attrs, seed_root(attrs, seed))
        torch.manual_seed(int(seed))
        teacher, student = build_networks(attrs, data, models, dataset)
        for net, path in zip((teacher, student), nets):
            try:
                net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, OSError) as err:
                raise DataFormatError(path, f"not a checkpoint of models.{dataset}: "
                                            f"{str(err).splitlines()[0]}") from None
        zt, zs, y, f = pair_outputs(teacher, student, data, int(cfg["batch_size"]), int(cfg["max_rows"]))
        per_seed[str(seed)] = indicators(zt, zs, y, f, temperature=float(cfg["temperature"]),
                                         ece_bins=int(cfg["ece_bins"]),
                                         probe_penalty=float(cfg["probe_penalty"]))
    summary = {name: t_interval([per_seed[s][name] for s in per_seed]) for name in INDICATORS}
    return {"dataset": dataset, "split": cfg["split"], "seeds": [int(s) for s in seeds],
            "indicators": {name: summary[name]["mean"] for name in INDICATORS},
            "indicator_intervals": {name: {"mean": v["mean"],
                                           "ci95": v["ci95"], "n": v["n"]} for name, v in summary.items()},
            "per_seed": per_seed}


def load_predictor(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataFormatError(path, f"cannot read the KD-gain predictor: {err}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping) or "weights" not in data["model"]:
        raise DataFormatError(path, "not a predictor file (no model.weights): rewrite it with `python -m stages "
                                    "diagnosis_fit`")
    return data


def apply_predictor(diagnosis: dict[str, Any], predictor: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Add `predicted_kd_gain` and `method_expectations` to a `measure_dataset` result."""
    model = predictor["model"]
    if (list(model["features"]) != list(cfg["predictor"]["features"])
            or float(model["penalty"]) != float(cfg["predictor"]["penalty"])):
        raise ConfigError("diagnosis.predictor", f"differs from the committed predictor's features/penalty "
                                                 f"({model['features']}, {model['penalty']}): run `python -m stages "
                                                 "diagnosis_fit`")
    pred = predict(model, diagnosis["indicators"])
    lo, hi = pred["ci95"]
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "uncertain (the interval contains 0)"
    diagnosis["predicted_kd_gain"] = pred
    validation = predictor.get("validation")
    status = standing((validation or {}).get("spearman_heldout_ci95"))
    diagnosis["predictor"] = {"target": predictor.get("target"), "features": model["features"],
                              "penalty": model["penalty"],
                              "fit_on": predictor.get("fit_on"), "validation": validation, "standing": status}
    diagnosis["method_expectations"] = {
        "kdv1": f"{status}: plain KD {verdict}: predicted gain {pred['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]",
        "other methods": "none: the predictor is fit and validated on plain KD gains only; no condition measured "
                         "another method's gain, so no expectation is claimed for it",
    }
    return diagnosis


def diagnosis_markdown(d: Mapping[str, Any]) -> str:
    """The report; it opens with "Nothing can be judged here" when the TEACHER / STUDENT pair's
    `judgeability` record says the teacher is not above chance or not above STUDENT."""
    lines = [f"# Will KD help on `{d['dataset']}`?\n"]
    note = judgeability_note(d.get("judgeability"))
    if note:
        lines.append(note.rstrip("\n") + "\n")
    lines.append(f"Measured on the {d['split']} split from the trained TEACHER and the no-KD STUDENT "
                 f"(seeds {', '.join(map(str, d['seeds']))}), before any student is distilled.\n")
    if "predicted_kd_gain" in d:
        p = d["predicted_kd_gain"]
        status = (d.get("predictor") or {}).get("standing", "prior")
        lines.append(f"**Predicted KD gain, {'a prior' if status == 'prior' else 'a prediction'}** (KD student - "
                     f"STUDENT, accuracy): {p['mean']:+.4f}, 95% prediction interval "
                     f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]\n")
        lines.append(standing_sentence((d.get("predictor") or {}).get("validation"))
                     + f" Details: {VALIDATION_REPORT}.\n")
    if d.get("measured_kd_gain") is not None:
        sample = d.get("comparison") or in_sample(d)
        lines.append(f"**Measured KD gain** (kdv1 - STUDENT, paired, accuracy): {d['measured_kd_gain']:+.4f}; "
                     f"beside the prediction it is **{sample}**" + (
                         ": the committed predictor was fit with this dataset's measured gain, so agreement with "
                         "it is no evidence; the out-of-sample test is the held-out `main` sweep in "
                         f"{VALIDATION_REPORT}" if sample == "in-sample" else "") + ".\n")
    lines += ["| indicator | mean | 95% interval over seeds |", "|---|---|---|"]
    for name, v in (d.get("indicator_intervals")
                    or {name: {"mean": x, "ci95": None} for name, x in d["indicators"].items()}).items():
        ci = f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" if v.get("ci95") else "-"
        lines.append(f"| {name} | {v['mean']:.4f} | {ci} |")
    if d.get("method_expectations"):
        lines += ["", "## Per method", ""] + [f"- {k}: {v}" for k, v in d["method_expectations"].items()]
    lines.append("\nWhat each indicator means: docs/diagnosis.md.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- measured gains

def measured_kd_gain(metrics: Mapping[str, Any], run: str = "kdv1") -> dict[str, Any] | None:
    """The paired per-seed difference run - STUDENT from a dataset's metrics.json, in accuracy
    (what the predictor predicts) and in the table's primary metric (`vs_student`); None when
    the run did not run (or was skipped)."""
    from cmkd.reporting.tables import vs_student

    rows = metrics.get("rows") or {}
    row, student = rows.get(run), rows.get("student")
    if not row or row.get("skipped") or not student or "accuracy" not in row or "accuracy" not in student:
        return None
    acc = vs_student(row["accuracy"], student["accuracy"])
    return {"accuracy": acc["mean"], "accuracy_ci95": acc["ci95"], "n": acc["n"],
            "primary": (row.get("vs_student") or {}).get("mean"), "primary_metric": metrics.get("metric")}


def in_sample(diagnosis: Mapping[str, Any]) -> str:
    """"in-sample" when the predictor that made `diagnosis`'s prediction was fit with this
    dataset's measured gain (its `fit_on.main`), or may have been (an older predictor file that
    names no main datasets but was fit on some); "out-of-sample" otherwise."""
    fit_on = (diagnosis.get("predictor") or {}).get("fit_on") or {}
    if "main" in fit_on:
        return "in-sample" if diagnosis["dataset"] in fit_on["main"] else "out-of-sample"
    return "in-sample" if MAIN in (fit_on.get("sweeps") or []) else "out-of-sample"


def dataset_report(diagnosis: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """diagnosis.json of the issue's format (plus the intervals, the measured detail and whether
    measured and predicted gain are compared in-sample)."""
    measured = measured_kd_gain(metrics) if metrics is not None else None
    return {"dataset": diagnosis["dataset"], "indicators": diagnosis["indicators"],
            "predicted_kd_gain": diagnosis.get("predicted_kd_gain"),
            "measured_kd_gain": measured["accuracy"] if measured else None,
            "comparison": in_sample(diagnosis) if measured else None, "predictor": diagnosis.get("predictor"),
            "measured_detail": measured, "indicator_intervals": diagnosis.get("indicator_intervals"),
            "split": diagnosis["split"], "seeds": diagnosis["seeds"],
            "method_expectations": diagnosis.get("method_expectations"), "judgeability": diagnosis.get("judgeability")}


# --------------------------------------------------------------------------- conditions and validation

def experiment_conditions(result: Mapping[str, Any], sweep: str) -> list[dict[str, Any]]:
    """One condition per sweep point of an experiment json: mean indicators over seeds (its
    `diag_*` entries) and the mean KD gain; `true_general_share` where the sweep knows it."""
    out = []
    for i, point in enumerate(result.get("points") or []):
        if "kd_gain" not in point or not all(f"diag_{n}" in point for n in INDICATORS):
            raise DataFormatError(f"{sweep}.json", f"point {i} has no kd_gain / diag_* indicators: rerun exp_{sweep}")
        coords = {k: v for k, v in point.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        cond = {"sweep": sweep, "point": i, "coords": coords,
                "indicators": {n: point[f"diag_{n}"]["mean"] for n in INDICATORS}, "gain": point["kd_gain"]["mean"],
                "gain_sem": point["kd_gain"]["sem"], "n_seeds": point["kd_gain"]["n"]}
        if "general_share" in point:
            cond["true_general_share"] = point["general_share"]
        out.append(cond)
    return out


def collect_conditions(experiments_dir: Path, main: Mapping[str, Path]) -> list[dict[str, Any]]:
    """Every condition: the sweeps' points, and each main dataset whose diagnosis report (dataset ->
    data/diagnosis/measured/<ds>.json, written by diagnosis_report) has a measured kdv1 gain."""
    conditions = []
    for sweep in SWEEPS:
        path = Path(experiments_dir) / f"{sweep}.json"
        if not path.is_file():
            raise DataFormatError(path, f"missing: run exp_{sweep}")
        conditions += experiment_conditions(json.loads(path.read_text()), sweep)
    for ds, path in main.items():
        if not Path(path).is_file():
            continue
        report = json.loads(Path(path).read_text())
        if report.get("measured_kd_gain") is None:
            continue
        conditions.append({"sweep": MAIN, "point": ds, "coords": {}, "indicators": report["indicators"],
                           "gain": report["measured_kd_gain"],
                           "n_seeds": (report.get("measured_detail") or {}).get("n")})
    return conditions


def fit_committed(conditions: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any],
                  summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The predictor fit on every condition: the content of diagnosis_predictor.json, with the
    main datasets it was fit on (whose gain it then predicts in-sample) and its leave-one-sweep-out
    numbers (`summary`, computed when not given), which `diagnose` turns into how far to trust it."""
    features, penalty = cfg["predictor"]["features"], float(cfg["predictor"]["penalty"])
    model = fit_predictor([c["indicators"] for c in conditions], [c["gain"] for c in conditions], features, penalty)
    if summary is None:
        summary = validation_summary(leave_one_sweep_out(conditions, features, penalty))
    return {"target": PREDICTOR_TARGET,
            "fit_on": {"conditions": len(conditions), "sweeps": sorted({c["sweep"] for c in conditions}),
                       "main": sorted(str(c["point"]) for c in conditions if c["sweep"] == MAIN)},
            "validation": {k: summary[k] for k in _VALIDATION_KEYS},
            "model": model}


def predictor_matches(committed: Mapping[str, Any] | None, fresh: Mapping[str, Any], rtol: float = 1e-6) -> bool:
    if not committed or "model" not in committed:
        return False
    a, b = committed["model"], fresh["model"]
    old_v, new_v = committed.get("validation") or {}, fresh["validation"]
    same_validation = set(old_v) == set(new_v) and all(
        old_v[k] == new_v[k] if old_v[k] is None or new_v[k] is None
        else np.allclose(old_v[k], new_v[k], rtol=rtol, atol=1e-9) for k in new_v)
    # the recorded fit and validation must be current too: `diagnose` words its report from them
    return (committed.get("fit_on") == fresh["fit_on"] and same_validation
            and a.get("features") == b["features"] and a.get("n") == b["n"]
            and float(a.get("penalty", -1)) == b["penalty"]
            and np.allclose(a["weights"], b["weights"], rtol=rtol, atol=1e-9)
            and np.allclose(a["mean"], b["mean"], rtol=rtol, atol=1e-9))


def validate(conditions: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any],
             committed: Mapping[str, Any] | None) -> dict[str, Any]:
    """validation.json: the leave-one-sweep-out summary, the held-out predictions, each
    indicator's correlation with the gain per sweep, MFH's share check, and whether the committed
    predictor is the one these conditions give."""
    features, penalty = cfg["predictor"]["features"], float(cfg["predictor"]["penalty"])
    heldout = leave_one_sweep_out(conditions, features, penalty)
    summary = validation_summary(heldout)
    share = [c for c in conditions if c["sweep"] == "mfh_alg1"]
    summary.update({
        "features": list(features), "penalty": penalty,
        "indicator_correlations": indicator_correlations(conditions),
        "general_r2_vs_true_share_mfh_alg1": _spearman([c["indicators"]["general_r2"] for c in share],
                                                        [c["true_general_share"] for c in share]) if share else None,
        "standing": standing(summary["spearman_heldout_ci95"]), "summary": standing_sentence(summary),
        "predictor_up_to_date": predictor_matches(committed, fit_committed(conditions, cfg, summary)),
        "heldout": [{"sweep": c["sweep"], "point": c["point"], "coords": c["coords"], "measured": c["gain"],
                     "predicted": c["predicted"]} for c in heldout],
    })
    return summary


def validation_markdown(v: Mapping[str, Any]) -> str:
    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    def ci(x):
        return "-" if x is None else f"[{f(x[0])}, {f(x[1])}]"

    ok = (v["spearman_heldout"] or -1) >= 0.7 and (v["sign_accuracy"] or 0) >= 0.8
    boot = v.get("bootstrap") or {}
    lines = ["# Does the diagnosis predict the KD gain? (leave one sweep out)\n",
             standing_sentence(v) + "\n",
             f"{v['conditions']} conditions in {v['sweeps']} sweeps; predictor: ridge on {', '.join(v['features'])} "
             f"(penalty {v['penalty']}). Intervals: 95% percentile bootstrap over sweeps ({boot.get('resamples')} "
             f"resamples of whole sweeps, seed {boot.get('seed')}; the held-out predictions are not refit), so with "
             "few sweeps they are coarse.\n",
             f"- held-out Spearman (predicted vs measured KD gain): **{f(v['spearman_heldout'])}** "
             f"{ci(v['spearman_heldout_ci95'])} (target >= 0.7)",
             f"- sign right: **{f(v['sign_accuracy'])}** {ci(v['sign_accuracy_ci95'])} (target >= 0.8)",
             f"- target met: **{'yes' if ok else 'no'}**",
             f"- MFH check: Spearman of general_r2 with the true modality-general share on mfh_alg1: "
             f"{f(v['general_r2_vs_true_share_mfh_alg1'])}",
             f"- committed diagnosis_predictor.json up to date: {v['predictor_up_to_date']}\n",
             "| sweep | n | held-out Spearman |", "|---|---|---|"]
    lines += [f"| {s} | {e['n']} | {f(e['spearman'])} |" for s, e in v["per_sweep"].items()]
    corr = v["indicator_correlations"]
    names = list(next(iter(corr.values())))
    lines += ["", "## Spearman of each indicator with the measured gain, per sweep\n",
              "| sweep | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f(row[n]) for n in names) + " |" for s, row in corr.items()]
    return "\n".join(lines) + "\n"


def validation_figure(v: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    rows = v["heldout"]
    for sweep in sorted({r["sweep"] for r in rows}):
        pts = [r for r in rows if r["sweep"] == sweep]
        pred = np.array([r["predicted"]["mean"] for r in pts])
        half = np.array([(r["predicted"]["ci95"][1] - r["predicted"]["ci95"][0]) / 2 for r in pts])
        ax.errorbar([r["measured"] for r in pts], pred, yerr=half, fmt="o", capsize=2, label=sweep, alpha=0.8)
    vals = [r["measured"] for r in rows] + [r["predicted"]["mean"] for r in rows]
    lo, hi = (min(vals), max(vals)) if vals else (-1, 1)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("measured KD gain (accuracy)")
    ax.set_ylabel("predicted KD gain, held-out sweep (95% PI)")
    ci = v.get("spearman_heldout_ci95")
    ax.set_title("leave one sweep out: Spearman "
                 f"{v['spearman_heldout'] if v['spearman_heldout'] is None else round(v['spearman_heldout'], 3)}"
                 + (f" [{ci[0]:.2f}, {ci[1]:.2f}] over sweeps" if ci else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
