"""The pieces of multi-process training that need no second process: launch environment, launcher command line,
strategy rules, generic layer discovery, TP plans, failure reports, clipping, activation checkpointing."""

from __future__ import annotations

import argparse

import pytest
import torch

from automodel.cli.main import main
from automodel.config import parse_section
from automodel.config.precision import Precision, resolve_precision
from automodel.distributed.config import DistributedConfig
from automodel.distributed.env import LaunchEnv, read_launch_env
from automodel.distributed.fsdp2 import apply_fsdp2, mixed_precision_policy
from automodel.models.decoder_layers import decoder_layers
from automodel.distributed.parallel import clip_grad_norm
from automodel.distributed.launcher import (LAUNCH_FLAGS, describe_failures, strip_launcher_flags, torchrun_args)
from automodel.distributed.parallel import mask_rows_after, resolve_strategy
from automodel.distributed.tp import build_plan, check_heads_split
from automodel.errors import UserError
from tests.distributed_helpers import dist_config, write_config


# ---- where a process stands ----------------------------------------------------------------------

def test_single_process_without_launcher_variables():
    assert read_launch_env({}) == LaunchEnv()


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_LOCALID": "0"}
    assert read_launch_env(env) == LaunchEnv(3, 4, 1, "torchrun")


def test_srun_variables_give_rank_and_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2",
           "MASTER_ADDR": "node001", "MASTER_PORT": "29600"}
    assert read_launch_env(env) == LaunchEnv(5, 8, 1, "slurm", "node001", 29600)
    # a batch script (one task) is a single process, not a job step to join
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"}) == LaunchEnv()


def test_srun_on_several_nodes_needs_master_addr():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        read_launch_env(env)
    with pytest.raises(UserError, match="SLURM_PROCID='x': expected an integer"):
        read_launch_env({**env, "SLURM_PROCID": "x"})


def test_backend_follows_the_device_unless_configured():
    from automodel.distributed.config import DistEnvConfig
    from automodel.distributed.env import pick_backend

    assert pick_backend(DistEnvConfig(), torch.device("cpu")) == "gloo"
    assert pick_backend(DistEnvConfig(), torch.device("cuda", 0)) == "nccl"
    assert pick_backend(DistEnvConfig(backend="gloo"), torch.device("cuda", 0)) == "gloo"


# ---- the launcher's command line -----------------------------------------------------------------

def _launch_args(**values) -> argparse.Namespace:
    return argparse.Namespace(**{flag[2:].replace("-", "_"): values.get(flag[2:].replace("-", "_"))
                                 for flag in LAUNCH_FLAGS})


def test_workers_get_the_command_without_launcher_flags():
    argv = ["finetune", "llm", "-c", "x.yaml", "--nproc-per-node", "2", "--nnodes=2", "--node_rank", "1",
            "--master-addr", "h", "--step_scheduler.max_steps", "3", "--master_port=7"]
    assert strip_launcher_flags(argv) == ["finetune", "llm", "-c", "x.yaml", "--step_scheduler.max_steps", "3"]


def test_torchrun_command_line_for_one_and_several_nodes():
    single = torchrun_args(_launch_args(nproc_per_node=2), ["finetune", "llm", "-c", "x.yaml"])
    assert single == ["--nproc-per-node=2", "--nnodes=1", "--max-restarts=0", "--module", "automodel",
                      "finetune", "llm", "-c", "x.yaml"]  # no port given: torchrun picks a free one
    multi = torchrun_args(_launch_args(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="n0", master_port=6000), [])
    assert "--node-rank=1" in multi and "--master-addr=n0" in multi and "--master-port=6000" in multi
    with pytest.raises(UserError, match="--node-rank 2: expected 0..1"):
        torchrun_args(_launch_args(nnodes=2, node_rank=2), [])
    with pytest.raises(UserError, match="--nproc-per-node: expected an integer >= 1"):
        torchrun_args(_launch_args(nproc_per_node=0), [])


