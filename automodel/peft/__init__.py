"""Parameter-efficient fine-tuning (LoRA) through the `peft` library."""

from automodel.peft.lora import LoraSettings, count_parameters, is_peft_model, linear_module_names

__all__ = ["LoraSettings", "count_parameters", "is_peft_model", "linear_module_names"]
