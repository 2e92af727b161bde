"""The embedding model's plan and handler: made on the driver (an export made there, once), loaded once per
worker. The embed stage runs it over every record; prune's two-tier SemDeDup over its candidates' rows."""

from __future__ import annotations

from dataclasses import dataclass

from winnow.pipelines.config import EmbedConfig
from winnow.pipelines.engine.model_stage import ModelHandler
from winnow.selectors import backends, embedding


@dataclass(frozen=True)
class EmbedPlan:
    """What the driver decided about the embed stage, recorded in the manifest."""

    model: str
    model_path: str
    fingerprint: str
    device: str
    torch_threads: int
    batch_size: int
    window: int
    max_seq_length: int | None
    backend: str = "torch"
    precision: str = "fp32"
    model_folder: str = ""  # what the backend loads: the model folder (torch), or its export
    reuse_from: tuple[str, ...] | None = None
    expected_records: int | None = None

    @classmethod
    def from_config(cls, config: EmbedConfig, workers: int, reuse_from: tuple[str, ...] | None = None) -> EmbedPlan:
        """Made on the driver: an ONNX export or a static distillation is made here, once, never per worker."""
        path = embedding.resolve_model_path(config.model)
        fingerprint = embedding.model_fingerprint(path)
        device = embedding.choose_device(config.device, "embed.device") if config.backend == "torch" else "cpu"
        folder = backends.ensure_export(path, fingerprint, config.backend, config.precision,
                                        config.export_dir)
        return cls(
            model=config.model,
            model_path=str(path),
            fingerprint=fingerprint,
            device=device,
            torch_threads=embedding.threads_per_worker(config.torch_threads, workers),
            batch_size=config.batch_size,
            window=config.window,
            max_seq_length=config.max_seq_length,
            backend=config.backend,
            precision=config.precision,
            model_folder=str(folder),
            reuse_from=reuse_from,
        )


class EmbedHandler(ModelHandler):
    """The sentence-transformers model, as model_stage loads and shares it."""

    namespace, counter, label, unit = "winnow.embed", "texts_embedded", "embed", "texts"

    def __init__(self, plan: EmbedPlan):
        super().__init__(plan.torch_threads)
        self.plan = plan

    def tag(self) -> str:
        plan = self.plan
        return f"{plan.fingerprint}:{plan.backend}:{plan.precision}:{plan.device}:{plan.max_seq_length}"

    def load(self):
        plan = self.plan
        return backends.load_encoder(plan.backend, plan.model_folder, plan.device,
                                     plan.max_seq_length, plan.torch_threads or embedding.worker_threads())
