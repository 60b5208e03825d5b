"""Writes a sweep's report: Markdown table, CSV and accuracy-vs-state-size plot.

    python scripts/report.py runs/sweeps/<study> [--out docs/results/<study>]
        [--earlier docs/results/<study>/report.csv]

--earlier keeps an earlier report's rows for runs the sweep directory no longer holds (a study
run in parts, on machines whose run directories are gone); its runs are marked in the report by
nothing but their absence from the sweep directory, so say which they are where you cite them.
"""

import argparse

from memjax.report import markdown_table, write_report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output directory (default: the sweep directory)")
    p.add_argument("--earlier", default=None,
                   help="an earlier report.csv: its rows for runs not in sweep_dir are kept")
    args = p.parse_args(argv)
    rows = write_report(args.sweep_dir, args.out, args.earlier)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
