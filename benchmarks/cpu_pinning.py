"""What pinning torch's CPU kernels to the AVX2 path costs (cmkd/determinism.py).

    python benchmarks/cpu_pinning.py [--rounds 5]

Times training steps of the default models (synthetic MLP 32 -> 128 -> 128 -> 4, batch 128;
digits small CNN width 32 on 16 x 16 images, batch 64), one thread as the stages run them,
CPU time (process_time, robust to other load), in fresh processes with the pin on (the stages' default) and off (CMKD_CPU_KERNELS=native:
this machine's fastest path), alternating so load changes hit both alike. Median ms per step.
Writes benchmarks/results/cpu_pinning.json.
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
import json, sys, time, stages, torch
from cmkd.models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
cases = {"synthetic_mlp": ({"arch": "mlp", "hidden": [128, 128]}, (32,), 4, 128),
         "digits_cnn": ({"arch": "small_cnn", "width": 32}, (3, 16, 16), 10, 64)}
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, (cfg, shape, classes, batch) in cases.items():
    net = build_model(cfg, shape, classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    times = []
    for i in range(int(sys.argv[1])):
        t0 = time.process_time()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= 10:
            times.append(time.process_time() - t0)
    out[name] = 1000 * sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def run(mode: str, steps: int) -> dict:
    env = {**os.environ, "CMKD_CPU_KERNELS": mode}
    for key in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", STEPS, str(steps)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=210)
    args = p.parse_args()
    samples: dict[str, list[dict]] = {"pinned": [], "native": []}
    for _ in range(args.rounds):
        for mode in samples:
            samples[mode].append(run(mode, args.steps))
    result = {"machine": platform.machine(), "processor": platform.processor(), "rounds": args.rounds,
              "steps_per_round": args.steps}
    for mode, rows in samples.items():
        result[mode] = {"capability": rows[0]["capability"],
                        **{k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0] if k != "capability"}}
    result["pinned_over_native"] = {k: round(result["pinned"][k] / result["native"][k], 3)
                                    for k in result["pinned"] if k != "capability"}
    out = ROOT / "benchmarks" / "results" / "cpu_pinning.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
