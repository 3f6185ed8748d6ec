"""Static spatial attributes of sensors, the input of HyperST-Net's spatial module.

HyperST-Net's traffic task describes each sensor by its GPS coordinates and the road distances
to its 4 nearest neighbours. The benchmark graphs ship a thresholded Gaussian kernel of road
distance instead of the distances (DCRNN's ``w_ij = exp(-(d_ij / sigma)^2)``, zeroed below a
threshold), so the distances are recovered from the weights: ``d_ij / sigma = sqrt(-ln w_ij)``.
The result is in units of the kernel width sigma (its value is not stored in the graph), which
is the natural scale for a network input.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["spatial_attributes", "load_sensor_coordinates", "attributes_from_files"]


def _as_array(name, a, ndim) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return a


def spatial_attributes(coords, adjacency, num_neighbors: int = 4, *, kernel: bool = True,
                       standardize_coords: bool = True) -> torch.Tensor:
    """Per-sensor attributes ``[coord_0, coord_1, d_1, ..., d_k]``: (N, 2 + num_neighbors) float32.

    Args:
        coords: (N, 2) sensor coordinates (latitude, longitude), array or tensor.
        adjacency: (N, N) graph. With ``kernel=True`` (the DCRNN / Los-loop / METR-LA graphs)
            Gaussian-kernel weights in [0, 1], 0 meaning "beyond the threshold"; with
            ``kernel=False`` road distances, 0 meaning "no edge". The diagonal is ignored.
        num_neighbors: k, the number of nearest neighbours whose distances are kept (paper: 4).
        kernel: how to read ``adjacency`` (above).
        standardize_coords: centre and scale each coordinate column to unit variance (raw
            latitudes/longitudes are ~34 / -118, far from the range a network trains well on).

    Returns:
        (N, 2 + k): coordinates, then the distances to the k nearest neighbours in increasing
        order (kernel units ``d / sigma`` when ``kernel=True``). A sensor with fewer than k
        neighbours gets, for each missing one, the largest distance present in the whole graph:
        the edge is absent because the neighbour is at least that far (past the threshold).
    """
    xy = _as_array("coords", coords, 2)
    adj = _as_array("adjacency", adjacency, 2)
    n = xy.shape[0]
    if xy.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {xy.shape}")
    if adj.shape != (n, n):
        raise ValueError(f"adjacency must have shape (N, N) = ({n}, {n}) to match coords, got {adj.shape}")
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be a positive int, got {num_neighbors!r}")
    off = adj.copy()
    np.fill_diagonal(off, 0.0)
    if kernel:
        if off.min() < 0 or off.max() > 1:
            raise ValueError("adjacency with kernel=True must hold Gaussian-kernel weights in [0, 1], "
                             f"got values in [{off.min():.4g}, {off.max():.4g}]")
        with np.errstate(divide="ignore"):
            dist = np.where(off > 0, np.sqrt(-np.log(np.where(off > 0, off, 1.0))), np.inf)
    else:
        if off.min() < 0:
            raise ValueError(f"adjacency with kernel=False must hold distances >= 0, got min {off.min():.4g}")
        dist = np.where(off > 0, off, np.inf)
    finite = dist[np.isfinite(dist)]
    fill = finite.max() if finite.size else 1.0
    k = min(num_neighbors, max(n - 1, 0))
    near = np.sort(dist, axis=1)[:, :k] if k else np.zeros((n, 0))
    near = np.where(np.isfinite(near), near, fill)
    if k < num_neighbors:  # graphs with fewer than k + 1 nodes
        near = np.concatenate([near, np.full((n, num_neighbors - k), fill)], axis=1)
    if standardize_coords:
        std = xy.std(axis=0)
        xy = (xy - xy.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return torch.from_numpy(np.concatenate([xy, near], axis=1)).float()


def load_sensor_coordinates(path: str) -> np.ndarray:
    """(N, 2) latitude/longitude from a DCRNN-style ``graph_sensor_locations.csv``
    (rows ``index,sensor_id,latitude,longitude``, no header; a header line is skipped if present),
    in file order (for Los-loop and METR-LA, the order of the series' columns)."""
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 4:
                continue
            try:
                rows.append((float(parts[-2]), float(parts[-1])))
            except ValueError:
                continue  # header
    if not rows:
        raise ValueError(f"{path}: no 'index,sensor_id,latitude,longitude' rows found")
    return np.asarray(rows)


def attributes_from_files(locations_csv: str, adjacency_csv: str, num_neighbors: int = 4) -> torch.Tensor:
    """:func:`spatial_attributes` from a DCRNN-style locations file and a kernel-weight adjacency
    CSV (no header, N×N, e.g. Los-loop's ``graph_sensor_locations.csv`` and ``los_adj.csv``)."""
    coords = load_sensor_coordinates(locations_csv)
    adj = np.loadtxt(adjacency_csv, delimiter=",")
    if adj.ndim != 2 or adj.shape[0] != coords.shape[0]:
        raise ValueError(f"{adjacency_csv} has shape {adj.shape}, expected ({coords.shape[0]}, {coords.shape[0]}) "
                         f"to match the {coords.shape[0]} sensors of {locations_csv}")
    return spatial_attributes(coords, adj, num_neighbors)
