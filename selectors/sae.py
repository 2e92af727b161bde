"""Sparse autoencoders over the selection model's residual stream: training, loading and pooled codes.

Beam-free. SAEs are sae-lens objects saved in sae-lens' own format (`cfg.json` + `sae_weights.safetensors`),
so an SAE trained here and any sae-lens SAE directory a user brings load the same way. winnow records what it
needs to use an SAE correctly (the model's fingerprint and the layer) in the SAE's own metadata.

Codes (docs/ALGORITHMS.md section 3): per token z_t = SAE.encode(h_t); a sample is the MEAN of z_t over its tokens
(position 0 and padding excluded), stored sparsely: a TopK SAE has at most k active features per token, so a
sample has at most k * tokens non-zeros, never a dense d_sae row per sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from winnow.selectors import lm
from winnow.selectors.embedding import ModelNotFound, model_fingerprint

TOKENS_PER_ENCODE = 2048
SAMPLES_PER_CHUNK = 256


@dataclass(frozen=True)
class SparseCodes:
    """Rows of non-negative codes in CSR form: row i has features indices[indptr[i]:indptr[i+1]] (ascending)
    with the matching values."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    dim: int

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[i], self.indptr[i + 1]
        return self.indices[start:end], self.values[start:end]

    def row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))

    def take(self, rows: Sequence[int]) -> SparseCodes:
        return SparseCodes.from_rows([self.row(i) for i in rows], self.dim)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros((len(self), self.dim), dtype=np.float32)
        dense[self.row_ids(), self.indices] = self.values
        return dense

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[np.ndarray, np.ndarray]], dim: int) -> SparseCodes:
        sizes = np.array([len(indices) for indices, _ in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if rows:
            indices = np.concatenate([np.asarray(i, dtype=np.int32) for i, _ in rows])
            values = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in rows])
        else:
            indices, values = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return cls(indptr, indices, values, dim)

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> SparseCodes:
        dense = np.asarray(dense, dtype=np.float32)
        rows, cols = np.nonzero(dense)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[0]))]).astype(np.int64)
        return cls(indptr, cols.astype(np.int32), dense[rows, cols], dense.shape[1])


def load_sae(path: str | Path, device: str = "cpu"):
    """Any sae-lens SAE directory (cfg.json + weights), in eval mode."""
    from sae_lens import SAE

    path = Path(path).expanduser()
    if not (path / "cfg.json").is_file():
        raise ModelNotFound(f"{path}: not an SAE directory (sae-lens format: cfg.json + sae_weights.safetensors)")
    sae = SAE.load_from_disk(str(path), device=device)
    sae.eval()
    return sae


def sae_fingerprint(path: str | Path) -> str:
    return model_fingerprint(Path(path).expanduser())


def sae_layer(sae) -> int | None:
    """The layer an SAE was trained on, when its metadata says (winnow's own or a `blocks.N.` hook name)."""
    metadata = sae.cfg.metadata
    if metadata["winnow_layer"] is not None:
        return int(metadata["winnow_layer"])
    hook = metadata["hook_name"] or ""
    parts = hook.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit() and hook.endswith("hook_resid_post"):
        return int(parts[1]) + 1
    return None


def mean_codes(sae, tokens, sample_of_token, samples: int) -> SparseCodes:
    """Mean SAE code per sample: `tokens` (n, d_in) activations, `sample_of_token` (n,) their sample index,
    ascending (each sample's tokens together).

    Samples are handled SAMPLES_PER_CHUNK at a time and their tokens encoded TOKENS_PER_ENCODE at a time, so no
    dense block is larger than (SAMPLES_PER_CHUNK, d_sae) or (TOKENS_PER_ENCODE, d_sae), whatever the pool."""
    import torch

    if isinstance(sample_of_token, torch.Tensor):
        sample_of_token = sample_of_token.cpu()
    owners = np.asarray(sample_of_token, dtype=np.int64)
    if len(owners) and np.any(np.diff(owners) < 0):
        raise ValueError("sample_of_token must be ascending")
    tokens = torch.as_tensor(tokens)
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.inference_mode():
        for first in range(0, samples, SAMPLES_PER_CHUNK):
            last = min(samples, first + SAMPLES_PER_CHUNK)
            lo, hi = np.searchsorted(owners, [first, last])
            chunk = tokens[lo:hi].to(sae.W_enc.device, sae.W_enc.dtype)
            owner = torch.from_numpy(owners[lo:hi] - first).to(chunk.device)
            sums = torch.zeros(last - first, sae.cfg.d_sae, dtype=torch.float32, device=chunk.device)
            for start in range(0, len(chunk), TOKENS_PER_ENCODE):
                codes = sae.encode(chunk[start : start + TOKENS_PER_ENCODE]).float()
                sums.index_add_(0, owner[start : start + TOKENS_PER_ENCODE], codes)
            counts = torch.bincount(owner, minlength=last - first).clamp(min=1).float().unsqueeze(1)
            means = SparseCodes.from_dense((sums / counts).cpu().numpy())
            rows.extend(means.row(i) for i in range(len(means)))
    return SparseCodes.from_rows(rows, int(sae.cfg.d_sae))


