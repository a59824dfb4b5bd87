"""Watching a run: one tiny real fine-tune logs to JSONL, wandb (offline), MLflow (SQLite) and TensorBoard;
every tracker, read back through its own client, holds the JSONL's series. Plus the banner, summary, plot,
throughput numbers and progress-bar rules."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys

import pytest
import torch

from automodel.cli.main import main
from automodel.batch import pad_collate
from automodel.errors import UserError
from automodel.logging.backends import require
from automodel.logging.throughput import flops_per_token
from automodel.peft import count_parameters
from automodel.training.recipe import FinetuneRecipe
from tests.helpers import tiny_squad_config

PEAK_TFLOPS = 0.5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 3-step LoRA run with every tracker on; yields (recipe, result, checkpoint dir, console text)."""
    tmp = tmp_path_factory.mktemp("monitor")
    cfg = tiny_squad_config(tmp, max_steps=3, train_samples=16)
    cfg["dataset"]["seq_length"] = cfg["validation_dataset"]["seq_length"] = 128
    cfg["validation_dataset"]["limit_dataset_samples"] = 8
    cfg["step_scheduler"].update(log_every_steps=1, val_every_steps=2)
    cfg["logging"].update(
        wandb={"project": "obs", "name": "tiny", "tags": ["test"], "mode": "offline", "dir": str(tmp / "wandb")},
        mlflow={"experiment": "obs-test", "run_name": "tiny", "tags": {"team": "automodel"}},
        tensorboard={}, mfu={"peak_tflops": PEAK_TFLOPS}, plot=True)
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    automodel_logger = logging.getLogger("automodel")
    automodel_logger.addHandler(handler)
    automodel_logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as patch:
        # wandb offline never touches the network; its files go to the test's folder.
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(tmp / "wandb"))
        patch.setenv("WANDB_SILENT", "true")
        try:
            recipe = FinetuneRecipe(cfg)
            result = recipe.run()
        finally:
            automodel_logger.removeHandler(handler)
    yield recipe, result, tmp / "ckpt", console.getvalue()


def jsonl(ckpt_dir, kind):
    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def series(ckpt_dir, kind, key):
    return {r["step"]: r[key] for r in jsonl(ckpt_dir, kind)}


# ---- JSONL and throughput ------------------------------------------------------------------------


def test_jsonl_has_throughput_memory_and_mfu_by_the_documented_formula(run):
    recipe, _, ckpt_dir, _ = run
    train = jsonl(ckpt_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in jsonl(ckpt_dir, "validation")] == [2, 3]
    total, trainable = count_parameters(recipe.parts.model)
    assert trainable < total  # LoRA: fewer weight gradients than 6 x params
    for record in train:
        # log_every_steps=1: each record's window is its own step.
        assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["step_s"], rel=1e-9)
        assert record["label_tokens_per_s"] == pytest.approx(record["label_tokens"] / record["step_s"], rel=1e-9)
        assert 0 < record["label_tokens"] < record["tokens"]
        expected_mfu = (4 * total + 2 * trainable) * record["tokens_per_s"] / (PEAK_TFLOPS * 1e12)
        assert record["mfu"] == pytest.approx(expected_mfu, rel=1e-9)
        assert 0.05 < record["peak_memory_gb"] < 64  # this process's peak RSS, in GB


def test_tokens_count_real_tokens_not_padding(run):
    recipe = run[0]
    items = [recipe.parts.data.train_set[i] for i in range(4)]
    lengths = [len(item["input_ids"]) for item in items]
    assert len(set(lengths)) > 1, "need items of different lengths so the batch holds padding"
    batch = pad_collate(items, recipe.parts.tokenizer.pad_token_id)
    record = recipe.train_step([batch])
    assert record["tokens"] == sum(lengths) < batch["input_ids"].numel()
    assert record["label_tokens"] == sum(sum(1 for t in item["labels"] if t != -100) for item in items)


def test_flops_per_token_is_six_params_for_full_sft():
    assert flops_per_token(1_000, 1_000) == 6_000
    assert flops_per_token(1_000, 10) == 4_020


# ---- trackers, read back through their own clients ------------------------------------------------


