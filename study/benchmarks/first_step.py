"""The first training step with empty compiler caches: how much longer it takes with DREG than plain.

    python study/benchmarks/first_step.py --shape gemma2-tiny:2x16 --variants plain,dreg@eager,dreg@compiled --out FILE

Each variant runs in a fresh process with empty compiler caches of its own (TorchInductor's and triton's,
in a new temporary folder): the model of ``study/benchmarks/overhead.py``'s shape, built as the DREG
trainers build it, times its first step (forward + backward + AdamW, which includes compiling DREG's kernels
where its family compiles) and then the median of its next ``--steps`` steps. The variants alternate over
``--repeats`` rounds; the report is each variant's first step minus plain's first step, per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(shape_text: str, variant: str, steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parents[1]))
    import overhead
    import torch

    torch.set_num_threads(1)
    _, shape = overhead.parse_shape(shape_text)
    model = overhead.build_model(shape, 0, torch.float32, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        contender = overhead.build_contender(overhead.PLAIN if variant == "plain" else variant, model, tmp)
    batch = overhead.make_batch(shape, model, "cpu")
    started = time.perf_counter()
    contender.step(batch)
    first = time.perf_counter() - started
    later = [contender.timed_step(batch)[0] for _ in range(steps)]
    return {"variant": variant, "first_step_s": first, "later_step_s": statistics.median(later)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gemma2-tiny:2x16")
    parser.add_argument("--variants", default="plain,dreg@eager,dreg@compiled")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one variant in this process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.shape, args.one, args.steps)))
        return {}
    variants = args.variants.split(",")
    if variants[0] != "plain":
        parser.error("--variants: start with plain")
    rounds = []
    for _ in range(args.repeats):
        runs = {}
        for variant in variants:
            with tempfile.TemporaryDirectory(prefix="dreg_first_step_") as caches:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor", TRITON_CACHE_DIR=f"{caches}/triton",
                           HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # fmt: skip
                command = [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps), "--one", variant]
                done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
                runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        rounds.append(runs)
        print(json.dumps(runs), file=sys.stderr, flush=True)
    summary = {
        v: {
            "first_step_minus_plain_s": [r[v]["first_step_s"] - r["plain"]["first_step_s"] for r in rounds],
            "first_step_s": [r[v]["first_step_s"] for r in rounds],
            "later_step_over_plain": [r[v]["later_step_s"] / r["plain"]["later_step_s"] for r in rounds],
        }
        for v in variants
    }
    result = {"shape": args.shape, "load": os.getloadavg(), "rounds": rounds, "summary": summary}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for v, row in summary.items():
        print(f"{v:15s} first step - plain's: {', '.join(f'{x:+.1f} s' for x in row['first_step_minus_plain_s'])}")
    return result


if __name__ == "__main__":
    main()