def pooled_codes(sae, hidden, mask) -> SparseCodes:
    """Mean SAE code per sample of one batch: `hidden` (batch, tokens, d_in), `mask` (batch, tokens) bool."""
    return mean_codes(sae, hidden[mask], mask.nonzero(as_tuple=True)[0], hidden.shape[0])


def sample_codes(
    model, tokenizer, sae, texts: Sequence[str], layer: int, max_tokens: int = 256, batch_size: int = 16
) -> SparseCodes:
    """Mean-pooled SAE codes of `texts` (input order), batched by token length."""
    import torch

    device = next(model.parameters()).device
    rows: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(texts)
    with torch.inference_mode():
        for batch in lm.batches_by_length(tokenizer, texts, batch_size, max_tokens):
            input_ids, attention_mask = lm.tokenize(tokenizer, [texts[i] for i in batch], max_tokens, device)
            hidden = lm.residual_streams(model, input_ids, attention_mask, [layer])[layer]
            codes = pooled_codes(sae, hidden, lm.token_mask(attention_mask))
            for row, index in enumerate(batch):
                rows[index] = codes.row(row)
    return SparseCodes.from_rows(rows, int(sae.cfg.d_sae))


@dataclass(frozen=True)
class SaeTrainingSettings:
    d_sae: int = 4608
    k: int = 32
    steps: int = 400
    batch_tokens: int = 1024
    lr: float = 4e-3
    seed: int = 0


def _shuffled_batches(activations: np.ndarray, batch_tokens: int, seed: int) -> Iterator:
    """Endless batches over the token activations, reshuffled every pass (seeded)."""
    import torch

    rng = np.random.default_rng(seed)
    data = torch.from_numpy(activations)
    while True:
        order = torch.from_numpy(rng.permutation(len(activations)))
        for start in range(0, len(order) - batch_tokens + 1, batch_tokens):
            yield data[order[start : start + batch_tokens]]
        if len(order) < batch_tokens:
            yield data[order]


def train_sae(activations: np.ndarray, settings: SaeTrainingSettings, metadata: dict | None = None, device="cpu"):
    """A TopK SAE trained with sae-lens' SAETrainer on (tokens, d_in) activations; returns the trained SAE.

    Inputs are normalised to the expected average norm during training (sae-lens folds the factor into the
    weights at the end), so the saved SAE takes raw activations."""
    import torch
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    activations = np.ascontiguousarray(activations, dtype=np.float32)
    if len(activations) == 0:
        raise ValueError("no activations to train an SAE on")
    torch.manual_seed(settings.seed)
    config = TopKTrainingSAEConfig(
        d_in=activations.shape[1], d_sae=settings.d_sae, k=settings.k, device=device,
        normalize_activations="expected_average_only_in",
    )
    for key, value in (metadata or {}).items():
        config.metadata[key] = value
    sae = TopKTrainingSAE(config)
    batch_tokens = min(settings.batch_tokens, len(activations))
    trainer_config = SAETrainerConfig(
        total_training_samples=settings.steps * batch_tokens, train_batch_size_samples=batch_tokens,
        lr=settings.lr, lr_end=settings.lr, lr_scheduler_name="constant", device=device,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=min(100, settings.steps),
    )
    trainer = SAETrainer(trainer_config, sae, _shuffled_batches(activations, batch_tokens, settings.seed))
    return trainer.fit()


def save_sae(sae, path: str | Path) -> Path:
    """sae-lens' inference format (a training SAE saves its inference version), written aside and renamed."""
    import shutil
    import uuid

    path = Path(path).expanduser()
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    save = getattr(sae, "save_inference_model", None) or sae.save_model
    save(staging)
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return path
