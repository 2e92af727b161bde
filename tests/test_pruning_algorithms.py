"""k-means, SemDeDup and DBP quotas, without Beam: hand-computed cases and a QP solver as the reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from winnow.selectors import clustering, dbp
from winnow.selectors.semdedup import hardness_order, near_pairs, resolve_pairs, semdedup


def unit(*rows):
    matrix = np.array(rows, dtype=np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def angle_vectors(degrees):
    radians = np.radians(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_semdedup_is_not_transitive_as_published():
    # a-b and b-c are 20 degrees apart (cos 0.940), a-c 40 degrees (cos 0.766); threshold 1 - eps = 0.9
    a_b_c = angle_vectors([0, 20, 40])
    keep, duplicate_of, similarity = semdedup(a_b_c, np.array([0, 1, 2]), eps=0.1)
    assert keep.tolist() == [True, False, False], "c is dropped for b although b itself was dropped"
    assert duplicate_of.tolist() == [-1, 0, 1]
    np.testing.assert_allclose(similarity[1:], [np.cos(np.radians(20))] * 2, rtol=1e-6)


def test_semdedup_order_decides_the_survivor():
    vectors = angle_vectors([0, 20, 40])
    keep, duplicate_of, _ = semdedup(vectors, np.array([2, 1, 0]), eps=0.1)
    assert keep.tolist() == [False, False, True]
    assert duplicate_of.tolist() == [1, 2, -1]


def test_semdedup_strict_and_non_strict_threshold():
    vectors = angle_vectors([0, 60])  # cos exactly 0.5 in float32
    assert semdedup(vectors, np.array([0, 1]), eps=0.5, strict=True)[0].tolist() == [True, True]
    assert semdedup(vectors, np.array([0, 1]), eps=0.5, strict=False)[0].tolist() == [True, False]


def test_semdedup_blocks_compare_every_pair():
    rng = np.random.default_rng(3)
    base = unit(*rng.normal(size=(40, 8)))
    vectors = np.concatenate([base, base[:15] + rng.normal(scale=0.02, size=(15, 8)).astype(np.float32)])
    vectors = unit(*vectors)
    order = rng.permutation(len(vectors))
    reference = semdedup(vectors, order, eps=0.05, block=len(vectors))
    for block in (1, 3, 7, 16):
        blocked = semdedup(vectors, order, eps=0.05, block=block)
        np.testing.assert_array_equal(blocked[0], reference[0])
        np.testing.assert_array_equal(blocked[1], reference[1])
    brute = vectors[order] @ vectors[order].T
    expected_drop = [(brute[:j, j] > 0.95).any() for j in range(len(order))]
    assert reference[0][order].tolist() == [not d for d in expected_drop]
    assert (~reference[0]).sum() >= 15


def test_singleton_cluster_keeps_its_member():
    keep, duplicate_of, _ = semdedup(unit([1.0, 2.0]), np.array([0]), eps=0.5)
    assert keep.tolist() == [True] and duplicate_of.tolist() == [-1]


def test_hardness_orders():
    dist = np.array([0.2, 0.5, 0.1, 0.5])
    assert hardness_order(dist, "hard").tolist() == [1, 3, 0, 2]
    assert hardness_order(dist, "easy").tolist() == [2, 0, 1, 3]
    assert sorted(hardness_order(dist, "random", seed=1).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        hardness_order(dist, "hardest")


def test_kmeans_is_deterministic_and_assignment_is_nearest():
    rng = np.random.default_rng(0)
    vectors = unit(*rng.normal(size=(600, 16)))
    first = clustering.fit_centroids(vectors, 12, niter=20, seed=5)
    second = clustering.fit_centroids(vectors, 12, niter=20, seed=5)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    labels, dist = clustering.assign(vectors, first)
    similarity = vectors @ first.T
    np.testing.assert_array_equal(labels, similarity.argmax(axis=1))
    np.testing.assert_allclose(dist, 1 - similarity.max(axis=1), atol=1e-5)
    assert clustering.default_k(10_000) == 100
    assert clustering.fit_centroids(vectors[:3], 10, niter=5).shape == (3, 16)


def test_inter_and_intra_distances_and_complexity():
    centroids = angle_vectors([0, 90, 180])
    np.testing.assert_allclose(dbp.inter_distance(centroids, neighbours=1), [1.0, 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(dbp.inter_distance(centroids, neighbours=20), [1.5, 1.0, 1.5], atol=1e-6)
    np.testing.assert_allclose(dbp.intra_distance(np.array([2, 4, 0]), np.array([0.5, 0.4, 0.0]))[:2], [0.25, 0.1])
    values = dbp.complexity(np.array([0.2, 0.1, 0.3, 0.4]), np.array([1.0, 2.0, 1.0, 1.0]), np.array([5, 5, 2, 1]))
    np.testing.assert_allclose(values, [0.2, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(dbp.softmax(np.array([0.0, np.log(2) * 0.5])), [1 / 3, 2 / 3])


def test_quota_hand_example_with_a_cluster_smaller_than_its_share():
    sizes = np.array([2, 50, 50])
    quotas, exact = dbp.dbp_quotas(sizes, np.array([0.6, 0.2, 0.2]), total_budget=20, min_frac=0.0)
    # N P = [12, 4, 4]; the first cluster is pinned at 2 and its surplus 10 is shared equally: [2, 9, 9]
    np.testing.assert_allclose(exact, [2, 9, 9], atol=1e-9)
    assert quotas.tolist() == [2, 9, 9]


def qp_reference(target, lower, upper, total):
    """scipy's trust-region QP on the same problem, as an independent reference."""
    from scipy.optimize import Bounds, LinearConstraint

    result = minimize(
        lambda x: ((x - target) ** 2).sum(), np.full(len(target), total / len(target)),
        jac=lambda x: 2 * (x - target), hess=lambda x: 2 * np.eye(len(x)),
        bounds=Bounds(lower, upper), constraints=[LinearConstraint(np.ones((1, len(target))), total, total)],
        method="trust-constr", options={"gtol": 1e-10, "xtol": 1e-12, "maxiter": 5000},
    )
    assert result.status in (1, 2)
    return result.x


