"""Connected components by large-star and small-star rounds, for graphs whose edges do not fit in one process.

Kiveris, Lattanzi, Mirrokni, Rastogi and Vassilvitskii, "Connected Components in MapReduce and Beyond" (SoCC
2014): a round groups the edges by node twice. Large-star links every larger neighbour of a node to the
smallest node of its neighbourhood; small-star links a node and its smaller neighbours to the smallest of them.
Both keep every component connected and lower its labels, and after O(log^2 n) rounds every component is a
star around its smallest node: each of its other nodes has that node as its one neighbour. The functions here
work on the edges of one partition of nodes as numpy arrays; pipelines/stages/dedup/stars.py moves the edges
between partitions through files. An edge list here names each node's every edge from that node's side (both
directions of an undirected edge, in the partitions of its two ends).
"""

from __future__ import annotations

import numpy as np


def _sorted_distinct(node: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (node, other) rows sorted by node, then other; repeated rows and self-loops dropped."""
    node, other = np.asarray(node, np.int64), np.asarray(other, np.int64)
    order = np.lexsort((other, node))
    node, other = node[order], other[order]
    keep = node != other
    keep[1:] &= (node[1:] != node[:-1]) | (other[1:] != other[:-1])
    return node[keep], other[keep]


def _runs(node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start of each run of equal nodes, each row's run)."""
    change = np.r_[True, node[1:] != node[:-1]] if len(node) else np.zeros(0, bool)
    return np.flatnonzero(change), np.cumsum(change) - 1


def large_star(node: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every edge of each node u here, from u's side -> large-star's edges (v, m(u)) for each neighbour v > u,
    m(u) the smallest of u and its neighbours. The edges come out larger end first, to be grouped by it."""
    return large_star_round(node, other)[:2]


def large_star_round(node: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """`large_star`'s edges and `unsettled`'s count of the same edges, sorted once."""
    node, other = _sorted_distinct(node, other)
    if not len(node):
        return node, other, 0
    starts, run = _runs(node)
    nearest = np.minimum.reduceat(other, starts)
    smallest = np.minimum(node[starts], nearest)[run]
    larger = other > node
    return other[larger], smallest[larger], _unsettled(node[starts], nearest, np.diff(np.r_[starts, len(node)]))


def _unsettled(nodes: np.ndarray, nearest: np.ndarray, degree: np.ndarray) -> int:
    centre = nearest > nodes
    leaf = (degree == 1) & (nearest < nodes)
    return int(np.count_nonzero(~(centre | leaf)))


def small_star(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every edge (u, w), w < u, of each node u here -> small-star's edges: u and each of its smaller neighbours
    w linked to m(u), the smallest of them. Undirected, smaller end second, each once."""
    high, low = _sorted_distinct(high, low)
    if not len(high):
        return high, low
    if np.any(low > high):
        raise ValueError("small_star takes each edge larger end first")
    starts, run = _runs(high)
    smallest = np.minimum.reduceat(low, starts)
    others = low != smallest[run]
    first = np.concatenate([low[others], high[starts]])
    second = np.concatenate([smallest[run][others], smallest])
    a, b = np.maximum(first, second), np.minimum(first, second)
    return _sorted_distinct(a, b)


def both_ways(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges -> each from both of its ends' sides: (node, other)."""
    return np.concatenate([first, second]), np.concatenate([second, first])


def unsettled(node: np.ndarray, other: np.ndarray) -> int:
    """Nodes here that are neither a centre (every neighbour larger) nor a leaf (one neighbour, smaller). When
    no partition has one, every component is a star around its smallest node: the rounds are done."""
    return large_star_round(node, other)[2]


def star_members(node: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The settled edges of the nodes here -> (key, root, size) of every member of the components whose centre
    (root) is here: the centre and its leaves, the size one more than the centre's degree."""
    node, other = _sorted_distinct(node, other)
    if not len(node):
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    starts, run = _runs(node)
    centres = np.minimum.reduceat(other, starts) > node[starts]
    sizes = np.diff(np.r_[starts, len(node)]) + 1
    leaves = centres[run]
    keys = np.concatenate([node[starts][centres], other[leaves]])
    roots = np.concatenate([node[starts][centres], node[leaves]])
    size = np.concatenate([sizes[centres], sizes[run][leaves]])
    order = np.argsort(keys, kind="stable")
    return keys[order], roots[order], size[order]


def strongest(node: np.ndarray, other: np.ndarray, kind: np.ndarray,
              similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of each node here, from its side -> each node's strongest pair, by minhash.component_members's
    rule: the lowest kind (exact first), then the highest similarity (NaN lowest, given as -inf as there), then
    the smallest other key. (node, kind, similarity, other), sorted by node."""
    value = np.where(np.isnan(similarity), -np.inf, similarity)
    order = np.lexsort((other, -value, kind, node))
    node = np.asarray(node, np.int64)[order]
    first = np.flatnonzero(np.r_[True, node[1:] != node[:-1]]) if len(node) else np.zeros(0, np.int64)
    taken = order[first]
    return node[first], np.asarray(kind)[taken], value.astype(np.float32)[taken], np.asarray(other, np.int64)[taken]
