"""sipwake: wakes sleeping mobile VoIP apps with push notifications."""

from sipwake.compiled import check_fresh as _check_fresh

__version__ = "0.1.0"

_check_fresh()  # in a source tree, never run compiled modules older than their .py files