def test_launcher_flags_start_workers_only_outside_a_started_job():
    from automodel.distributed.launcher import already_launched

    assert already_launched({}) is None
    assert already_launched({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == "torchrun"
    srun = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}
    assert already_launched({**srun, "SLURM_STEP_NUM_TASKS": "16"}) == "slurm"
    assert already_launched({**srun, "SLURM_STEP_NUM_TASKS": "2"}) is None  # one task per node: torchrun inside


def test_bad_distributed_config_fails_once_before_any_worker_starts(tmp_path, capsys):
    config = write_config(tmp_path, dist_config(tmp_path, peft=True, tp_size=3))
    assert main(["finetune", "llm", "-c", config, "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: distributed.tp_size 3 does not divide the number of processes (2)"]
    assert main(["finetune", "llm", "-c", config, "--nproc-per-node", "2", "--distributed.strategy", "fsdp"]) == 2
    assert "distributed.strategy: expected one of 'auto', 'fsdp2', 'ddp', 'none'" in capsys.readouterr().err


def test_failure_report_names_the_killed_rank_first_and_an_exception_message(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as err:
        ErrorHandler().record_exception(err)
    failures = {0: ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=""),
                2: ProcessFailure(local_rank=0, pid=12, exitcode=1, error_file=str(error_file)),
                1: ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file="")}
    report = describe_failures(failures).split("; ")
    assert report[0].startswith("worker rank 1 (local rank 1, pid 11") and report[0].endswith("SIGKILL")
    assert report[1].endswith("exited with code 1: RuntimeError: CUDA out of memory")
    assert report[2].endswith("killed by signal SIGTERM")


def test_failure_report_keeps_the_exception_of_a_rank_stopped_while_exiting(tmp_path, monkeypatch):
    """Both ranks refuse the same checkpoint; rank 1 exits first and torchrun SIGTERMs rank 0, which had already
    recorded its exception: the report names it for both, not a signal for rank 0."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, ProcessFailure

    files = []
    for rank in range(2):
        files.append(tmp_path / f"error{rank}.json")
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(files[-1]))
        try:
            raise ValueError("step_2 changed since your run wrote it")
        except ValueError as err:
            ErrorHandler().record_exception(err)
    failures = {0: ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=str(files[0])),
                1: ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file=str(files[1]))}
    report = describe_failures(failures)
    assert report.count("ValueError: step_2 changed since your run wrote it") == 2, report
    assert "raised ValueError: step_2 changed since your run wrote it and then was killed by signal SIGTERM" in report


# ---- strategy rules ------------------------------------------------------------------------------

def test_strategy_rules():
    assert resolve_strategy(DistributedConfig(), 2) == "fsdp2"
    assert resolve_strategy(DistributedConfig(strategy="ddp"), 1) == "none"
    assert resolve_strategy(DistributedConfig(tp_size=2), 2) == "none"  # all ranks are TP peers
    with pytest.raises(UserError, match="strategy none: 2 processes"):
        resolve_strategy(DistributedConfig(strategy="none"), 2)
    with pytest.raises(UserError, match="ddp cannot be combined with tp_size > 1"):
        resolve_strategy(DistributedConfig(strategy="ddp", tp_size=2), 4)


def test_fsdp2_mixed_precision_follows_the_run_precision():
    cpu = torch.device("cpu")
    fp32 = mixed_precision_policy(resolve_precision({"precision": "fp32"}, cpu, peft=False))
    assert fp32.param_dtype is None and fp32.reduce_dtype is None
    # bf16-mixed and bf16-frozen (as resolve_precision makes them where the device has bf16) gather bf16 parameters
    # and reduce in float32
    for precision in (Precision("bf16-mixed", "test", compute_dtype=torch.bfloat16),
                      Precision("bf16-frozen", "test", weights_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)):
        bf16 = mixed_precision_policy(precision)
        assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    pure = mixed_precision_policy(resolve_precision({"model": {"dtype": "bfloat16"}}, cpu, peft=False))
    assert pure.param_dtype is None  # bf16-true: stored in bf16 already


def test_the_older_mixed_precision_key_is_refused_with_a_pointer_to_precision():
    with pytest.raises(UserError, match="distributed: .*replaced by the top-level `precision`"):
        parse_section(DistributedConfig, {"mixed_precision": "bf16"}, "distributed")


# ---- the model: layers, TP plans -----------------------------------------------------------------

def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, n_embd=32, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type, layer", [("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                                               ("gpt2", "GPT2Block"), ("mistral", "MistralDecoderLayer")])
def test_decoder_layers_are_found_from_no_split_modules(model_type, layer):
    model = _tiny(model_type)
    found = decoder_layers(model)
    assert len(found) == 2 and {type(m).__name__ for m in found} == {layer}


def test_model_without_a_transformers_tp_plan_is_a_clear_error():
    with pytest.raises(UserError, match="transformers provides no tensor-parallel plan for GPT2LMHeadModel"):
        build_plan(_tiny("gpt2"))


def test_tp_plan_follows_the_model_and_lora(stories_path):
    from transformers import AutoModelForCausalLM

    from automodel.peft import LoraSettings

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    with pytest.raises(UserError, match=r"num_attention_heads \(8\) is not divisible"):
        check_heads_split(model, 3)
    _, plan = build_plan(model)
    assert type(plan["layers.0.self_attn.q_proj"]).__name__ == "ColwiseParallel"
    assert type(plan["layers.4.mlp.down_proj"]).__name__ == "RowwiseParallel"
    assert len(plan) == 5 * 7
    _, lora_plan = build_plan(LoraSettings(target_modules=["q_proj", "o_proj"]).apply(model))
    assert set(lora_plan) >= {"layers.0.self_attn.q_proj.base_layer", "layers.0.self_attn.q_proj.lora_B.default",
                              "layers.0.self_attn.o_proj.base_layer", "layers.0.self_attn.o_proj.lora_A.default",
                              "layers.0.mlp.up_proj"}
    assert "layers.0.self_attn.q_proj.lora_A.default" not in lora_plan
    with pytest.raises(UserError, match=r"^peft.use_dora: DoRA cannot run with tensor parallelism"):
        build_plan(LoraSettings(target_modules=["q_proj"], use_dora=True).apply(
            AutoModelForCausalLM.from_pretrained(stories_path)))


def test_cpu_offload_needs_a_gpu(stories_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(UserError, match="cpu_offload"):
        apply_fsdp2(AutoModelForCausalLM.from_pretrained(stories_path), None, torch.device("cpu"), cpu_offload=True)


# ---- small helpers the recipe uses ---------------------------------------------------------------

def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p) * 4
        q.grad = p.grad.clone()
    norm = clip_grad_norm(params, 1.0)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(twins, 1.0)), rel=1e-6)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad)


def test_sampler_padding_rows_do_not_count():
    batch = {"labels": torch.ones(3, 4, dtype=torch.long)}
    assert mask_rows_after(batch, 3) is batch
    masked = mask_rows_after(batch, 1)["labels"]
    assert masked[0].eq(1).all() and masked[1:].eq(-100).all() and batch["labels"].eq(1).all()


@pytest.mark.slow
def test_activation_checkpointing_in_one_process_gives_the_same_gradients(tmp_path):
    from automodel.batch import pad_collate
    from automodel.training.recipe import FinetuneRecipe

    def grads(checkpointing: bool):
        cfg = dist_config(tmp_path / str(checkpointing), peft=False, activation_checkpointing=checkpointing)
        recipe = FinetuneRecipe(cfg)
        recipe.setup()
        assert recipe.parts.model.is_gradient_checkpointing is checkpointing
        items = [recipe.parts.data.train_set[i] for i in range(4)]
        loss, _ = recipe.backward([pad_collate(items, recipe.parts.tokenizer.pad_token_id)])
        return loss, {n: p.grad for n, p in recipe.parts.model.named_parameters()}

    (loss_plain, plain), (loss_ckpt, ckpt) = grads(False), grads(True)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
