"""Spatial Balance Attention (SBA): METIS-partitioned attention for large sensor graphs.

One import for what SBA is made of, wherever it lives in the layers: the partitioning
(:mod:`himnet_fast.partition`), the attention ops and the partitioned adaptive graph
(:mod:`himnet_fast.ops.block_attention`, :mod:`himnet_fast.ops.partitioned_adaptive`) and the
model (:mod:`himnet_fast.models.sba`). See docs/sba.md. ``partition_graph`` needs the optional
``pymetis`` (``pip install himnet_fast[sba]``) for graphs with edges; the edgeless fallbacks
and the attention ops do not.
"""
from himnet_fast.models.sba import SBATransformer, laplacian_pe
from himnet_fast.ops.block_attention import block_attention, inter_attention, part_mean
from himnet_fast.ops.partitioned_adaptive import partitioned_adaptive_matmul
from himnet_fast.partition import Partition, partition_graph

__all__ = ["Partition", "partition_graph", "block_attention", "inter_attention", "part_mean",
           "SBATransformer", "laplacian_pe", "partitioned_adaptive_matmul"]
