"""The vendored oracle files (tests/fixtures/oracles): their checksum table and a verified decompression."""

from __future__ import annotations

import hashlib
import lzma
import pathlib
import re

ORACLES = pathlib.Path(__file__).resolve().parent / "fixtures" / "oracles"
_CHECKSUM_LINE = re.compile(r"^- ([0-9a-f]{64}) (\S+)$", re.MULTILINE)


def checksums() -> dict[str, str]:
    """``{relative path of the original file: sha256}`` as listed in the oracles' README."""
    return {path: digest for digest, path in _CHECKSUM_LINE.findall((ORACLES / "README.md").read_text())}


def decompress_verified(dest: pathlib.Path, source: pathlib.Path = ORACLES) -> pathlib.Path:
    """Decompress every listed ``<file>.xz`` of ``source`` into ``dest``; raise ValueError on a checksum mismatch."""
    for relative, digest in checksums().items():
        data = lzma.decompress((source / f"{relative}.xz").read_bytes())
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ValueError(f"{source / relative}.xz: sha256 of the decompressed file is {actual}, README says {digest}")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return dest
