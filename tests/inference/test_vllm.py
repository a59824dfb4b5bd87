"""`automodel serve`: the folder vLLM loads and the exact command, checked against vLLM's LoRA rules."""

from __future__ import annotations

import json
import shlex
import socket
import sys

import pytest

from automodel.cli.main import main
from automodel.errors import UserError
from automodel.inference.sources import resolve_source
from automodel.inference.vllm import check_adapter_for_vllm, max_lora_rank, prepare_for_vllm
from automodel.inference.vllm_runtime import INSTALL_HINT, find_vllm
from tests.conftest import STORIES


def edit_adapter_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def served_command(out: str) -> list[str]:
    return shlex.split(out.split("serve it with:\n", 1)[1].splitlines()[0])


def test_lora_folder_and_command(fresh_adapter, tmp_path, capsys):
    code = main(["serve", str(fresh_adapter), "--output", str(tmp_path / "serve"), "--name", "squad-lora"])
    out = capsys.readouterr().out
    assert code == 0
    adapter_dir = (tmp_path / "serve" / "squad-lora").resolve()
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(p.name for p in fresh_adapter.iterdir())
    install = find_vllm()
    command = served_command(out)
    assert command[:4] == [install.python if install else "python", "-I", "-m", "vllm.entrypoints.openai.api_server"]
    expected = ["--model", str(STORIES), "--enable-lora", "--lora-modules", f"squad-lora={adapter_dir}",
                "--max-lora-rank", "8", "--host", "127.0.0.1", "--port", "8000"]
    if install is not None and install.cpu_build:  # vLLM's CPU build reserves a share of host memory
        expected += ["--gpu-memory-utilization", "0.25"]
    assert command[4:] == expected
    if install is None:
        assert out.splitlines()[-1] == f"note: {INSTALL_HINT}"


def test_server_settings_become_vllm_arguments(tmp_path, capsys):
    assert main(["serve", str(STORIES), "--output", str(tmp_path / "serve"), "--name", "tiny", "--device", "cpu",
                 "--host", "0.0.0.0", "--port", "8123", "--memory-fraction", "0.1", "--dtype", "float32",
                 "--vllm-args", "--max-model-len 512 --enforce-eager"]) == 0
    assert served_command(capsys.readouterr().out)[4:] == [
        "--model", str((tmp_path / "serve").resolve()), "--served-model-name", "tiny", "--host", "0.0.0.0",
        "--port", "8123", "--gpu-memory-utilization", "0.1", "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager"]


def test_port_in_use_is_one_line_before_anything_is_written(fresh_adapter, tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", str(fresh_adapter), "--output", str(tmp_path / "serve"), "--run", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --port: 127.0.0.1:{port} is not free (Address already in use); "
                                 "choose another --port"]
    assert not (tmp_path / "serve").exists()


def test_vllm_python_without_vllm_is_one_line(fresh_adapter, tmp_path, capsys):
    code = main(["serve", str(fresh_adapter), "--output", str(tmp_path / "serve"), "--vllm-python", sys.executable])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --vllm-python: {sys.executable} cannot import vllm (or is not a Python "
                                 f"interpreter); {INSTALL_HINT}"]
    assert not (tmp_path / "serve").exists()


@pytest.mark.parametrize("rank, expected", [(1, 1), (4, 8), (8, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_vllm_choice(rank, expected):
    assert max_lora_rank(rank) == expected


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "does not serve DoRA adapters: merge it first"),
    ({"modules_to_save": ["lm_head"]}, "does not load modules_to_save"),
    ({"bias": "lora_only"}, "does not load LoRA biases"),
    ({"r": 1024}, "rank 1024 is above vLLM's largest --max-lora-rank 512"),
    ({"target_modules": ["q_proj", "score"]}, "vLLM adapts only .* also targets score"),
    ({"lora_bias": True}, "does not load LoRA biases"),
    ({"target_modules": []}, "vLLM needs target_modules"),
])
def test_adapters_vllm_refuses_are_named(fresh_adapter, changes, message):
    edit_adapter_config(fresh_adapter, **changes)
    with pytest.raises(UserError, match=message):
        check_adapter_for_vllm(fresh_adapter, "LlamaForCausalLM")


def test_embedding_targets_follow_the_architecture(fresh_adapter):
    edit_adapter_config(fresh_adapter, target_modules=["q_proj", "lm_head", "embed_tokens"])
    assert check_adapter_for_vllm(fresh_adapter, "LlamaForCausalLM")["r"] == 4  # vLLM's Llama adapts embeddings
    with pytest.raises(UserError, match="also targets embed_tokens, lm_head; use --merge"):
        check_adapter_for_vllm(fresh_adapter, "MistralForCausalLM")  # its Mistral does not


def test_full_names_of_supported_modules_are_accepted(fresh_adapter):
    edit_adapter_config(fresh_adapter, target_modules=["model.layers.0.self_attn.q_proj"])
    assert check_adapter_for_vllm(fresh_adapter, "LlamaForCausalLM")["r"] == 4


def test_non_empty_output_is_refused(fresh_adapter, tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "old.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        prepare_for_vllm(resolve_source(str(fresh_adapter)), tmp_path / "serve", "x")
