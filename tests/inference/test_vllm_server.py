"""vLLM serves what we train, token for token: the real vLLM CPU build (scripts/setup_vllm.sh, in .venv-vllm).

One server start covers both kinds of fine-tune: a tiny Llama (head dim 32, as vLLM's CPU attention needs; the
real Llama-2 tokenizer) is fully fine-tuned, then a LoRA adapter is trained on that model, and
`automodel serve --run` serves the full fine-tune as the base with the adapter by its served name. Greedy
completions and chat answers from the server equal `automodel generate`'s (fp32, 16 tokens).

The vLLM venv is built by the test when missing (~13 min on a busy 2-core machine, ~0.5 s when present); the
server takes ~2-5 min to start on 2 busy cores (most of it importing vLLM in its three processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from automodel.cli.main import main
from automodel.errors import UserError
from automodel.inference.sources import resolve_source
from automodel.inference.vllm import DECODER_LINEARS, VLLM_LORA_MODULES, VLLM_LORA_RANKS, prepare_for_vllm
from automodel.inference.vllm_runtime import ask_vllm, find_vllm
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import ASSETS, REPO_ROOT
from tests.distributed_helpers import free_port
from tests.helpers import tiny_squad_config

pytestmark = pytest.mark.slow

PROMPTS = ["Once upon a time", "Question: Which city is the capital of France? Answer:"]
CHAT = [{"role": "user", "content": "Name a river in Africa."}]
# No BOS inside the template: the server is asked to add the tokenizer's special tokens, as `generate` does.
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
NEW_TOKENS = 16
SERVER_START_TIMEOUT = 900


@pytest.fixture(scope="module")
def vllm_install(vllm_python):
    """vLLM's CPU build in .venv-vllm (tests/conftest.py sets it up when missing)."""
    install = find_vllm(str(vllm_python))
    assert install is not None and install.cpu_build
    return install


def tiny_llama(folder: Path) -> Path:
    """A random Llama of head dim 32 with the Llama-2 tokenizer (plus a chat template), saved as a model folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "llama2"))
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fine_tune(root: Path, model: Path, peft: bool, lr: float) -> Path:
    cfg = tiny_squad_config(root, peft=peft, max_steps=4, train_samples=32, global_batch=8, local_batch=8)
    cfg["model"]["pretrained_model_name_or_path"] = str(model)
    cfg["dataset"]["seq_length"] = 160
    cfg.pop("validation_dataset")
    cfg["optimizer"]["lr"] = lr
    FinetuneRecipe(cfg).run()
    return root / "ckpt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(full fine-tune model folder, LoRA checkpoint_dir trained on it)."""
    root = tmp_path_factory.mktemp("vllm_e2e")
    # Small full-SFT steps keep the model talking (bigger ones teach a random model SQuAD's short answers: EOS at
    # once); bigger LoRA steps make the adapter change the completions.
    sft = fine_tune(root / "sft", tiny_llama(root / "base"), peft=False, lr=1e-3) / "step_4" / "model"
    lora = fine_tune(root / "lora", sft, peft=True, lr=1e-2)
    return sft, lora


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def wait_until_up(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"the server did not answer in {SERVER_START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def generate(model: str, prompts: list[str], tmp_path: Path) -> list[str]:
    """`automodel generate`'s greedy completions (fp32, one prompt per batch: no padding)."""
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "completions.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["generate", model, "--prompts-file", str(prompts_file), "--output", str(out), "--max-new-tokens",
                 str(NEW_TOKENS), "--dtype", "float32", "--device", "cpu", "--batch-size", "1"]) == 0
    return [json.loads(line)["completion"] for line in out.read_text().splitlines()]


def test_served_lora_and_full_fine_tune_match_generate(vllm_install, trained, tmp_path):
    sft, lora = trained
    port = free_port()
    log = tmp_path / "server.log"
    started = time.monotonic()
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "automodel", "serve", str(lora), "--output", str(tmp_path / "serve"), "--name",
             "squad-lora", "--run", "--port", str(port), "--dtype", "float32", "--memory-fraction", "0.05",
             "--vllm-python", vllm_install.python, "--vllm-args", "--max-model-len 512"],
            cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_until_up(server, port, log)
        print(f"vLLM server up in {time.monotonic() - started:.0f} s")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as answer:
            served = sorted(m["id"] for m in json.loads(answer.read())["data"])
        assert served == sorted([str(sft.resolve()), "squad-lora"])

        answers = {}
        for model in ("squad-lora", str(sft.resolve())):
            completions = [post(port, "/v1/completions", {"model": model, "prompt": p, "max_tokens": NEW_TOKENS,
                                                          "temperature": 0})["choices"][0]["text"] for p in PROMPTS]
            chat = post(port, "/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": NEW_TOKENS,
                                                       "temperature": 0, "add_special_tokens": True})
            # `generate` prints completions without their surrounding whitespace
            answers[model] = [text.strip() for text in completions + [chat["choices"][0]["message"]["content"]]]
        print(json.dumps(answers, indent=1))

        from transformers import AutoTokenizer

        chat_prompt = AutoTokenizer.from_pretrained(str(sft)).apply_chat_template(CHAT, tokenize=False,
                                                                                  add_generation_prompt=True)
        assert answers["squad-lora"] == generate(str(lora), PROMPTS + [chat_prompt], tmp_path)
        assert answers[str(sft.resolve())] == generate(str(sft), PROMPTS + [chat_prompt], tmp_path)
        assert answers["squad-lora"] != answers[str(sft.resolve())], "the adapter changes the completions"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            code = server.wait(timeout=120)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-2000:]


def test_table_and_refusals_match_the_installed_vllm(vllm_install, fresh_adapter, tmp_path):
    config_file = fresh_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": "pissa"}))
    answer = ask_vllm(vllm_install, [*VLLM_LORA_MODULES, "GPT2LMHeadModel"], fresh_adapter, max_lora_rank=8)
    assert tuple(answer["max_lora_ranks"]) == VLLM_LORA_RANKS
    for arch, modules in VLLM_LORA_MODULES.items():
        info = answer["architectures"][arch]
        assert info["supports_lora"], arch
        packed = {name for names in info["packed_modules"].values() for name in names}
        assert packed <= DECODER_LINEARS and set(info["embedding_modules"]) == modules - DECODER_LINEARS, arch
    assert not answer["architectures"]["GPT2LMHeadModel"]["supports_lora"]
    assert "init_lora_weights='pissa'" in answer["adapter_error"]

    # serve asks the installed vLLM and refuses before writing anything
    with pytest.raises(UserError, match="the installed vLLM 0.32.0 refuses it: vLLM does not support "
                                        "init_lora_weights='pissa'"):
        prepare_for_vllm(resolve_source(str(fresh_adapter)), tmp_path / "serve", "x", ask=vllm_install)
    assert not (tmp_path / "serve").exists()
