"""Spatial Balance Attention (SBA): METIS-partitioned attention for large sensor graphs.

See docs/sba.md. ``partition_graph`` needs the optional ``pymetis`` (``pip install
himnet_fast[sba]``) for graphs with edges; the edgeless fallbacks and the attention ops do not.
"""
from himnet_fast.sba.adaptive import partitioned_adaptive_matmul
from himnet_fast.sba.attention import block_attention, inter_attention, part_mean
from himnet_fast.sba.model import SBATransformer, laplacian_pe
from himnet_fast.sba.partition import Partition, partition_graph

__all__ = ["Partition", "partition_graph", "block_attention", "inter_attention", "part_mean",
           "SBATransformer", "laplacian_pe", "partitioned_adaptive_matmul"]
