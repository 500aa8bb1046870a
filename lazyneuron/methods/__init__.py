"""Built-in methods; importing this package registers them."""

from .activation_sparsity import ActivationSparsity, ActivationSparsityConfig
from .base import Method, Observer
from .fff import FastFeedForward, FastFeedForwardConfig, FFFLayer

__all__ = ["ActivationSparsity", "ActivationSparsityConfig", "FFFLayer", "FastFeedForward", "FastFeedForwardConfig", "Method", "Observer"]
