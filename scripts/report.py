#!/usr/bin/env python
"""Write the report of a sweep: python scripts/report.py results/low_data/results.jsonl [--output results/low_data]"""

import argparse
from pathlib import Path

from hf_dreg.report import write_report


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", help="The sweep's results JSONL.")
    parser.add_argument("--output", default=None, help="Folder for REPORT.md and the plots (default: beside the JSONL).")
    parser.add_argument("--title", default="Sweep report")
    args = parser.parse_args()
    folder = args.output or str(Path(args.results).parent)
    print(write_report(args.results, folder, title=args.title))


if __name__ == "__main__":
    main()
