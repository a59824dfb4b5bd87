"""Write a smaller student for knowledge distillation: a copy of a model folder that keeps every `--every`-th decoder
layer (and the embeddings, final norm and head), with the same tokenizer.

    python scripts/derive_student.py TEACHER_FOLDER --output STUDENT_FOLDER [--every 2]

Works on transformers folders whose decoder layers are stored as `model.layers.<i>.` (Llama, Mistral, Qwen, ...),
in one or several safetensors files. Used by benchmarks/kd_squad.py (docs/guides/llm/kd.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def derive_student(teacher: Path, output: Path, every: int) -> list[int]:
    """Write the student; returns the teacher layer indices it keeps (0, every, 2 x every, ...)."""
    config = json.loads((teacher / "config.json").read_text())
    kept = list(range(0, config["num_hidden_layers"], every))
    renumber = {old: new for new, old in enumerate(kept)}
    tensors = {}
    for file in sorted(teacher.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                match = LAYER.match(name)
                if match is None:
                    tensors[name] = handle.get_tensor(name)
                elif int(match[1]) in renumber:
                    tensors[f"model.layers.{renumber[int(match[1])]}.{match[2]}"] = handle.get_tensor(name)
    if not tensors:
        raise SystemExit(f"error: {teacher} holds no safetensors weights")
    config["num_hidden_layers"] = len(kept)
    for key in ("layer_types",):  # per-layer lists follow the kept layers
        if isinstance(config.get(key), list):
            config[key] = [config[key][i] for i in kept]
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "model.safetensors"), metadata={"format": "pt"})
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy(teacher / name, output / name)
    return kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path, help="a transformers model folder (safetensors)")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--every", type=int, default=2, help="keep layers 0, N, 2N, ... (default 2)")
    args = parser.parse_args(argv)
    kept = derive_student(args.teacher, args.output, args.every)
    print(f"student written to {args.output}: {len(kept)} decoder layers (teacher layers {kept})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
