"""bequest: pass what earlier language models learned on to later ones."""

__version__ = "0.1.0"

from bequest.errors import BequestError  # noqa: E402

__all__ = ["BequestError", "__version__"]
