"""Reading a published config.json field by field, so that a field we do not translate stops the load.

A remote-code family's config carries its own field names. Each translator (automodel/models/families/configs.py)
takes the fields it understands; whatever is left must be in HARMLESS (bookkeeping that does not change the math),
otherwise the load fails with one line naming the field: never a silent fallback to a different model.
"""

from __future__ import annotations

from typing import Any

from automodel.errors import UserError

# Fields that say nothing about the math of the forward pass.
HARMLESS = frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path", "tokenizer_class",
    "pretraining_tp", "model_max_length", "gradient_checkpointing", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "is_decoder", "use_return_dict", "_attn_implementation",
    "attn_implementation",
    "use_flash_attn", "use_flash_attention_2", "_flash_attn_2_enabled", "max_sequence_length", "max_length",
    "unk_token_id", "sep_token_id", "user_token_id", "assistant_token_id", "generation_config", "quantization_config",
})


class PublishedFields:
    """The fields of one published config.json, consumed one by one."""

    def __init__(self, config: dict[str, Any], source: str):
        self.config, self.source, self.used = config, source, set()

    def where(self, name: str) -> str:
        return f"{self.source}: config.json field '{name}'"

    def take(self, name: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.config:
            if required:
                raise UserError(f"{self.where(name)} is missing; a {self.config.get('model_type')} config needs it")
            return default
        return self.config[name]

    def expect(self, name: str, allowed: tuple, default: Any = None) -> Any:
        """A field whose other values select math we do not implement."""
        value = self.take(name, default)
        if value not in allowed:
            raise UserError(f"{self.where(name)} = {value!r} is not supported (expected one of "
                            f"{', '.join(map(repr, allowed))})")
        return value

    def finish(self) -> None:
        """Fails on the first field nobody took that may change the model."""
        for name, value in self.config.items():
            if name not in self.used and name not in HARMLESS and value is not None:
                raise UserError(f"{self.where(name)} = {value!r} is not supported: automodel reads "
                                f"{self.config.get('model_type')} checkpoints without it")
