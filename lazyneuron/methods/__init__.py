"""Built-in methods; importing this package registers them."""

from .activation_sparsity import ActivationSparsity, ActivationSparsityConfig
from .base import Method, Observer
from .early_exit import EarlyExit, EarlyExitConfig, ExitHeads
from .fff import FastFeedForward, FastFeedForwardConfig, FFFLayer

__all__ = ["ActivationSparsity", "ActivationSparsityConfig", "EarlyExit", "EarlyExitConfig", "ExitHeads", "FFFLayer", "FastFeedForward", "FastFeedForwardConfig", "Method", "Observer"]
