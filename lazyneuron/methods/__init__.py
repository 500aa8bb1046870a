"""Built-in methods; importing this package registers them."""

from .base import Method, Observer

__all__ = ["Method", "Observer"]
