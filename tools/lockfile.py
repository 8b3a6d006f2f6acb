"""Install exactly what poetry.lock says, and check that the environment still agrees with it.

``make install`` and ``make check-lock`` run the two commands::

    python tools/lockfile.py --extras dev constraints --output .venv/constraints.txt
    python tools/lockfile.py --extras dev check

``constraints`` writes a pip constraints file with one ``name==version`` per locked package (for
a package locked at several versions, the one locked for this environment; see
:func:`constraint_lines`), so ``pip install -c .venv/constraints.txt -e ".[dev]"`` installs the
locked versions instead of the newest ones the ranges in pyproject.toml allow. ``==2.13.0`` also
admits a local build such as ``2.13.0+cpu`` or ``2.13.0+cu128``, so the torch build stays a free
choice (``make TORCH=...``).

``check`` walks the installed dependency closure of the project (its base requirements plus the
requested extras, following each installed distribution's requirements whose markers hold here)
and reports every distribution whose version differs from the lock, is missing, or is not locked.
Locked packages outside that closure (Windows-only, other Python versions, other extras) are not
installed here and are not an error. Both need ``packaging`` (for markers) besides the standard
library; ``make install`` installs it first, and the lock then pins it like the rest.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 and older
    sys.exit(f"adaptlab needs Python 3.11 or 3.12; {sys.executable} is {sys.version.split()[0]}.")

ROOT = Path(__file__).resolve().parents[1]
FIX = "rm -f .venv/.installed && make install"


@dataclass(frozen=True)
class Locked:
    """One ``[[package]]`` entry of poetry.lock.

    Attributes:
        name: canonical distribution name (lower case, runs of ``-_.`` as ``-``).
        version: the locked version.
        markers: the environments that need it (``None``: all of them).
    """

    name: str
    version: str
    markers: str | None = None


@dataclass(frozen=True)
class Installed:
    """What the closure walk needs to know of an installed distribution."""

    version: str
    requires: tuple[str, ...] = ()


def canonical(name: str) -> str:
    """The PEP 503 form of a distribution name: ``Jinja2`` and ``jinja2`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> list[Locked]:
    """The packages of a poetry.lock file, in file order."""
    with path.open("rb") as f:
        lock = tomllib.load(f)
    return [
        Locked(canonical(p["name"]), p["version"], p.get("markers"))
        for p in lock.get("package", [])
    ]


def _holds(markers: str | None, extras: Iterable[str], environment: dict | None = None) -> bool:
    """Whether lock markers hold here, for the base install or any of ``extras``."""
    if markers is None:
        return True
    marker = Marker(markers)
    return any(marker.evaluate({**(environment or {}), "extra": e}) for e in ("", *extras))


def constraint_lines(
    packages: Iterable[Locked], extras: Iterable[str] = (), environment: dict | None = None
) -> list[str]:
    """pip constraint lines pinning the locked packages, for this environment.

    A package locked once is pinned to that version (a constraint on a package nothing asks
    for installs nothing). A package locked at several versions is pinned to the one whose
    markers hold here; when several hold (poetry may lock a second version under overlapping
    markers, e.g. a CUDA library for everything but the dependent that pins it), none is pinned
    and the dependents' own pins choose among the locked versions.

    Args:
        packages: the lock's entries.
        extras: the extras being installed (entries locked for them count as needed).
        environment: marker variables to override (tests); default: this interpreter's.

    Returns:
        ``name==version`` lines, sorted by name.
    """
    by_name: dict[str, list[Locked]] = {}
    for package in packages:
        by_name.setdefault(package.name, []).append(package)
    lines = []
    for name in sorted(by_name):
        entries = by_name[name]
        if len(entries) > 1:
            entries = [e for e in entries if _holds(e.markers, extras, environment)]
        if len(entries) == 1:
            lines.append(f"{name}=={entries[0].version}")
    return lines


def root_requirements(pyproject: Path, extras: Iterable[str]) -> list[str]:
    """The project's base requirements plus those of ``extras``, from pyproject.toml.

    Raises:
        ValueError: an extra that pyproject.toml does not declare.
    """
    with pyproject.open("rb") as f:
        project = tomllib.load(f)["project"]
    declared = project.get("optional-dependencies", {})
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in declared:
            raise ValueError(
                f"Unknown extra {extra!r}; pyproject.toml declares {sorted(declared)}."
            )
        requirements += declared[extra]
    return requirements


def installed_distribution(name: str) -> Installed | None:
    """Version and requirements of the installed distribution ``name``, or None."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    return Installed(dist.version, tuple(dist.requires or ()))


def dependency_closure(
    requirements: Iterable[str], lookup: Callable[[str], Installed | None]
) -> tuple[dict[str, Installed], list[str]]:
    """Every installed distribution that ``requirements`` need here, transitively.

    A requirement counts when its marker holds in this environment, for the extras it was
    reached with (a distribution's ``extra == "x"`` requirements count when something asked
    for ``dist[x]``).

    Args:
        requirements: PEP 508 strings (the project's roots).
        lookup: canonical name -> installed distribution, or None when not installed.

    Returns:
        ``({name: installed}, [missing requirement, with who asked for it])``.
    """
    found: dict[str, Installed] = {}
    missing: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(Requirement(r), frozenset({""}), "adaptlab") for r in requirements]
    while queue:
        req, reached_with, parent = queue.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in reached_with):
            continue
        name, extras = canonical(req.name), frozenset(req.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = lookup(name)
        if dist is None:
            missing.append(f"{req} (needed by {parent})")
            continue
        found[name] = dist
        queue += [(Requirement(r), extras | {""}, name) for r in dist.requires]
    return found, sorted(missing)


def _same_version(installed: str, locked: str) -> bool:
    have, want = Version(installed), Version(locked)
    # A local build (2.13.0+cpu) is the locked release (2.13.0), as pip's ``==`` treats it.
    return have == want or (want.local is None and Version(have.public) == want)


def lock_mismatches(
    found: dict[str, Installed], locked: Iterable[Locked], extras: Iterable[str]
) -> list[str]:
    """One line per installed distribution of the closure whose version the lock does not hold.

    Where a package is locked at several versions, the one whose lock markers hold here is
    expected (all of them when none holds).
    """
    by_name: dict[str, list[Locked]] = {}
    for package in locked:
        by_name.setdefault(package.name, []).append(package)
    problems = []
    for name in sorted(found):
        version = found[name].version
        entries = by_name.get(name)
        if not entries:
            problems.append(f"{name} {version} is installed but not in poetry.lock")
            continue
        here = [e for e in entries if _holds(e.markers, extras)]
        wanted = [e.version for e in here or entries]
        if not any(_same_version(version, v) for v in wanted):
            problems.append(f"{name}: installed {version}, locked {' or '.join(wanted)}")
    return problems


def check(lock: Path, pyproject: Path, extras: list[str]) -> list[str]:
    """Every disagreement between this environment and the lock (empty when they agree)."""
    found, missing = dependency_closure(
        root_requirements(pyproject, extras), installed_distribution
    )
    return lock_mismatches(found, read_lock(lock), extras) + [f"missing: {m}" for m in missing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "poetry.lock", help="the lock file")
    parser.add_argument("--extras", default="", help="comma-separated extras installed (dev)")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("constraints", help="write a pip constraints file from the lock")
    write.add_argument("--output", type=Path, required=True, help="the constraints file to write")
    compare = commands.add_parser("check", help="compare installed distributions with the lock")
    compare.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)

    extras = [e for e in args.extras.split(",") if e]
    if args.command == "constraints":
        lines = constraint_lines(read_lock(args.lock), extras)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(f"# generated from {args.lock.name}\n" + "\n".join(lines) + "\n")
        return 0
    problems = check(args.lock, args.pyproject, extras)
    if problems:
        print(f"The environment disagrees with {args.lock.name}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print(f"Install the locked versions: {FIX}", file=sys.stderr)
        return 1
    print(f"Installed versions match {args.lock.name} ({len(read_lock(args.lock))} locked).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
