"""Text generation with a base model, a full fine-tune or base + LoRA adapter, batched, greedy by default.

    from automodel.inference import Generator, GenerationSettings
    gen = Generator.load("checkpoints/stories260K_squad_peft")          # checkpoint_dir, step folder, model, hub id
    gen.generate(["Once upon a time"], GenerationSettings(max_new_tokens=20))
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from automodel.config.precision import resolve_precision
from automodel.config.switches import check_saved_config
from automodel.errors import UserError
from automodel.inference.sources import ModelSource, resolve_source
from automodel.models import load_causal_lm, load_tokenizer

logger = logging.getLogger("automodel")

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


@dataclass
class GenerationSettings:
    """How to decode. `temperature` 0 means greedy; generation stops at EOS or after `max_new_tokens`."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


def load_model_and_tokenizer(source: ModelSource, dtype: str | None = None, trust_remote_code: bool = False,
                             device: str | torch.device | None = None):
    """The model (base, with the adapter attached when there is one) in eval mode, and its tokenizer. `dtype`
    defaults to the compute dtype of the training run's precision on this device (config/precision.py: bf16 where
    the device computes it natively unless the run said fp32)."""
    # A saved config.yaml's model.trust_remote_code counts only with the person's --trust-remote-code.
    check_saved_config(source.train_config, source.saved_config, trust_remote_code)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or resolve_precision(source.train_config or {}, device, peft=source.adapter is not None).compute_dtype
    model = load_causal_lm(source.base, dtype=dtype, trust_remote_code=trust_remote_code, gguf_file=source.gguf_file)
    if source.adapter is not None:
        from peft import LoraConfig, PeftConfig, PeftModel

        from automodel.peft.fused_lora import register_fused_lora

        config = PeftConfig.from_pretrained(str(source.adapter))
        if isinstance(config, LoraConfig):  # bf16 generation keeps the adapter's update (peft/fused_lora.py)
            register_fused_lora(config)
        model = PeftModel.from_pretrained(model, str(source.adapter), config=config)
    if _has_tokenizer(source.adapter):
        tokenizer = load_tokenizer(str(source.adapter), trust_remote_code=trust_remote_code, key="model")
    else:
        tokenizer = load_tokenizer(source.base, trust_remote_code=trust_remote_code, key="model",
                                   **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    return model.to(device).eval(), tokenizer


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


class Generator:
    """A loaded model + tokenizer that turns prompts into completions (the new text only)."""

    def __init__(self, model, tokenizer, source: ModelSource | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        # Left padding keeps every prompt's last token at the end, where generation continues.
        self.tokenizer.padding_side = "left"

    @classmethod
    def load(cls, model: str, adapter: str | None = None, dtype: str | None = None, trust_remote_code: bool = False,
             device: str | None = None) -> Generator:
        source = resolve_source(model, adapter)
        logger.info("loading %s", source.describe())
        return cls(*load_model_and_tokenizer(source, dtype, trust_remote_code, device), source=source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], settings: GenerationSettings | None = None, streamer=None) -> list[str]:
        """Completions for `prompts`, in order, `settings.batch_size` at a time."""
        return [text for text, _ in self.complete(prompts, settings, streamer)]

    @torch.no_grad()
    def complete(self, prompts: list[str], settings: GenerationSettings | None = None,
                 streamer=None) -> list[tuple[str, bool]]:
        """(completion, whether it ended with EOS) for `prompts`, in order; False means it ran to max_new_tokens."""
        settings = settings or GenerationSettings()
        if settings.temperature > 0:  # greedy needs no seed, and must not reset a training run's random state
            torch.manual_seed(settings.seed)
        completions = []
        for start in range(0, len(prompts), settings.batch_size):
            completions += self._generate_batch(prompts[start:start + settings.batch_size], settings, streamer)
        return completions

    def _generate_batch(self, prompts: list[str], settings: GenerationSettings, streamer) -> list[tuple[str, bool]]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        max_new_tokens = self._room(batch["input_ids"].shape[1], settings.max_new_tokens)
        # use_cache: checkpoints saved by training carry use_cache=false (no KV cache while training); without
        # the cache every new token would recompute the whole prompt.
        output = self.model.generate(
            **batch, max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, streamer=streamer, use_cache=True, **settings.generate_kwargs())
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        ended = (new_tokens == self.tokenizer.eos_token_id).any(dim=1).tolist()
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [(text.strip(), stopped) for text, stopped in zip(texts, ended)]

    def _room(self, prompt_length: int, wanted: int) -> int:
        """New tokens that still fit the model's context (positions past it were never trained); at least one."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        return wanted if limit is None else max(1, min(wanted, limit - prompt_length))

    def stream(self, prompt: str, settings: GenerationSettings | None = None) -> str:
        """Generate for one prompt, printing tokens to stdout as they come; returns the completion."""
        from transformers import TextStreamer

        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.generate([prompt], settings, streamer=streamer)[0]


# ---------------------------------------------------------------- prompt files


def read_prompts(path: str, template: str | None = None) -> list[dict[str, Any]]:
    """Prompts from a file: `.jsonl` rows ({"prompt": ...}, a string, or fields for `template`), else one per line.

    Returns `{"prompt": str, **row}` records so callers can keep ids and fields next to the completions.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file not found: {path}")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        return [{"prompt": fill(template, {"text": line}, file, n) if template else line}
                for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{file} line {number} is not valid JSON: {err}") from None
        records.append(_prompt_record(row, template, file, number))
    return records


def _prompt_record(row: Any, template: str | None, file: Path, number: int) -> dict[str, Any]:
    if isinstance(row, str):
        return {"prompt": row}
    if not isinstance(row, dict):
        raise UserError(f"{file} line {number}: expected a string or an object, got {type(row).__name__}")
    if template is not None:
        return {**row, "prompt": fill(template, row, file, number)}
    if not isinstance(row.get("prompt"), str):
        raise UserError(f"{file} line {number}: no 'prompt' string; add one or pass --template with this row's fields "
                        f"({', '.join(row)})")
    return row


def fill(template: str, fields: dict[str, Any], file: Path, number: int) -> str:
    try:
        return template.format(**fields)
    except KeyError as err:
        raise UserError(f"{file} line {number}: the template needs field {err}, the row has: {', '.join(fields)}") \
            from None
