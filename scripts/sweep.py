#!/usr/bin/env python
"""Run a factorial sweep: python scripts/sweep.py configs/sweep_low_data.yaml [--workers 2] [--shard 0/4]

Resumable (finished cells in the results JSONL are skipped); run it from the repository root.
"""

import argparse

from hf_dreg.sweep import SweepConfig, expand_grid, run_sweep, select_shard


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="A sweep YAML (base, grid, results).")
    parser.add_argument("--shard", default=None, help="i/n: run every n-th cell starting at i (for job arrays).")
    parser.add_argument("--workers", type=int, default=1, help="Cells run in parallel processes, one thread each.")
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
    run_sweep(config, shard=shard, workers=args.workers, limit=args.limit)


if __name__ == "__main__":
    main()
