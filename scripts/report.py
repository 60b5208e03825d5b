"""Writes a sweep's report: Markdown table, CSV and accuracy-vs-state-size plot.

    python scripts/report.py runs/sweeps/<study> [--out docs/results/<study>]
"""

import argparse

from memjax.report import markdown_table, write_report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    args = p.parse_args(argv)
    rows = write_report(args.sweep_dir, args.out)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
