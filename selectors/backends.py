"""Embedding backends: the same sentence-transformers model run by torch, by ONNX Runtime (fp32 or dynamically
quantised int8), by OpenVINO (fp32, or int8 quantised by NNCF on a packaged calibration set), or distilled into a
static model (model2vec). Beam-free.

An ONNX or OpenVINO export or a static distillation is made once from the configured local model folder, with
no download, and kept in an export directory under the source model's fingerprint and the backend and precision
(`BACKEND-PRECISION-FINGERPRINT/`), written to a temporary folder and renamed into place, so a second process
finds it whole or not at all. Every encoder returns unit float32 rows and sorts its texts by length before
cutting batches (less padding), like sentence-transformers does.

Measured (docs/NOTES.md, `make bench-backends`): int8 pays only on CPUs with VNNI or AMX instructions (about 1.1x
torch on an AVX2-only machine; OpenVINO int8 about 3x on an AVX512-VNNI one), OpenVINO fp32 is the fastest
runtime of the same vectors, the static model hundreds of times faster at a large quality cost. Threads: ONNX
Runtime and OpenVINO start one thread per core unless told; `threads` is set per worker so that workers x
threads = cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from winnow.selectors.embedding import encode, l2_normalise, load_model

BACKENDS = ("torch", "onnx", "openvino", "static")
PRECISIONS = ("fp32", "int8")
STATIC_DIMS = 256
_ONNX_FILE = "model.onnx"
_OPENVINO_FILE = "openvino_model.xml"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# OpenVINO int8's activation ranges are calibrated on these texts (150 Debian package descriptions and 150
# documentation paragraphs, none among the rows the benchmarks measure). Its digest is part of the export's name,
# so a changed set is a new export, and of this module's source, so it is in every stage's code hash.
CALIBRATION_FILE = Path(__file__).with_name("calibration.jsonl")
CALIBRATION_SHA256 = "dbbe4bec576fde9a0cd29081796669765e0b05b30915653f2ea202dd7279b77f"


class ExportFailed(ValueError):
    """The configured model folder could not be exported to the requested backend."""


def default_export_dir() -> Path:
    """Where exports live unless configured: the user's cache folder, shared by every output on the machine."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "winnow" / "models"


def export_path(export_dir: str | Path, fingerprint: str, backend: str, precision: str) -> Path:
    calibrated = f"-c{CALIBRATION_SHA256[:8]}" if (backend, precision) == ("openvino", "int8") else ""
    return Path(export_dir).expanduser() / f"{backend}-{precision}-{fingerprint[:24]}{calibrated}"


