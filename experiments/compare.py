"""The exact cross-check experiment (docs/compare.md); the same as `bdiff compare CONFIG`.

    python experiments/compare.py experiments/configs/compare.yaml --out runs/compare
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bdiff_pyro.crosscheck import compare_main  # noqa: E402
from bdiff_pyro.errors import UserError  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. experiments/configs/compare.yaml")
    parser.add_argument("--out", default=None, help="output directory (default runs/compare-<time>); "
                        "existing result files are never overwritten")
    args = parser.parse_args(argv)
    try:
        paths = compare_main(args.config, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