@pytest.mark.parametrize("seed", range(8))
def test_quotas_equal_a_qp_solver_and_round_to_the_budget(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 25))
    sizes = rng.integers(1, 200, size=k)
    sizes[rng.integers(0, k)] = 1
    probabilities = dbp.softmax(rng.normal(size=k), tau=0.5)
    total_budget = dbp.budget(float(rng.uniform(0.1, 0.9)), int(sizes.sum()))
    quotas, exact = dbp.dbp_quotas(sizes, probabilities, total_budget)
    lower = dbp.lower_bounds(sizes, total_budget)
    reference = qp_reference(total_budget * probabilities, lower.astype(float), sizes.astype(float), total_budget)
    np.testing.assert_allclose(exact, reference, atol=1e-4)
    assert quotas.sum() == total_budget
    assert (quotas >= lower).all() and (quotas <= sizes).all()
    assert (np.abs(quotas - exact) < 1).all()


def test_ssp_and_random_baselines():
    sizes = np.array([10, 20, 30])
    assert dbp.ssp_quotas(sizes, 30).tolist() == [5, 10, 15]
    assert dbp.ssp_quotas(sizes, 31).sum() == 31
    keep = dbp.random_keep(100, 30, seed=4)
    assert keep.sum() == 30
    np.testing.assert_array_equal(keep, dbp.random_keep(100, 30, seed=4))
    assert dbp.budget(0.3, 5501) == 1650
    with pytest.raises(ValueError):
        dbp.budget(1.5, 10)


def test_semdedup_pairs_resolved_in_any_order_equal_semdedup():
    """The prune stage caches the order-independent pairs and resolves them per `prune.keep` order."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        count = int(rng.integers(1, 50))
        base = rng.normal(size=(4, 8))
        vectors = base[rng.integers(0, 4, count)] + rng.normal(size=(count, 8)) * rng.choice([0.02, 0.1, 0.3])
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        for keep in ("hard", "easy", "random"):
            order = hardness_order(rng.random(count), keep, seed=trial)
            for strict in (True, False):
                reference = semdedup(vectors, order, 0.1, strict)
                resolved = resolve_pairs(count, order, *near_pairs(vectors, 0.1, strict, block=7))
                assert (resolved[0] == reference[0]).all()
                dropped = ~reference[0]
                assert (resolved[1][dropped] == reference[1][dropped]).all()
                np.testing.assert_allclose(resolved[2][dropped], reference[2][dropped], atol=1e-6)


def test_the_random_strategy_is_a_uniform_sample_whatever_keep_says():
    """Issue 16: `strategy: random` with `keep: hard` kept the hardest records of each cluster. Now the kept
    set's distances to their centroids follow the pool's (two-sample KS test), while `ssp` with `keep: hard`
    keeps the far end of each cluster."""
    from scipy.stats import ks_2samp

    from winnow.selectors.pruning import PruneSettings, prune_pool

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(3000, 16)) + 2 * rng.normal(size=(12, 16))[rng.integers(0, 12, 3000)]
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    results = {}
    for strategy in ("random", "ssp"):
        settings = PruneSettings(strategy=strategy, keep="hard", keep_fraction=0.3, k=12, niter=20, semdedup=False)
        result = prune_pool(vectors, settings)
        results[strategy] = ks_2samp(result["dist"][result["kept"]], result["dist"]).pvalue
        assert result["kept"].sum() == 900
    assert results["random"] > 0.05, "the random strategy's kept set is distributed as the pool"
    assert results["ssp"] < 1e-6, "the hardness order keeps the far end of each cluster"
