"""sipwake: wakes sleeping mobile VoIP apps with push notifications."""

__version__ = "0.1.0"
