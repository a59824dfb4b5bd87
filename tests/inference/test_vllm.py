"""`automodel serve`: the folder vLLM loads and the exact command, checked against vLLM's LoRA rules."""

from __future__ import annotations

import json
import shlex

import pytest

from automodel.cli.main import main
from automodel.errors import UserError
from automodel.inference.sources import resolve_source
from automodel.inference.vllm import check_adapter_for_vllm, max_lora_rank, prepare_for_vllm, vllm_installed
from tests.conftest import STORIES


def edit_adapter_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_lora_folder_and_command(fresh_adapter, tmp_path, capsys):
    code = main(["serve", str(fresh_adapter), "--output", str(tmp_path / "serve"), "--name", "squad-lora"])
    out = capsys.readouterr().out
    assert code == 0
    adapter_dir = (tmp_path / "serve" / "squad-lora").resolve()
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(p.name for p in fresh_adapter.iterdir())
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("vllm serve"))
    assert shlex.split(command) == ["vllm", "serve", str(STORIES), "--enable-lora", "--lora-modules",
                                    f"squad-lora={adapter_dir}", "--max-lora-rank", "8", "--port", "8000"]
    if not vllm_installed():
        assert out.splitlines()[-1] == ("note: vLLM is not installed: `pip install vllm` (Linux with an NVIDIA GPU), "
                                        "then run the command above")


def test_run_without_vllm_is_one_line(fresh_adapter, tmp_path, capsys):
    if vllm_installed():
        pytest.skip("vLLM is installed here; --run would start a server")
    code = main(["serve", str(fresh_adapter), "--output", str(tmp_path / "serve"), "--run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: vLLM is not installed: `pip install vllm` (Linux with an NVIDIA GPU), "
                                 "then run the command above"]


@pytest.mark.parametrize("rank, expected", [(1, 1), (4, 8), (8, 8), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_max_lora_rank_rounds_up_to_a_vllm_choice(rank, expected):
    assert max_lora_rank(rank) == expected


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "does not serve DoRA"),
    ({"modules_to_save": ["lm_head"]}, "does not load modules_to_save"),
    ({"bias": "lora_only"}, "does not load LoRA biases"),
    ({"r": 1024}, "rank 1024 is above vLLM's largest --max-lora-rank 512"),
    ({"target_modules": ["q_proj", "lm_head"]}, "vLLM adapts only .* also targets lm_head"),
    ({"target_modules": []}, "vLLM needs target_modules"),
])
def test_adapters_vllm_refuses_are_named(fresh_adapter, changes, message):
    edit_adapter_config(fresh_adapter, **changes)
    with pytest.raises(UserError, match=message):
        check_adapter_for_vllm(fresh_adapter, "LlamaForCausalLM")


def test_full_names_of_supported_modules_are_accepted(fresh_adapter):
    edit_adapter_config(fresh_adapter, target_modules=["model.layers.0.self_attn.q_proj"])
    assert check_adapter_for_vllm(fresh_adapter, "LlamaForCausalLM")["r"] == 4


def test_non_empty_output_is_refused(fresh_adapter, tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "old.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        prepare_for_vllm(resolve_source(str(fresh_adapter)), tmp_path / "serve", "x")
