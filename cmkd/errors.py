"""Error types. Every error about a file names the file; every config error names the key."""

from __future__ import annotations

from pathlib import Path


class CmkdError(Exception):
    """Base class of the errors cmkd raises on purpose."""


class DataFormatError(CmkdError, ValueError):
    """A data file is not what its format requires."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # picklable, so it crosses from worker processes intact
        return type(self), (self.path, self.problem)


class ChecksumError(DataFormatError):
    """A file's checksum differs from the expected one."""


class UnsafeArchiveError(DataFormatError):
    """An archive member would be written outside the extraction folder."""


class ConfigError(CmkdError, ValueError):
    """A params.yaml value is invalid; the message names the key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"params.yaml: {key}: {problem}")

    def __reduce__(self):
        return type(self), (self.key, self.problem)
