"""Every bad params value or flow argument is one line naming the key, before any work starts;
such an error is not retried; a method undefined for a dataset's task is skipped as n/a."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

PARAMS_TEXT = (REPO / "params.yaml").read_text()


@pytest.mark.parametrize("old, new, expected", [
    ("temperature: 4.0, lskd: false}", "temperature: four, lskd: false}",
     "runs.kdv1.temperature: must be a number, got 'four'"),
    ("datasets: [synthetic, digits]", "datasets: [synthetc]", "datasets: unknown dataset 'synthetc'; known: ["),
    ("lskd: false}", "lskd: nope}", "runs.kdv1.lskd: must be true or false, got 'nope'"),
])
def test_validate_command_names_the_key_in_one_line(tmp_path, old, new, expected):
    assert old in PARAMS_TEXT
    bad = tmp_path / "params.yaml"
    bad.write_text(PARAMS_TEXT.replace(old, new, 1))
    proc = subprocess.run([sys.executable, "-m", "stages", "validate", "--params", str(bad)], cwd=REPO,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_flow_arguments_are_checked_before_the_flow_starts(capsys):
    from flows.pipeline import main

    assert main(["--repo", str(REPO), "--datasets", "synthetc"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset 'synthetc'" in err[0]
    assert main(["--repo", str(REPO), "--set", "runs.kdv1.temperature=four"]) == 1
    assert "runs.kdv1.temperature: must be a number" in capsys.readouterr().err


def test_configuration_errors_are_not_retried():
    from prefect.states import Failed

    from cmkd.errors import ConfigError
    from flows.pipeline import NOT_RETRYABLE, StageFailedError, _retryable

    assert not _retryable(None, None, Failed(data=StageFailedError("s", NOT_RETRYABLE, "error: x")))
    assert not _retryable(None, None, Failed(data=ConfigError("runs.kdv1", "bad")))
    assert _retryable(None, None, Failed(data=StageFailedError("s", 255, "killed")))


def test_a_method_undefined_for_the_task_is_skipped_and_shown_as_na(tmp_path):
    import json

    from cmkd.methods import get_method
    from cmkd.reporting.tables import collect, markdown_table

    assert "segmentation" not in get_method("discom_kd").tasks
    assert "segmentation" in get_method("kd").tasks
    run = tmp_path / "discom_kd"
    run.mkdir()
    run.joinpath("metrics.json").write_text(json.dumps(
        {"dataset": "d", "run": "discom_kd", "method": "discom_kd", "task": "segmentation", "seeds": {},
         "skipped": "method 'discom_kd' supports classification only; d is segmentation"}))
    report = collect([run])
    assert report["rows"]["discom_kd"]["skipped"].startswith("method 'discom_kd' supports classification only")
    table = markdown_table(report, "d", ("rgb", "lidar"))
    assert "| discom_kd | discom_kd | n/a | skipped: method 'discom_kd' supports classification only" in table


def test_generated_samples_are_smoke_tests_and_real_data_is_not():
    from cmkd.config import load_params
    from cmkd.data.registry import is_smoke_test

    data = load_params(REPO / "params.yaml")["data"]
    assert is_smoke_test("semantickitti-sample", data["semantickitti-sample"])
    assert is_smoke_test("sunrgbd-sample", data["sunrgbd-sample"])
    assert not is_smoke_test("sunrgbd", data["sunrgbd"])
    assert not is_smoke_test("semantickitti", data["semantickitti"])
    assert not is_smoke_test("digits", data["digits"])


def test_an_unreachable_host_is_one_error_naming_it_without_resume_attempts(tmp_path, caplog):
    import socket

    from cmkd.data.download import DownloadError, download

    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/SUNRGBD.zip"
    with caplog.at_level("WARNING"), pytest.raises(DownloadError) as err:
        download(url, tmp_path, progress=False, retries=5, timeout=5)
    assert str(err.value).count("\n") == 0 and url in str(err.value) and "'127.0.0.1'" in str(err.value)
    assert "refused" in str(err.value)
    assert not [r for r in caplog.records if "resuming" in r.getMessage()]


def test_a_failed_name_lookup_is_reported_once(tmp_path, monkeypatch, caplog):
    import socket
    import urllib.error
    import urllib.request

    from cmkd.data.download import DownloadError, download

    calls = []

    def no_dns(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    with caplog.at_level("WARNING"), pytest.raises(DownloadError,
                                                   match="host 'rgbd.example': cannot resolve the host name"):
        download("http://rgbd.example/SUNRGBD.zip", tmp_path, progress=False, retries=5)
    assert len(calls) == 1 and not caplog.records


def test_at_on_vector_data_is_skipped_in_training_and_in_tuning(tmp_path):
    from conftest import tiny_synthetic_file

    from cmkd.data.h5 import read_attrs
    from cmkd.pipeline.train import skip_reason, train_run
    from cmkd.pipeline.tuning import tune_run
    from cmkd.training.config import TrainConfig

    prepared = tiny_synthetic_file(tmp_path / "synthetic.h5")
    attrs = read_attrs(prepared)
    assert skip_reason("at", "synthetic",
                       prepared, attrs) == "method 'at' needs image inputs; synthetic has vector inputs"
    assert skip_reason("fitnet", "synthetic", prepared, attrs) is None and skip_reason("kd", "synthetic",
                                                                                       prepared, attrs) is None
    models = {"teacher": {"arch": "mlp", "hidden": [8]}, "student": {"arch": "mlp", "hidden": [8]}}
    cfg = TrainConfig.from_params({"epochs": 1, "batch_size": 32, "lr": 0.01}, "train")
    out = tmp_path / "at"
    out.mkdir()
    result = train_run(dataset="synthetic", prepared=prepared, run_name="at", run_cfg={"method": "at"}, models=models,
                       train_cfg=cfg, seeds=[0], out_dir=out, checkpoint_root=None, progress=False)
    assert result["skipped"].startswith("method 'at' needs image inputs") and result["seeds"] == {}
    evidence = tune_run(dataset="synthetic", prepared=prepared, run_name="at", run_cfg={"method": "at"},
                        grid={"at_weight": [1.0, 10.0]}, budget=2, subsample_seed=0, seeds=[100], models=models,
                        train_cfg=cfg, teacher_dir=None, teacher_train_cfg=cfg, work_dir=tmp_path / "w")
    assert evidence["skipped"] and evidence["selected"] == {} and evidence["configurations"] == []
