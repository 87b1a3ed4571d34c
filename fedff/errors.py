"""The one base class of fedff's expected failures.

Each names the problem and the fix in its message; the CLI catches `FedffError` and
prints that one line (`fedff: error: ...`) with exit status 2. The subclasses keep the
built-in base a caller would catch without fedff in mind (a bad value is a ValueError).
"""

from __future__ import annotations


class FedffError(Exception):
    """An expected failure: bad config, data, shapes, peers or credentials."""


class ConfigError(FedffError, ValueError):
    """A bad config value or key; the message names the problem and the fix."""


class ShapeError(FedffError, ValueError):
    """A tensor that does not fit the layer; the message names the expected shape."""
