"""After training: generation, SQuAD evaluation, LoRA merging, Hub upload and vLLM serving.

Importing this package loads torch and transformers; the CLI imports its modules only when a command runs.
"""

from automodel.inference.generate import GenerationSettings, Generator, read_prompts
from automodel.inference.merge import merge_lora
from automodel.inference.sources import ModelSource, resolve_source
from automodel.inference.squad_eval import SquadEvalOptions, evaluate_squad, format_summary
from automodel.inference.squad_metrics import normalize_answer, score_one, squad_scores

__all__ = ["GenerationSettings", "Generator", "ModelSource", "SquadEvalOptions", "evaluate_squad", "format_summary",
           "merge_lora", "normalize_answer", "read_prompts", "resolve_source", "score_one", "squad_scores"]
