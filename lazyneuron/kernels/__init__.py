"""Kernels: each op has a pure-torch reference (the ground truth) and a fast CPU path compiled
at first use. Modules never hold kernel code; they call these ops."""

from . import cmm, experts, gemv, sparse_gemv

__all__ = ["cmm", "experts", "gemv", "sparse_gemv"]
