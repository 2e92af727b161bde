"""Spherical k-means on unit embeddings (faiss) and nearest-centroid assignment (docs/ALGORITHMS.md section 2).

Beam-free. The fit runs on a sample (faiss itself subsamples to 256 x k points); every point is then
assigned to its nearest centroid by inner product, with `dist = 1 - cos(x, centroid)`.
"""

from __future__ import annotations

import math

import numpy as np

from winnow.selectors.threads import one_thread

REFERENCE_NITER = 100
REFERENCE_SEED = 1234


def default_k(n: int) -> int:
    """About sqrt(n) clusters, at least 1 (the reference uses far larger data; k is a parameter)."""
    return max(1, int(round(math.sqrt(max(n, 1)))))


def use_gpu() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def fit_centroids(
    sample: np.ndarray, k: int, niter: int = REFERENCE_NITER, seed: int = REFERENCE_SEED, gpu: bool | None = None
) -> np.ndarray:
    """Unit float32 centroids (k', d) with k' = min(k, len(sample)); deterministic for a seed."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError("k-means needs a non-empty (n, d) sample")
    k = max(1, min(k, len(sample)))
    kmeans = faiss.Kmeans(
        sample.shape[1], k, niter=niter, spherical=True, seed=seed, gpu=use_gpu() if gpu is None else gpu,
        verbose=False, min_points_per_centroid=1,
    )
    with one_thread():
        kmeans.train(sample)
    centroids = kmeans.centroids.astype(np.float32)
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids / np.where(norms > 0, norms, 1)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int64, dist float32 = 1 - cos) of each unit vector's nearest centroid by inner product."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    with one_thread():
        similarity, labels = index.search(vectors, 1)
    return labels[:, 0].astype(np.int64), (1.0 - similarity[:, 0]).astype(np.float32)
