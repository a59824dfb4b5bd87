"""Checkpoints that survive anything: exact resume, preemption, kill -9 mid-save, NaN guard, disk full."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from automodel.checkpoint import latest_step_dir, load_training_state
from automodel.errors import TrainingStopped, UserError
from automodel.training.recipe import FinetuneRecipe
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_squad_config

pytestmark = pytest.mark.slow


def resume_config(tmp_path, peft=True, max_steps=12, ckpt_every=None, allow_targets=None, **overrides):
    """12 steps of global batch 4 over 32 examples: the run crosses an epoch boundary at step 8.

    `allow_targets` opts in to `_target_`s outside the trusted packages (the fault-injecting losses of tests/)."""
    cfg = tiny_squad_config(tmp_path, peft=peft, max_steps=max_steps, train_samples=32, global_batch=4,
                            local_batch=2)
    cfg.pop("validation_dataset")
    cfg["dataset"]["seq_length"] = 128
    cfg["step_scheduler"].update(log_every_steps=1, ckpt_every_steps=ckpt_every)
    if allow_targets is not None:
        cfg["allow_targets"] = allow_targets
    for key, value in overrides.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


def losses(ckpt_dir):
    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def trainable_state(recipe):
    model = {n: p.detach().clone() for n, p in recipe.parts.model.named_parameters() if p.requires_grad}
    optim = recipe.parts.optimizer.state_dict()["state"]
    return model, optim


def assert_bit_identical(a, b):
    model_a, optim_a = a
    model_b, optim_b = b
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), f"weight {name} differs"
    assert optim_a.keys() == optim_b.keys()
    for index in optim_a:
        for key, value in optim_a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(optim_b[index][key])), f"optim {index}.{key}"


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "sft"])
def test_preempted_and_resumed_run_is_bit_identical(tmp_path, peft):
    straight = FinetuneRecipe(resume_config(tmp_path / "a", peft=peft))
    straight.run()

    # SIGTERM during step 6 (2 micro-batches per step): the step finishes, a checkpoint is saved, the run returns.
    interrupted = FinetuneRecipe(resume_config(tmp_path / "b", peft=peft, allow_targets=["tests.faults"], loss_fn___target_="tests.faults.SignalOnCall",
                                               loss_fn__call=11))
    result = interrupted.run()
    assert result.preempted and result.steps == 6 and result.final_dir.name == "step_6"
    assert not (result.final_dir / "model").exists(), "save_consolidated=final: no HF folder before the end"

    resumed = FinetuneRecipe(resume_config(tmp_path / "b", peft=peft))
    result = resumed.run()
    assert resumed.start_step == 6 and result.steps == 12 and not result.preempted

    assert losses(tmp_path / "b" / "ckpt") == losses(tmp_path / "a" / "ckpt")
    assert sorted(losses(tmp_path / "b" / "ckpt")) == list(range(1, 13))
    assert_bit_identical(trainable_state(resumed), trainable_state(straight))
    if peft:  # a LoRA checkpoint holds the adapter and its optimizer state, never the frozen base
        saved = load_file(tmp_path / "b" / "ckpt" / "step_12" / "model" / "adapter_model.safetensors")
        assert saved and all("lora_" in k for k in saved)
        metadata = torch.distributed.checkpoint.FileSystemReader(
            str(tmp_path / "b" / "ckpt" / "step_6" / "dcp")).read_metadata()
        model_keys = [k for k in metadata.state_dict_metadata if k.startswith("model.")]
        assert model_keys and all("lora_" in k for k in model_keys), model_keys[:3]


def _cli(cfg_path, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(cfg_path)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _final_adapter(ckpt_dir):
    return load_file(latest_step_dir(ckpt_dir) / "model" / "adapter_model.safetensors")


FAULT_SITE = REPO_ROOT / "tests" / "fault_site"  # a sitecustomize that kills the child from outside the code


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The checkpoint_dir of the 12-step run the killed runs must end equal to (how often it saves changes nothing
    of its training: the interrupted runs below save every 2 or 3 steps)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    reference = _cli(_write(tmp_path, resume_config(tmp_path / "ref", ckpt_every=3)))
    assert reference.returncode == 0, reference.stderr[-2000:]
    return tmp_path / "ref" / "ckpt"


def test_kill_9_inside_a_save_then_resume_matches(tmp_path, uninterrupted):

    cfg_path = _write(tmp_path, resume_config(tmp_path / "run", ckpt_every=3), "run.yaml")
    # SIGKILL when step 6's save has written everything and is about to publish it.
    killed = _cli(cfg_path, env={"PYTHONPATH": str(FAULT_SITE), "AUTOMODEL_FAULT_KILL_PUBLISHING": ".step_6.partial"})
    assert killed.returncode == -signal.SIGKILL
    ckpt = tmp_path / "run" / "ckpt"
    assert (ckpt / ".step_6.partial" / "dcp").is_dir(), "the kill did not land inside step 6's save"
    assert (ckpt / "LATEST").read_text().strip() == "step_3", "LATEST moved before the save completed"
    assert not (ckpt / "step_6").exists()
    resumed = _cli(cfg_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step 3" in resumed.stdout
    assert not list(ckpt.glob(".*partial")), "the killed save's partial folder must be cleaned up"
    ref, got = _final_adapter(uninterrupted), _final_adapter(ckpt)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert losses(ckpt) == losses(uninterrupted)


def test_kill_9_at_a_random_moment_then_resume_matches(tmp_path, uninterrupted):
    seed = int(time.time())
    ckpt = tmp_path / "run" / "ckpt"
    cfg_path = _write(tmp_path, resume_config(tmp_path / "run", ckpt_every=2), "run.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(cfg_path)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Training has started once the first step is logged; the kill lands at a random moment of steps 1-8.
    deadline = time.monotonic() + 120
    while not (ckpt / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    delay = random.Random(seed).uniform(0.0, 1.0)
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill ({proc.returncode})"
    latest = latest_step_dir(ckpt)
    assert latest is None or latest.name != "step_12", f"seed {seed}: killed after the run's last save"
    resumed = _cli(cfg_path)
    assert resumed.returncode == 0, f"seed {seed}, kill after {delay:.2f}s: {resumed.stderr[-2000:]}"
    ref, got = _final_adapter(uninterrupted), _final_adapter(ckpt)
    assert ref.keys() == got.keys(), f"seed {seed}, kill after {delay:.2f}s"
    assert all(torch.equal(ref[k], got[k]) for k in ref), f"seed {seed}, kill after {delay:.2f}s"


def test_sigterm_saves_exits_0_and_resume_continues(tmp_path):
    cfg = resume_config(tmp_path, max_steps=6, loss_fn___target_="tests.faults.SignalOnCall", loss_fn__call=5)
    cfg_path = _write(tmp_path, cfg)
    first = _cli(cfg_path, env={"AUTOMODEL_ALLOW_TARGETS": "tests.faults"})  # the person's grant, not the file's
    assert first.returncode == 0, first.stderr[-2000:]
    assert "preempted at step 3" in first.stdout and "run the same command again to resume" in first.stdout
    assert (tmp_path / "ckpt" / "LATEST").read_text().strip() == "step_3"
    cfg.pop("loss_fn")
    second = _cli(_write(tmp_path, cfg))
    assert second.returncode == 0 and "resuming from" in second.stdout
    assert (tmp_path / "ckpt" / "LATEST").read_text().strip() == "step_6"


def test_nonfinite_loss_stop_saves_nothing_new(tmp_path):
    cfg = resume_config(tmp_path, max_steps=4, ckpt_every=1, allow_targets=["tests.faults"], loss_fn___target_="tests.faults.NaNOnCall",
                        loss_fn__call=3)
    with pytest.raises(TrainingStopped, match=r"non-finite values at step 2 \(epoch 0, samples 4-7.*Last checkpoint"):
        FinetuneRecipe(cfg).run()
    assert latest_step_dir(tmp_path / "ckpt").name == "step_1" and not (tmp_path / "ckpt" / "step_2").exists()


def test_nonfinite_loss_skip_leaves_weights_unchanged(tmp_path):
    cfg = resume_config(tmp_path, peft=False, max_steps=4, allow_targets=["tests.faults"], loss_fn___target_="tests.faults.NaNOnCall",
                        loss_fn__call=1, step_scheduler__on_nonfinite="skip")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    batches = iter(recipe.parts.data.train_loader)
    before = trainable_state(recipe)
    record = recipe.train_step([next(batches), next(batches)])
    assert record["loss"] != record["loss"]  # NaN
    assert_bit_identical(trainable_state(recipe), before)
    recipe.train_step([next(batches), next(batches)])
    after = trainable_state(recipe)[0]
    assert all(not torch.equal(after[n], before[0][n]) for n in after), "a finite step must update every weight"


def test_incompatible_checkpoint_is_refused_naming_the_field(tmp_path):
    FinetuneRecipe(resume_config(tmp_path, max_steps=1)).run()
    cfg = resume_config(tmp_path, max_steps=2)
    cfg["peft"]["dim"] = 16
    with pytest.raises(UserError, match=r"trained with peft.dim=8 but this config has 16"):
        FinetuneRecipe(cfg).run()
    cfg = resume_config(tmp_path, max_steps=2)
    cfg["step_scheduler"]["global_batch_size"] = 8
    with pytest.raises(UserError, match=r"step_scheduler.global_batch_size=4 but this config has 8"):
        FinetuneRecipe(cfg).run()


def test_keep_last_n_prunes_old_checkpoints(tmp_path):
    result = FinetuneRecipe(resume_config(tmp_path, max_steps=4, ckpt_every=1, checkpoint__keep_last_n=2)).run()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_3", "step_4"]
    assert result.final_dir.name == "step_4"


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny_disk):
    cfg = resume_config(tmp_path, max_steps=4)
    cfg["checkpoint"]["checkpoint_dir"] = str(tiny_disk / "ckpt")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.save(1)
    with open(tiny_disk / "filler", "wb") as handle:  # take the rest of the disk
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    with pytest.raises(UserError, match=r"no space left on the device while saving .*step_2.*step_1 is intact"):
        recipe.save(2)
    ckpt = tiny_disk / "ckpt"
    assert not list(ckpt.glob(".*partial")) and not (ckpt / "step_2").exists()
    assert latest_step_dir(ckpt).name == "step_1"
    (tiny_disk / "filler").unlink()
    state = load_training_state(ckpt / "step_1", recipe.parts.model, recipe.parts.optimizer, recipe.parts.lr_scheduler)
    assert state.step == 0 or state.step == recipe.state.step


@pytest.mark.parametrize("peft", [True, False], ids=["lora", "sft"])
def test_export_writes_the_hf_folder_of_any_step(tmp_path, peft):
    FinetuneRecipe(resume_config(tmp_path, peft=peft, max_steps=4, ckpt_every=2)).run()
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / "step_2" / "model").exists() and (ckpt / "step_4" / "model").is_dir()
    out = subprocess.run([sys.executable, "-m", "automodel", "export", str(ckpt / "step_4"), "--output",
                          str(tmp_path / "exported")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name = "adapter_model.safetensors" if peft else "model.safetensors"
    final, exported = load_file(ckpt / "step_4" / "model" / name), load_file(tmp_path / "exported" / name)
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    again = subprocess.run([sys.executable, "-m", "automodel", "export", str(ckpt / "step_4")],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr
