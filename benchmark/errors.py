"""Errors that are the user's to fix: reported as one paragraph and a non-zero exit, no traceback."""
from __future__ import annotations

import sys

# module -> exception class names. Looked up only in modules already imported, so reporting an
# early error (a missing data set) never pays for importing torch.
_USER_ERRORS = {
    "mugbench.config": ("ConfigError",),
    "mugbench.data.catalog": ("DataNotFoundError", "BadDataError"),
    "mugbench.registry": ("UnknownMethodError",),
    "mugbench.method": ("MethodOptionError",),
    "mugbench.train.loop": ("NonFiniteLossError", "CheckpointMismatchError"),
    "mugbench.train.checkpoint": ("UnreadableCheckpointError",),
    "mugbench.train.run_lock": ("RunLockedError",),
    "mugbench.sources": ("EncoderSourceError",),
    "mugbench.export": ("ExportError",),
    "mugbench.preflight": ("OutputError",),
    "mugbench.data.transforms": ("ViewDeclarationError",),
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as a message rather than a traceback."""
    found = [getattr(sys.modules[m], n) for m, names in _USER_ERRORS.items() if m in sys.modules for n in names]
    return (FileNotFoundError, *found)
