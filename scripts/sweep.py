#!/usr/bin/env python
"""Run a factorial sweep: python scripts/sweep.py configs/sweep_low_data.yaml [--workers 2] [--shard 0/4]

Resumable (finished cells in the results JSONL are skipped); run it from the repository root.
On a Ray cluster: python scripts/sweep.py CONFIG --backend ray [--address auto] [--num_cpus 1] [--num_gpus 0]
(every cell a Ray task; the driver appends each finished cell to the JSONL, so a killed sweep resumes).
"""

import argparse

from hf_dreg.sweep import SweepConfig, expand_grid, run_sweep, select_shard


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="A sweep YAML (base, grid, results).")
    parser.add_argument("--shard", default=None, help="i/n: run every n-th cell starting at i (for job arrays).")
    parser.add_argument("--workers", type=int, default=1, help="Local backend: cells run in parallel processes, one thread each.")
    parser.add_argument("--backend", choices=["local", "ray"], default="local", help="local (this machine, default) or ray.")
    parser.add_argument("--address", default=None, help="Ray: the cluster address ('auto', 'ray://host:10001'); default a local Ray instance.")
    parser.add_argument("--num_cpus", type=float, default=1, help="Ray: CPUs each cell asks for (also its torch threads).")
    parser.add_argument("--num_gpus", type=float, default=0, help="Ray: GPUs each cell asks for.")
    parser.add_argument("--limit", type=int, default=None, help="Run at most this many unfinished cells, then stop.")
    parser.add_argument("--dry_run", action="store_true", help="List the cells and exit.")
    args = parser.parse_args()
    config = SweepConfig.from_yaml(args.config)
    shard = tuple(int(x) for x in args.shard.split("/")) if args.shard else None
    if args.dry_run:
        cells = select_shard(expand_grid(config), shard)
        for cell in cells:
            print(cell.id)
        print(f"{len(cells)} cells")
        return
    if args.backend == "ray" and args.workers != 1:
        parser.error("--workers is for the local backend; with --backend ray, Ray schedules the cells (--num_cpus/--num_gpus each).")
    if args.backend == "local" and (args.address or args.num_gpus):
        parser.error("--address and --num_gpus are for --backend ray.")
    run_sweep(
        config, shard=shard, workers=args.workers, limit=args.limit, backend=args.backend, address=args.address,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus,
    )


if __name__ == "__main__":
    main()
