"""Generator backends behind one small interface: `generate(prompts, params) -> [Generation]`.

transformers (default): batched `model.generate` with left padding, prompts sorted by length inside a call so
padding stays small, sampling as configured. vLLM: used when it is installed and a GPU is present (or when
asked for); it batches on its own. Both report, per prompt, the text, whether the model ended its answer
(end-of-sequence before max_new_tokens) and how many tokens it generated.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 0.5
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class Generation:
    text: str
    finished: bool
    new_tokens: int


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    if requested == "auto":
        return "vllm" if vllm_available() else "transformers"
    if requested == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("rephrase.backend vllm: the vllm package is not installed")
    return requested


def _batch_seed(seed: int, prompts: Sequence[str]) -> int:
    """A seed from the configured one and the batch's prompts: the same batch samples the same way on rerun."""
    digest = hashlib.blake2b(f"{seed}".encode(), digest_size=8)
    for prompt in prompts:
        digest.update(prompt.encode())
    return int.from_bytes(digest.digest(), "big") >> 1


class TransformersGenerator:
    name = "transformers"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
        self.model.to(device).eval()
        self.device = device
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        import torch

        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            texts = [prompts[i] for i in batch]
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
                if params.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
            torch.manual_seed(_batch_seed(params.seed, texts))
            with torch.inference_mode():
                output = self.model.generate(
                    **encoded, max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new = output[:, encoded["input_ids"].shape[1] :].tolist()
            for index, tokens in zip(batch, new, strict=True):
                end = next((n for n, token in enumerate(tokens) if token in self.eos_ids), None)
                kept = tokens if end is None else tokens[:end]
                results[index] = Generation(
                    self.tokenizer.decode(kept, skip_special_tokens=True), end is not None, len(kept)
                )
        return results  # type: ignore[return-value]


class VllmGenerator:
    name = "vllm"

    def __init__(self, path: str | Path, device: str = "cuda"):
        from vllm import LLM

        self.llm = LLM(model=str(path), dtype="auto")
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        from vllm import SamplingParams

        sampling = SamplingParams(
            temperature=params.temperature if params.do_sample else 0.0,
            top_p=params.top_p if params.do_sample else 1.0,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
        )
        outputs = self.llm.generate(list(prompts), sampling, use_tqdm=False)
        return [
            Generation(o.outputs[0].text, o.outputs[0].finish_reason == "stop", len(o.outputs[0].token_ids))
            for o in outputs
        ]


def load_generator(backend: str, path: str | Path, device: str = "cpu"):
    return VllmGenerator(path, device) if backend == "vllm" else TransformersGenerator(path, device)
