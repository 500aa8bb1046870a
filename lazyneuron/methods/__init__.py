"""Built-in methods; importing this package registers them."""

from .activation_sparsity import ActivationSparsity, ActivationSparsityConfig
from .base import Method, Observer

__all__ = ["ActivationSparsity", "ActivationSparsityConfig", "Method", "Observer"]
