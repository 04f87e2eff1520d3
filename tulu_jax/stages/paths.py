"""Config paths: relative to the working directory, with the package's bundled assets reachable from anywhere.

Kept free of JAX so that the CLI can read a sharding file before JAX starts.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib


def resolve_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """A config path: as given (relative to the CWD) if it exists, else a bundled `tulu_jax/...` package file,
    else as given (the caller reports it missing)."""
    candidate = pathlib.Path(path).expanduser()
    if candidate.exists():
        return candidate
    parts = candidate.parts
    if not candidate.is_absolute() and parts and parts[0] == "tulu_jax":
        bundled = pathlib.Path(str(importlib.resources.files("tulu_jax"))).joinpath(*parts[1:])
        if bundled.exists():
            return bundled
    return candidate
