"""automodel: fine-tune Hugging Face causal language models with LoRA or full SFT.

Kept free of heavy imports so that `automodel --help` answers without loading torch.
"""

__version__ = "0.1.0"
