"""Functional ops with backend dispatch (see docs/design.md, "Public contract")."""
from .adaptive_propagate import AdaptiveGraph, adaptive_graph, adaptive_matmul, adaptive_propagate
from .gcru import gcru_gate, gcru_update
from .gcru_cell import gcru_cell
from .meta_linear import generate_weights, meta_linear

__all__ = ["meta_linear", "generate_weights", "adaptive_propagate", "adaptive_graph",
           "adaptive_matmul", "AdaptiveGraph", "gcru_gate", "gcru_update", "gcru_cell"]