def check_choice(backend: str, precision: str) -> None:
    """A static model has one precision of its own; torch runs the model as it is (fp32)."""
    if backend not in BACKENDS:
        raise ValueError(f"embed.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"embed.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and backend not in ("onnx", "openvino"):
        raise ValueError(f"embed.precision: int8 needs embed.backend onnx or openvino (not {backend})")


def calibration_texts() -> list[str]:
    """The packaged calibration set, refused when it is not the one the export names record."""
    data = CALIBRATION_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != CALIBRATION_SHA256:
        raise ExportFailed(f"{CALIBRATION_FILE} is not the calibration set this version of winnow was made with")
    return [json.loads(line)["text"] for line in data.decode().splitlines()]


def ensure_export(model_path: str | Path, fingerprint: str, backend: str, precision: str,
                  export_dir: str | Path | None = None) -> Path:
    """The folder the backend loads: the model folder itself for torch, else its export (made when absent) in
    `export_dir` (None: `default_export_dir()`)."""
    check_choice(backend, precision)
    if backend == "torch":
        return Path(model_path)
    target = export_path(export_dir or default_export_dir(), fingerprint, backend, precision)
    if (target / "winnow-export.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if backend == "onnx":
            _export_onnx(Path(model_path), temporary, precision)
        elif backend == "openvino":
            _export_openvino(Path(model_path), temporary, precision)
        else:
            _distill_static(Path(model_path), temporary)
        (temporary / "winnow-export.json").write_text(json.dumps(
            {"source": str(model_path), "fingerprint": fingerprint, "backend": backend, "precision": precision}))
        try:
            temporary.rename(target)
        except OSError:  # another process finished the same export first
            if not (target / "winnow-export.json").exists():
                raise
    except Exception as error:  # noqa: BLE001 - any failure of the exporters is the model folder's
        raise ExportFailed(f"embed.backend: {backend} {precision}: cannot export {model_path}: "
                           f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def _sentence_graph(model):
    """The whole sentence-transformers pipeline (transformer, pooling, dense, normalise) as one module to trace,
    so that any pooling the model folder declares is exported with it."""
    import torch

    class SentenceGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            features = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(features)["sentence_embedding"]

    return SentenceGraph().eval()


def _export_onnx(model_path: Path, target: Path, precision: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
    model.tokenizer.save_pretrained(str(target))
    (target / "winnow-settings.json").write_text(json.dumps({"max_seq_length": model.max_seq_length}))
    sample = torch.ones(2, 8, dtype=torch.long)
    raw = target / "raw.onnx"
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUTS} | {"sentence_embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the model's Python branches, fixed by the trace
        torch.onnx.export(_sentence_graph(model), (sample, sample, torch.zeros_like(sample)), str(raw),
                          input_names=list(_INPUTS), output_names=["sentence_embedding"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    if precision == "fp32":
        raw.rename(target / _ONNX_FILE)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weights with a reduced range: without VNNI, u8 x s8 products saturate in 16 bits; measured
    # here, plain int8 weights kept a mean cosine of only 0.86 to fp32, these 0.99.
    quantize_dynamic(str(raw), str(target / _ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=True, extra_options={"DefaultTensorType": 1})
    raw.unlink()


def _export_openvino(model_path: Path, target: Path, precision: str) -> None:
    """The fp32 ONNX export converted to OpenVINO's format (its weights kept in fp32, not compressed to fp16); for
    int8, quantised by NNCF's post-training quantisation (weights and activations of the MatMuls, the transformer
    preset), its activation ranges measured on the calibration set fed one text at a time (no padding tokens)."""
    import openvino

    _export_onnx(model_path, target, "fp32")
    onnx_file = target / _ONNX_FILE
    model = openvino.Core().read_model(str(onnx_file))
    if precision == "int8":
        import nncf

        feeds = _GraphEncoder(target, None).feeds(calibration_texts(), batch_size=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(feeds))
    openvino.save_model(model, str(target / _OPENVINO_FILE), compress_to_fp16=False)
    onnx_file.unlink()


def _distill_static(model_path: Path, target: Path) -> None:
    from model2vec.distill import distill_from_model
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    distill_from_model(model=model, tokenizer=tokenizer, pca_dims=STATIC_DIMS).save_pretrained(str(target))


def _length_order(texts: Sequence[str]) -> np.ndarray:
    return np.argsort(np.fromiter((len(text) for text in texts), dtype=np.int64, count=len(texts)),
                      kind="stable")


class _GraphEncoder:
    """An exported graph fed length-ordered, padded batches of the model's own tokenizer; subclasses run it."""

    def __init__(self, folder: Path, max_seq_length: int | None):
        from transformers import AutoTokenizer

        settings = json.loads((folder / "winnow-settings.json").read_text())
        self.max_length = max_seq_length or settings["max_seq_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.inputs: list[str] = []

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def feed(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """One padded batch as the graph's inputs (a model without token types gets zeros)."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        return {name: batch[name].astype(np.int64) if name in batch else
                np.zeros_like(batch["input_ids"], dtype=np.int64) for name in self.inputs or _INPUTS}

    def feeds(self, texts: Sequence[str], batch_size: int) -> list[dict[str, np.ndarray]]:
        return [self.feed(texts[start:start + batch_size]) for start in range(0, len(texts), batch_size)]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit rows in input order. The batches are cut from the shortest text and run longest first, as
        sentence-transformers runs them, so the runtime sizes its buffers once: rising lengths made OpenVINO's
        CPU plugin grow them batch after batch (the same 125 batch shapes: 1.94 GiB rising, 1.08 GiB falling;
        docs/NOTES.md). The batches are the same either way, and so are the vectors."""
        texts = list(texts)
        order = _length_order(texts)
        out: np.ndarray | None = None
        for start in reversed(range(0, len(texts), batch_size)):
            rows = order[start:start + batch_size]
            vectors = self.run(self.feed([texts[row] for row in rows]))
            if out is None:
                out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return l2_normalise(out if out is not None else np.zeros((0, 0), np.float32))


class OnnxEncoder(_GraphEncoder):
    """An exported model run by ONNX Runtime on the CPU with a fixed number of threads."""

    def __init__(self, folder: Path, threads: int, max_seq_length: int | None = None):
        import onnxruntime

        super().__init__(folder, max_seq_length)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(folder / _ONNX_FILE), options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = [node.name for node in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feed)[0]


class OpenvinoEncoder(_GraphEncoder):
    """An exported model run by OpenVINO on the CPU: a fixed number of threads, one stream, and f32 inference
    (on CPUs with bf16 or AMX units OpenVINO would otherwise run in bf16 and change the vectors)."""

    def __init__(self, folder: Path, threads: int, max_seq_length: int | None = None):
        import openvino

        super().__init__(folder, max_seq_length)
        compiled = openvino.Core().compile_model(
            str(folder / _OPENVINO_FILE), "CPU",
            {"INFERENCE_NUM_THREADS": max(1, threads), "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32",
             "PERFORMANCE_HINT": "LATENCY"})
        self.request = compiled.create_infer_request()
        self.output = compiled.outputs[0]
        self.inputs = [port.get_any_name() for port in compiled.inputs]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.array(self.request.infer(feed)[self.output], dtype=np.float32)


class StaticEncoder:
    """A distilled static model (model2vec): a token's vector looked up, a text's vectors averaged."""

    def __init__(self, folder: Path, max_seq_length: int | None = None):
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(str(folder))
        self.max_length = max_seq_length or 512

    def encode(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        vectors = self.model.encode(list(texts), show_progress_bar=False, max_length=self.max_length,
                                    batch_size=max(batch_size, 1024), use_multiprocessing=False)
        return l2_normalise(vectors)


class TorchEncoder:
    """The model folder run by sentence-transformers (the reference every other backend is measured against)."""

    def __init__(self, folder: Path, device: str = "cpu", max_seq_length: int | None = None):
        self.model = load_model(folder, device, max_seq_length)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return encode(self.model, texts, batch_size)


def load_encoder(backend: str, folder: str | Path, device: str = "cpu", max_seq_length: int | None = None,
                 threads: int = 1):
    """The encoder of `backend` over the folder `ensure_export` returned."""
    folder = Path(folder)
    if backend == "torch":
        return TorchEncoder(folder, device, max_seq_length)
    if backend == "onnx":
        return OnnxEncoder(folder, threads, max_seq_length)
    if backend == "openvino":
        return OpenvinoEncoder(folder, threads, max_seq_length)
    if backend == "static":
        return StaticEncoder(folder, max_seq_length)
    raise ValueError(f"embed.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
