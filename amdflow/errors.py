"""User-facing errors.

An :class:`AmdflowError` is a problem the user can fix (bad input, bad config, a busy
store). Its message is one line that says what is wrong and how to fix it; the CLI
prints it without a traceback.
"""

from __future__ import annotations


class AmdflowError(Exception):
    """A user-fixable problem, reported as one line without a traceback."""


class ConfigError(AmdflowError):
    """An invalid campaign file or settings value."""


class StoreBusyError(AmdflowError):
    """The embedded store is held by another process."""


class TemplateError(AmdflowError):
    """A template source that cannot be read."""


class CheckpointError(AmdflowError):
    """A missing, corrupt or mismatched CGCNN checkpoint."""
