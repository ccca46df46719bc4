"""Same bytes on other x86-64 machines: the stages' training under emulated CPUs of other vendors.

    python benchmarks/portability.py [--cpus Haswell-v4 EPYC-Milan-v1] [--seeds 0 1] [--runs kdv1 dkd c2kd]

Runs the real stages (`python -m stages train`, pinned kernels, the repository's params with
fewer seeds and digits epochs) natively and under `qemu-x86_64 -cpu <model>` (Debian's
qemu-user), which reports another vendor, model, instruction set and cache sizes to every
library's CPU dispatch: Haswell-v4 is a GenuineIntel AVX2 machine without AVX-512, EPYC-Milan-v1
an AuthenticAMD one. Compares the sha256 of every seed's model.pt and the test scores, and
probes the kernels no switch pins (float32 exp, log and sqrt, which MKL's vector math serves)
against cmkd.utils.exactmath's. Writes benchmarks/results/portability.json.

qemu's emulation is IEEE-exact for the instructions these kernels use, except the approximate
reciprocal instructions (rcpps, rsqrtps), which it computes exactly: a kernel using those would
show a difference here that real hardware might not. Under emulation a stage runs about 30x
slower than natively.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import hashlib, json
from cmkd.utils.determinism import pin_cpu_kernels
pin_cpu_kernels()  # as `python -m stages` does, before torch
import torch
from cmkd.utils import exactmath
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
y = torch.randn(1_000_000, generator=g) * 20
p = y.abs() + 1e-6
h = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "torch": {"exp": h(torch.exp(y)), "log": h(torch.log(p)), "sqrt": h(torch.sqrt(p))},
                  "exactmath": {"exp": h(exactmath.exp(y)), "log": h(exactmath.log(p)), "sqrt": h(exactmath.sqrt(p))}}))
"""


def prefix(cpu: str) -> list[str]:
    return [] if cpu == "native" else ["qemu-x86_64", "-cpu", cpu]


def workspace(tmp: Path, seeds: list[int], digits_epochs: int) -> Path:
    """The code, a params.yaml with fewer seeds (and digits epochs), and the prepared data."""
    ws = tmp / "ws"
    for name in ("cmkd", "stages"):
        shutil.copytree(ROOT / name, ws / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seeds"] = seeds
    for role in ("teacher", "student"):
        params["train"]["digits"][role]["epochs"] = digits_epochs
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy2(ROOT / "tuned.yaml", ws / "tuned.yaml")
    for ds in ("synthetic", "digits"):
        src = ROOT / "data" / "prepared" / f"{ds}.h5"
        if not src.exists():
            raise SystemExit(f"{src} is missing: run `dvc repro prepare@{ds}` first")
        (ws / "data" / "prepared").mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, ws / "data" / "prepared" / src.name)
    return ws


def train(ws: Path, cpu: str, dataset: str, what: list[str]) -> dict:
    env = {**os.environ, "CMKD_LOG_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    subprocess.run([*prefix(cpu), sys.executable, "-m", "stages", "train", "--dataset", dataset, *what,
                    "--no-progress"],
                   cwd=ws, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = what[-1]
    out = ws / "data" / "runs" / dataset / run
    metrics = json.loads((out / "metrics.json").read_text())
    seeds = sorted(metrics["seeds"], key=int)
    net = next(iter(metrics["seeds"][seeds[0]]["test"]))  # the deployed network: model.pt, student.pt, ...
    return {"seconds": round(time.perf_counter() - t0, 1),
            "test": [round(100 * metrics["seeds"][s]["test"][net]["f1_weighted"], 4) for s in seeds],
            "model_sha256": [hashlib.sha256((out / f"seed{s}" / f"{net}.pt").read_bytes()).hexdigest()[:16]
                             for s in seeds]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", nargs="*", default=["Haswell-v4", "EPYC-Milan-v1"], help="qemu CPU models besides native")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--runs", nargs="+", default=["kdv1", "dkd", "c2kd"], help="distillation runs after the teacher")
    p.add_argument("--digits-epochs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "portability.json")
    args = p.parse_args()
    if args.cpus and shutil.which("qemu-x86_64") is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install qemu-user (or pass --cpus with no model)")
    cpus = ["native", *args.cpus]
    result: dict = {"seeds": args.seeds, "digits_epochs": args.digits_epochs, "host": {}, "cpus": {}}
    with tempfile.TemporaryDirectory(prefix="cmkd-portability-") as tmp:
        ws = workspace(Path(tmp), args.seeds, args.digits_epochs)
        host = ("import json; from cmkd.utils.determinism import pin_cpu_kernels, provenance; "
                "pin_cpu_kernels(); print(json.dumps(provenance()))")
        prov = subprocess.run([sys.executable, "-c", host], cwd=ws, capture_output=True, text=True, check=True)
        result["host"] = json.loads(prov.stdout)
        for cpu in cpus:
            probe = subprocess.run([*prefix(cpu), sys.executable, "-c", PROBE], cwd=ws, capture_output=True,
                                   text=True, check=True)
            entry = {"kernels": json.loads(probe.stdout.strip().splitlines()[-1])}
            for ds in ("synthetic", "digits"):
                entry[ds] = {"teacher": train(ws, cpu, ds, ["--role", "teacher"])}
                for run in args.runs:
                    entry[ds][run] = train(ws, cpu, ds, ["--run", run])
                print(cpu, ds, {k: v["model_sha256"] for k, v in entry[ds].items()}, flush=True)
            result["cpus"][cpu] = entry
    base = result["cpus"]["native"]
    result["identical_to_native"] = {
        cpu: {"models": all(e[ds][r]["model_sha256"] == base[ds][r]["model_sha256"]
                            for ds in ("synthetic", "digits") for r in e[ds]),
              "torch_float32_kernels": e["kernels"]["torch"] == base["kernels"]["torch"],
              "exactmath_kernels": e["kernels"]["exactmath"] == base["kernels"]["exactmath"]}
        for cpu, e in result["cpus"].items() if cpu != "native"}
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["identical_to_native"], indent=2))


if __name__ == "__main__":
    main()
