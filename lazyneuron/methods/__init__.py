"""Built-in methods; importing this package registers them."""

from .activation_sparsity import ActivationSparsity, ActivationSparsityConfig
from .base import Method, Observer
from .early_exit import EarlyExit, EarlyExitConfig, ExitHeads
from .experts import ExpertMLP, ExpertRouting, ExpertRoutingConfig, NativeMoE
from .fff import FastFeedForward, FastFeedForwardConfig, FFFLayer
from .gating import GatedStack, GatePredictor, ModuleGating, ModuleGatingConfig

__all__ = ["ActivationSparsity", "ActivationSparsityConfig", "EarlyExit", "EarlyExitConfig", "ExitHeads", "ExpertMLP", "ExpertRouting", "ExpertRoutingConfig", "NativeMoE", "FFFLayer", "FastFeedForward", "FastFeedForwardConfig", "GatePredictor", "GatedStack", "Method", "ModuleGating", "ModuleGatingConfig", "Observer"]

