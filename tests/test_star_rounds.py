"""Large-star/small-star rounds (selectors/star_rounds.py), run partition by partition as the dedup graph runs
them: the components, roots and sizes of the driver's union-find, and each member's strongest pair by its rule."""

from __future__ import annotations

import numpy as np
import pytest

from winnow.selectors import minhash, star_rounds


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    return (values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(32)) % np.uint64(parts)


def rounds(first: np.ndarray, second: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The rounds on `parts` node partitions until none is unsettled: (key, root, size) of every member, and
    the rounds run."""
    node, other = star_rounds.both_ways(first, second)
    count, unsettled = 0, 1
    while unsettled and count < 100:
        count += 1
        where = partition_of(node, parts)
        unsettled = sum(star_rounds.unsettled(node[where == p], other[where == p]) for p in range(parts))
        large = [star_rounds.large_star(node[where == p], other[where == p]) for p in range(parts)]
        high, low = np.concatenate([edges[0] for edges in large]), np.concatenate([edges[1] for edges in large])
        where = partition_of(high, parts)
        small = [star_rounds.small_star(high[where == p], low[where == p]) for p in range(parts)]
        node, other = star_rounds.both_ways(np.concatenate([edges[0] for edges in small]),
                                            np.concatenate([edges[1] for edges in small]))
    where = partition_of(node, parts)
    members = [star_rounds.star_members(node[where == p], other[where == p]) for p in range(parts)]
    keys, roots, sizes = (np.concatenate([part[i] for part in members]) for i in range(3))
    order = np.argsort(keys)
    return keys[order], roots[order], sizes[order], count


def union_find(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys, roots, sizes, *_ = minhash.component_members(first, second, np.zeros(len(first), np.int8),
                                                      np.ones(len(first), np.float32))
    return keys, roots, sizes


def test_a_path_settles_into_one_star_around_its_smallest_node():
    order = np.random.default_rng(1).permutation(2000) * 3 + 5
    keys, roots, sizes, count = rounds(order[:-1], order[1:], parts=4)
    assert keys.tolist() == sorted(order.tolist())
    assert set(roots.tolist()) == {5} and set(sizes.tolist()) == {2000}
    assert 2 < count < 30


@pytest.mark.parametrize("seed", range(8))
def test_random_graphs_give_the_union_finds_components_on_any_partitioning(seed):
    rng = np.random.default_rng(seed)
    nodes, edges = int(rng.integers(10, 3000)), int(rng.integers(5, 4000))
    first, second = rng.integers(0, nodes, edges) * 7919 + 13, rng.integers(0, nodes, edges) * 7919 + 13
    first, second = first[first != second], second[first != second]
    expected = union_find(first, second)
    for parts in (1, 3, 16):
        keys, roots, sizes, _ = rounds(first, second, parts)
        assert [keys.tolist(), roots.tolist(), sizes.tolist()] == [part.tolist() for part in expected]


def test_a_star_around_its_smallest_node_is_settled_at_once():
    keys, roots, sizes, count = rounds(np.array([1, 1, 1, 7]), np.array([4, 9, 6, 8]), parts=2)
    assert count == 1, "two stars around their smallest nodes: nothing to do"
    assert (keys.tolist(), roots.tolist(), sizes.tolist()) == ([1, 4, 6, 7, 8, 9], [1, 1, 1, 7, 7, 1],
                                                                [4, 4, 4, 2, 2, 4])
    assert rounds(np.array([1, 4]), np.array([4, 9]), parts=2)[3] == 2, "a path of three is not a star around 1"
    node, other = star_rounds.both_ways(np.array([1, 1, 1]), np.array([4, 9, 6]))
    assert star_rounds.unsettled(node, other) == 0
    node, other = star_rounds.both_ways(np.array([1, 4]), np.array([4, 9]))
    assert star_rounds.unsettled(node, other) == 1, "4 has a smaller and a larger neighbour"


def test_large_and_small_star_edges_are_the_papers():
    node, other = star_rounds.both_ways(np.array([5, 5, 3]), np.array([8, 9, 5]))
    high, low = star_rounds.large_star(node, other)
    assert sorted(zip(high.tolist(), low.tolist(), strict=True)) == [(5, 3), (8, 3), (9, 3)], \
        "each larger neighbour of a node to the smallest of its neighbourhood"
    first, second = star_rounds.small_star(np.array([9, 9, 7]), np.array([4, 7, 2]))
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(7, 2), (7, 4), (9, 4)], \
        "a node and its smaller neighbours to the smallest of them"
    with pytest.raises(ValueError, match="larger end first"):
        star_rounds.small_star(np.array([2]), np.array([7]))


def test_strongest_pair_follows_the_union_finds_rule():
    rng = np.random.default_rng(3)
    first, second = rng.integers(0, 200, 600), rng.integers(0, 200, 600)
    first, second = first[first != second], second[first != second]
    kind = rng.integers(0, 2, len(first)).astype(np.int8)
    similarity = rng.choice([0.8, 0.9, np.nan], len(first)).astype(np.float32)
    _, _, _, kinds, similarities, others = minhash.component_members(first, second, kind, similarity)
    node, other = star_rounds.both_ways(first, second)
    keys, got_kind, got_similarity, got_other = star_rounds.strongest(node, other, np.tile(kind, 2),
                                                                      np.tile(similarity, 2))
    assert keys.tolist() == sorted(set(first.tolist()) | set(second.tolist()))
    assert got_kind.tolist() == kinds.tolist() and got_other.tolist() == others.tolist()
    assert np.array_equal(got_similarity, similarities, equal_nan=True)
