"""GPU images/s, MFU and host-device syncs per training step of the method files, through their own main() (the
real training step: the data path main() picks (on-device batches up to 64 px, DataLoader workers above: mae and can
at 224 px), bf16 autocast, the optimizer, the logger).

    python bench/gpu.py                      # all runs below (30 steps each; not yet run: no GPU lent so far)
    python bench/gpu.py --only mae can       # some methods
    python bench/gpu.py --steps 60 --compile # more steps; add the torch.compile runs of mae and can
    python bench/gpu.py --only igpt --compile --compile-methods igpt    # one method, eager and compiled

Each run trains on the synthetic shapes (no dataset needed) for --steps steps, logging every --steps/3 steps; images/s
and perf/mfu are read from the run's metrics.jsonl (the median of the logging rows after the first, which holds the
warm-up and compilation). The whole run is under torch.cuda.set_sync_debug_mode("warn"): every operation that makes
the host wait for the GPU emits a warning, and each is attributed to the training step during which it happened
(between two calls of RunLogger.step); the table reports syncs per step on non-logging and on logging steps, and the
first call site of each kind (run with --where for all of them). Monitors and checkpoints run only at step 0 and at
the end (outside the counted steps). Prints one JSON line per run and a summary table; writes bench/gpu_results.json.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

BIG = "1000000"  # eval / checkpoint interval: only at step 0 and at the end
# (method, label, flags): each method's main GPU configuration; --batch-size is the global batch (one GPU here).
RUNS = [
    ("mae", "vit_b/16 224px bf16", ["--arch", "vit_b", "--image-size", "224", "--batch-size", "256"]),
    ("can", "vit_b/16 224px bf16", ["--arch", "vit_b", "--image-size", "224", "--batch-size", "256"]),
    ("simclr", "resnet18 32px bf16 (cifar)", ["--preset", "cifar", "--batch-size", "512"]),
    ("igpt", "igpt_10m axial 32px bf16 (cifar)", ["--preset", "cifar", "--batch-size", "64"]),
    ("gcrl", "gcrl_5_5 32px bf16 (cifar)", ["--preset", "cifar", "--batch-size", "64"]),
    # paper A.1's setup on RandBit over the synthetic shapes with drawn digits (no dataset files on the GPU machine)
    (
        "contrastive_props",
        "resnet18 randbit 32px bf16 (paper A.1)",
        ["--preset", "paper", "--base", "synthetic", "--digits", "drawn"],
    ),
]
COMPILED = ["mae", "can"]  # also run with --compile under --compile


class SyncCounter:
    """Counts CUDA sync warnings per training step (the step number is advanced by RunLogger.step)."""

    def __init__(self):
        self.step, self.log_steps = 0, set()
        self.per_step = collections.Counter()
        self.sites = collections.Counter()

    def install(self):
        original = common.RunLogger.step
        counter = self

        def step(logger, step, *a, **kw):
            out = original(logger, step, *a, **kw)
            if out:
                counter.log_steps.add(step)
            counter.step = step
            return out

        common.RunLogger.step = step
        return original

    def record(self, where: str):
        self.per_step[self.step + 1] += 1  # the step being computed (RunLogger.step of it not returned yet)
        self.sites[where] += 1


def run_one(method: str, flags: list[str], steps: int, workdir: str, where: bool, device: str = "cuda") -> dict:
    module = __import__(method)
    counter = SyncCounter()
    original = counter.install()
    run_name = f"{method}_{abs(hash(tuple(flags))) % 10**6}"
    log_every = max(1, steps // 3)
    argv = ["--steps", str(steps), "--log-every", str(log_every), "--ckpt-every", BIG, "--output-dir", workdir,
            "--run-name", run_name, "--device", device]  # fmt: skip
    if method != "contrastive_props":  # that one generates its own datasets and has no periodic monitors
        argv += ["--dataset", "synthetic", "--synthetic-size", "4096", "--eval-every", BIG]
    argv += flags
    if method in ("igpt", "gcrl"):
        argv += ["--num-samples", "0", "--eval-images", "256"]
    t0 = time.time()
    seen = [0]

    def on_warning(message, category, filename, lineno, file=None, line=None):
        seen[0] += 1
        if "synchroniz" in str(message).lower():
            stack = traceback.extract_stack()[:-1]
            site = next((f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack)
                         if f.filename.startswith(ROOT) and "bench" not in f.filename), "?")  # fmt: skip
            counter.record(site)

    with warnings.catch_warnings():  # restores the warning machinery afterwards
        warnings.simplefilter("always")
        warnings.showwarning = on_warning
        cuda = device == "cuda"
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            module.main(argv)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            common.RunLogger.step = original
    wall = time.time() - t0
    rows = [json.loads(line) for line in open(os.path.join(workdir, run_name, "metrics.jsonl"))]
    perf = [r for r in rows if "perf/images_per_s" in r]
    later = perf[1:] or perf
    counted = range(2, steps + 1)  # step 1 also holds the setup and the step-0 monitors
    plain = [counter.per_step[s] for s in counted if s not in counter.log_steps]
    logging = [counter.per_step[s] for s in counted if s in counter.log_steps]
    result = {
        "method": method,
        "flags": " ".join(flags),
        "images_per_s": statistics.median(r["perf/images_per_s"] for r in later),
        "mfu": statistics.median(r["perf/mfu"] for r in later) if "perf/mfu" in later[-1] else None,
        "syncs_per_step": statistics.median(plain) if plain else None,
        "syncs_per_logging_step": statistics.median(logging) if logging else None,
        "sync_sites": dict(counter.sites.most_common(None if where else 6)),
        "warnings_seen": seen[0],
        "wall_s": round(wall, 1),
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "peak_bf16_flops": common.gpu_peak_flops(device),
    }
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[r[0] for r in RUNS], help="methods to run")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (logging every steps/3)")
    parser.add_argument("--compile", action="store_true", help="also run --compile-methods with --compile")
    parser.add_argument("--compile-methods", nargs="+", default=COMPILED, help="methods of the --compile runs")
    parser.add_argument("--where", action="store_true", help="list every sync call site")
    parser.add_argument("--cpu-smoke", action="store_true", help="check this script on a CPU: tiny presets, no GPU")
    a = parser.parse_args()
    device = "cpu" if a.cpu_smoke else "cuda"
    if not a.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (--cpu-smoke checks the script itself on a CPU)")
    if not a.cpu_smoke:
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, peak bf16 {common.gpu_peak_flops('cuda')}")
    runs = [(m, "tiny", ["--preset", "tiny"]) for m, _, _ in RUNS] if a.cpu_smoke else RUNS
    plan = [(m, label, flags) for m, label, flags in runs if m in a.only]
    if a.compile:
        plan += [(m, label + " --compile", flags + ["--compile"]) for m, label, flags in runs if m in a.compile_methods]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for method, label, flags in plan:
            try:
                r = run_one(method, flags, a.steps, workdir, a.where, device)
            except (Exception, SystemExit) as e:  # one failing method (a one-line error exits) must not hide the rest
                r = {"method": method, "flags": " ".join(flags), "error": f"{type(e).__name__}: {e}"[:500]}
            r["label"] = label
            print(json.dumps(r), flush=True)
            results.append(r)
    print("\n| method | config | images/s | MFU | syncs / step | syncs / logging step |\n|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['method']} | {r['label']} | error: {r['error'][:80]} | | | |")
            continue
        util = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {r['method']} | {r['label']} | {r['images_per_s']:.0f} | {util} | {r['syncs_per_step']} | "
              f"{r['syncs_per_logging_step']} |")  # fmt: skip
    if a.cpu_smoke:
        return
    with open(os.path.join(ROOT, "bench", "gpu_results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
