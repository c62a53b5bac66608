#!/usr/bin/env python
"""Choose competent plain baselines on a validation split carved from the training pool (never the test set).

    python -m study.select_baselines study/configs/select_baselines.yaml [--datasets mnist cifar10] [--settings NAME ...]
    python -m study.select_baselines study/configs/select_baselines.yaml --logreg    # the pixel logistic-regression reference
    python -m study.select_baselines study/configs/select_baselines.yaml --report    # REPORT.md + the factorial config

Resumable: cells already in the results JSONL are skipped. One thread per run. See study/baselines.py.
"""

import argparse

from .baselines import SelectionConfig, run_selection


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="A selection YAML (base, datasets, settings, results).")
    parser.add_argument("--datasets", nargs="*", default=None, help="Only these data sets.")
    parser.add_argument("--settings", nargs="*", default=None, help="Only these settings.")
    parser.add_argument("--limit", type=int, default=None, help="Run at most this many unfinished cells.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1).")
    parser.add_argument("--dry_run", action="store_true", help="List the cells and exit.")
    parser.add_argument("--logreg", action="store_true", help="Write pixel_logreg.json (the pixel logistic-regression reference); train nothing.")
    parser.add_argument("--report", action="store_true", help="Write the report and the factorial config from the JSONL; train nothing.")
    args = parser.parse_args()
    config = SelectionConfig.from_yaml(args.config)
    if args.dry_run:
        for cell in config.cells():
            print(cell.id)
        return
    if args.logreg:
        from .baselines_report import logreg_references

        print(logreg_references(config))
        return
    if args.report:
        from .baselines_report import write_outputs

        for path in write_outputs(config):
            print(path)
        return
    run_selection(config, datasets=args.datasets, settings=args.settings, limit=args.limit, threads=args.threads)


if __name__ == "__main__":
    main()
