"""Training step time on a shared CPU, with and without ``OMP_WAIT_POLICY=PASSIVE``.

The quickstart's training step (LoRA on the top 2 layers of the default model, the fast path, 8
items x 5 languages per step) is timed in fresh processes, one per policy per round, while
``--busy`` other CPU-bound processes (plain Python loops, standing in for other users of the
machine) run the whole time. The policy must be set before the OpenMP runtime starts, so every
measurement is its own process; the two policies alternate (order rotated each round) so that a
change of the machine's load hits both. Reported: the median step time per policy and the paired
ratio (unset / PASSIVE) per round.

Run: ``.venv/bin/python benchmarks/bench_threads.py [--rounds 2] [--busy 2] [--steps 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("PASSIVE", "unset")


def child(args: argparse.Namespace) -> None:
    """One measurement: load, precompute, one warm-up step, then ``--steps`` timed fast steps."""
    sys.path.insert(0, str(HERE))
    import bench_train
    import torch

    bench_args = argparse.Namespace(
        model=args.model,
        kind="lora",
        layers=2,
        languages="en,de,es,fr,it",
        batch_items=8,
        reference_copy=False,
    )
    bench = bench_train.Bench(bench_args, ("fast",))
    bench.fast_step()
    steps = [bench.fast_step() for _ in range(args.steps)]
    print(json.dumps({"steps_s": steps, "threads": torch.get_num_threads()}))


def measure(policy: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        args.model,
        "--steps",
        str(args.steps),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes running meanwhile")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    results: dict[str, list[list[float]]] = {policy: [] for policy in POLICIES}
    try:
        for round_index in range(args.rounds):
            order = POLICIES if round_index % 2 == 0 else POLICIES[::-1]
            for policy in order:
                steps = measure(policy, args)["steps_s"]
                results[policy].append(steps)
                print(f"round {round_index + 1} {policy:8s}: {[round(s, 2) for s in steps]} s/step")
    finally:
        for process in busy:
            process.kill()
    medians = {p: statistics.median(s for run in results[p] for s in run) for p in POLICIES}
    ratios = [
        statistics.median(unset) / statistics.median(passive)
        for passive, unset in zip(results["PASSIVE"], results["unset"], strict=True)
    ]
    summary = {
        "model": args.model,
        "busy_processes": args.busy,
        "cores": os.cpu_count(),
        "steps_s": results,
        "median_step_s": medians,
        "ratio_unset_over_passive_per_round": ratios,
    }
    print(
        f"median step: PASSIVE {medians['PASSIVE']:.2f} s, unset {medians['unset']:.2f} s; "
        f"unset / PASSIVE per round: {[round(r, 2) for r in ratios]}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