def read_wandb_records(path):
    """Records of a `.wandb` transaction log: a 7-byte W&B header, then LevelDB log-format chunks in
    32 KiB blocks (header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_files_hold_the_jsonl_series(run):
    tmp = run[2].parent
    run_files = list((tmp / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = read_wandb_records(run_files[0])
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = history.setdefault(record.history.step.num, {})
            row.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item})
    assert {s: row["train/loss"] for s, row in history.items() if "train/loss" in row} == \
        series(run[2], "train", "loss")
    assert {s: row["val/loss"] for s, row in history.items() if "val/loss" in row} == \
        series(run[2], "validation", "val_loss")
    assert {s: row["train/tokens_per_s"] for s, row in history.items() if "train/lr" in row} == \
        series(run[2], "train", "tokens_per_s")
    config = {item.key: json.loads(item.value_json) for record in records
              if record.WhichOneof("record_type") == "config" for item in record.config.update}
    assert config["optimizer"]["lr"] == 3e-3
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.display_name == "tiny" and list(run_record.tags) == ["test"]


def test_mlflow_sqlite_store_holds_the_series_and_config_params(run):
    from mlflow.tracking import MlflowClient

    ckpt_dir = run[2]
    client = MlflowClient(tracking_uri=f"sqlite:///{ckpt_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("obs-test")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "tiny" and found.info.status == "FINISHED"
    assert found.data.tags["team"] == "automodel"
    assert found.data.params["optimizer.lr"] == "0.003"
    assert found.data.params["peft.target_modules"] == "all-linear"
    for key, kind, field in (("train/loss", "train", "loss"), ("train/lr", "train", "lr"),
                             ("val/loss", "validation", "val_loss")):
        history = client.get_metric_history(found.info.run_id, key)
        assert {m.step: m.value for m in history} == series(ckpt_dir, kind, field), key


def test_tensorboard_events_hold_the_series(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt_dir = run[2]
    events = EventAccumulator(str(ckpt_dir / "tensorboard"))
    events.Reload()
    for key, kind, field in (("train/loss", "train", "loss"), ("train/label_tokens_per_s", "train",
                                                               "label_tokens_per_s"),
                             ("val/loss", "validation", "val_loss")):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = series(ckpt_dir, kind, field)
        assert logged.keys() == expected.keys(), key
        for step in expected:  # TensorBoard stores float32
            assert logged[step] == pytest.approx(expected[step], rel=1e-6), (key, step)
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


# ---- banner, summary, plot ------------------------------------------------------------------------


def test_start_banner_and_end_summary(run):
    recipe, result, ckpt_dir, console = run
    total, trainable = count_parameters(recipe.parts.model)
    assert f"parameters  {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)" in console
    train_set = recipe.parts.data.train_set
    tokens = sum(len(train_set[i]["input_ids"]) for i in range(len(train_set)))
    assert (f"train data  {len(train_set)} examples ({train_set.num_dropped} dropped, {train_set.num_truncated} "
            f"truncated to fit seq_length), {tokens:,} tokens") in console
    assert "8 per step = 4 per micro-batch x 2 accumulation x 1 data-parallel" in console
    assert "world size 1, strategy none, device cpu" in console
    assert "precision   fp32: weights and optimizer float32, compute float32 (model.dtype: float32)" in console
    assert ("loss        logits at label positions only, chunked output head (1024 label tokens a chunk), last "
            "layer on label rows") in console
    best_step = min(result.val_losses, key=result.val_losses.get)
    assert f"best loss {result.val_losses[best_step]:.4f} at step {best_step}" in console
    model_dir = ckpt_dir / "step_3" / "model"
    assert f"final model  {model_dir}" in console and (model_dir / "adapter_config.json").is_file()
    for command in ("automodel generate", "automodel eval squad", "automodel push", "automodel plot"):
        assert command in console


def assert_real_plot(path):
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[:2] == (700, 1100)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05, "blank picture"
    assert len(torch.unique(torch.from_numpy(rgb), dim=0)) > 50, "too few colours for curves and text"


def test_run_ends_with_a_plot_and_automodel_plot_redraws_it(run, tmp_path, capsys):
    ckpt_dir = run[2]
    assert_real_plot(ckpt_dir / "metrics.png")
    assert main(["plot", str(ckpt_dir), "--output", str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "again.png")
    assert_real_plot(tmp_path / "again.png")


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl" in err


# ---- config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("logging_cfg, message", [
    ({"wandb": {"projetc": "x"}}, "logging.wandb.projetc: unknown setting (did you mean 'project'?)"),
    ({"mlflow": {"tags": ["a"]}}, "logging.mlflow.tags: expected a mapping"),
    ({"mfu": {"peak_tflops": -1}}, "logging.mfu: peak_tflops: expected a positive number"),
])
def test_bad_logging_sections_stop_before_the_model_loads(tmp_path, logging_cfg, message):
    cfg = tiny_squad_config(tmp_path)
    cfg["logging"].update(logging_cfg)
    with pytest.raises(UserError, match=re.escape(message)):
        FinetuneRecipe(cfg)


def test_missing_tracker_package_names_the_extra():
    with pytest.raises(UserError) as err:
        require("automodel_tracker_that_is_not_installed", "wandb", "logging.wandb")
    assert str(err.value) == ("logging.wandb: the 'automodel_tracker_that_is_not_installed' package is not "
                              "installed; run pip install 'automodel[wandb]' or remove the logging.wandb section")


# ---- progress bars --------------------------------------------------------------------------------


def bars_wanted_with_stdout(stdout) -> str:
    code = "from automodel.logging.progress import bars_wanted; import sys; sys.stderr.write(str(bars_wanted()))"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=subprocess.PIPE, env=env,
                          timeout=120, check=True, text=True)
    return done.stderr.strip()


def test_progress_bars_only_when_stdout_is_a_terminal():
    assert bars_wanted_with_stdout(subprocess.PIPE) == "False"
    leader, follower = pty.openpty()
    try:
        assert bars_wanted_with_stdout(follower) == "True"
    finally:
        os.close(leader)
        os.close(follower)


# ---- rank awareness -------------------------------------------------------------------------------


def _rank_worker(rank, world, init_file, run_dir):
    import torch.distributed as dist

    from automodel.logging import LoggingConfig, is_main_process, open_metrics, world_size

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = open_metrics(LoggingConfig(), run_dir, cfg={})
        metrics.log_validation(step=1, val_loss=float(rank), tokens=10)
        (run_dir / f"rank_{rank}.json").write_text(json.dumps([is_main_process(), world_size()]))
    finally:
        dist.destroy_process_group()


def test_only_rank_zero_writes_metrics(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.multiprocessing.spawn(_rank_worker, args=(2, tmp_path / "init", run_dir), nprocs=2, join=True)
    assert json.loads((run_dir / "rank_0.json").read_text()) == [True, 2]
    assert json.loads((run_dir / "rank_1.json").read_text()) == [False, 2]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"kind": "validation", "step": 1, "val_loss": 0.0, "val_tokens": 10}]
