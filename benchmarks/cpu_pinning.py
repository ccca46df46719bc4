"""What the portable CPU path costs (cmkd/utils/determinism.py, cmkd/utils/exactmath.py).

    python benchmarks/cpu_pinning.py [--rounds 5] [--steps 210]

Times training steps of the default models (synthetic MLP 32 -> 128 -> 128 -> 4, batch 128;
digits small CNN width 32 on 16 x 16 images, batch 64) with a KD loss (cross-entropy plus
cmkd.losses.kd_loss against fixed teacher logits), one thread as the stages run them, CPU time
(process_time, robust to other load), in fresh processes, alternating so load changes hit every
mode alike. Median ms per step. Modes:

- `portable` (the stages' default): ATen AVX2, MKL_CBWR=COMPATIBLE, oneDNN AVX2, fused Adam;
- `avx2_cbwr` (the pinning before: same bytes on one machine only): ATen AVX2, MKL_CBWR=AVX2,
  oneDNN AVX2, Adam's default (unfused) update;
- `native` (CMKD_CPU_KERNELS=native): this machine's fastest kernels, unfused Adam.

Also times kd_loss alone (forward and backward, [128, 10] logits) with exp from cmkd.utils.exactmath
(float64, rounded once) against torch.exp, in microseconds. Writes
benchmarks/results/cpu_pinning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = r"""
import json, sys, time
from cmkd.utils.determinism import pin_cpu_kernels
pin_cpu_kernels()  # as `python -m stages` does, before torch
import torch
from cmkd.losses import kd_loss
from cmkd.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
steps, fused = int(sys.argv[1]), sys.argv[2] == "fused"
cases = {"synthetic_mlp": ({"arch": "mlp", "hidden": [128, 128]}, (32,), 4, 128),
         "digits_cnn": ({"arch": "small_cnn", "width": 32}, (3, 16, 16), 10, 64)}
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (cfg, shape, classes, batch) in cases.items():
    net = build_model(cfg, shape, classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    teacher = torch.randn(batch, classes)
    times = []
    for i in range(steps):
        t0 = time.process_time()
        z = net(x)
        loss = torch.nn.functional.cross_entropy(z, y) + kd_loss(z, teacher, 4.0)
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= 10:
            times.append(time.process_time() - t0)
    out[name] = 1000 * sorted(times)[len(times) // 2]
print(json.dumps(out))
"""

MODES = {
    "portable": ({}, "fused"),
    "avx2_cbwr": ({"CMKD_CPU_KERNELS": "native", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}, "unfused"),
    "native": ({"CMKD_CPU_KERNELS": "native"}, "unfused"),
}

KD_LOSS = r"""
import json, time
from cmkd.utils.determinism import pin_cpu_kernels
pin_cpu_kernels()  # as `python -m stages` does, before torch
import torch
from cmkd.utils import exactmath
from cmkd import losses
torch.set_num_threads(1)
s, t = torch.randn(128, 10, requires_grad=True), torch.randn(128, 10)
def timed(n=3000):
    for _ in range(100):
        losses.kd_loss(s, t, 4.0).backward()
    t0 = time.process_time()
    for _ in range(n):
        losses.kd_loss(s, t, 4.0).backward()
    return 1e6 * (time.process_time() - t0) / n
out = {"exactmath_exp": timed()}
exactmath.exp = torch.exp  # the same loss with torch's float32 exp
out["torch_exp"] = timed()
print(json.dumps(out))
"""


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA",
                                                            "CMKD_CPU_KERNELS")}
    return {**env, **extra}


def run(mode: str, steps: int) -> dict:
    extra, adam = MODES[mode]
    out = subprocess.run([sys.executable, "-c", STEPS, str(steps), adam], cwd=ROOT, env=clean_env(extra),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=210)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_pinning.json")
    args = p.parse_args()
    samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in samples:
            samples[mode].append(run(mode, args.steps))
    result = {"machine": platform.machine(), "rounds": args.rounds, "steps_per_round": args.steps}
    for mode, rows in samples.items():
        result[mode] = {"capability": rows[0]["capability"],
                        **{k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k != "capability"}}
    for other in ("avx2_cbwr", "native"):
        result[f"portable_over_{other}"] = {k: round(result["portable"][k] / result[other][k], 3)
                                            for k in result["portable"] if k != "capability"}
    kd = [json.loads(subprocess.run([sys.executable, "-c", KD_LOSS], cwd=ROOT, env=clean_env({}), capture_output=True,
                                    text=True, check=True).stdout) for _ in range(args.rounds)]
    result["kd_loss_us"] = {k: round(statistics.median(r[k] for r in kd), 1) for k in kd[0]}
    prov = subprocess.run([sys.executable, "-c", "import json; from cmkd.utils.determinism import cpu_identity; "
                           "print(json.dumps(cpu_identity()))"], cwd=ROOT, capture_output=True, text=True, check=True)
    result.update(json.loads(prov.stdout))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
