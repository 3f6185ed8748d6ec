"""The library's ops: each a registered PyTorch custom op (``himnet_fast::<op>``) with its fake,
its autograd formula and the backends it dispatches to, in one module (docs/design.md).

Leaf ops: ``meta_linear``, ``adaptive_matmul`` and ``adaptive_graph``, ``gcru_gate`` and
``gcru_update``, ``block_attention``, ``partitioned_adaptive_matmul``. Above them: the graph
(:class:`AdaptiveGraph`, ``adaptive_propagate``: Chebyshev terms over the dense, streamed or
partitioned graph) and the recurrent cell (``gcru_cell``, one step as one op; for the modules,
a sequence, a pair of cells and HimNet's decoder as one op each: ``gcru_cell.gcru_sequence``,
``gcru_pair.gcru_sequence_pair``, ``gcru_decoder.gcru_decoder``).
"""
from .adaptive_matmul import adaptive_graph, adaptive_matmul
from .block_attention import block_attention, inter_attention, part_mean
from .gcru import gcru_gate, gcru_update
from .meta_linear import generate_weights, meta_linear
from .partitioned_adaptive import partitioned_adaptive_matmul
from .graph import AdaptiveGraph, adaptive_propagate  # noqa: E402  (graph layer: above the leaf ops)
from .gcru_cell import gcru_cell  # noqa: E402  (cell layer: above the graph)

__all__ = ["meta_linear", "generate_weights", "adaptive_propagate", "adaptive_graph", "adaptive_matmul",
           "AdaptiveGraph", "gcru_gate", "gcru_update", "gcru_cell", "block_attention", "inter_attention",
           "part_mean", "partitioned_adaptive_matmul"]
