"""Paths stay where they are put, and a checkpoint from elsewhere is trusted only on purpose."""

from __future__ import annotations

import shutil

import pytest

from automodel.checkpoint import latest_step_dir
from automodel.cli.main import main
from automodel.errors import UserError
from automodel.inference.sources import resolve_source
from tests.conftest import STORIES
from tests.helpers import tiny_squad_config


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".hidden", ""])
def test_serve_name_cannot_leave_the_output_folder(tmp_path, capsys, name):
    output = tmp_path / "serve"
    assert main(["serve", str(STORIES), "--output", str(output), "--name", name]) == 2
    assert one_error_line(capsys).startswith(f"error: --name: {name!r} must be a plain name")
    assert list(tmp_path.iterdir()) == []


def test_push_uploads_no_file_from_outside_the_folder(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    private = tmp_path / "outside" / "id_rsa"
    private.parent.mkdir()
    private.write_text("not for the hub")
    (folder / "model.safetensors").symlink_to(private)
    assert main(["push", str(folder), "--repo-id", "me/model", "--dry-run"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: push: {folder / 'model.safetensors'} is a link to {private}; ")


def test_latest_naming_a_path_elsewhere_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    (tmp_path / "elsewhere").mkdir()
    ckpt.mkdir()
    (ckpt / "LATEST").write_text("../elsewhere\n")
    with pytest.raises(UserError, match=r"LATEST: expected the name of a step folder \(step_<N>\), got '../elsewhere'"):
        latest_step_dir(ckpt)
    with pytest.raises(UserError, match=r"LATEST: expected the name of a step folder"):
        resolve_source(str(ckpt))


def test_merge_output_may_not_be_a_link_or_its_own_input(fresh_adapter, tmp_path, capsys):
    assert main(["merge-lora", str(STORIES), "--adapter", str(fresh_adapter), "--output", str(fresh_adapter),
                 "--overwrite"]) == 2
    assert one_error_line(capsys) == f"error: --output: {fresh_adapter} overlaps the input folder {fresh_adapter}; " \
                                     "write somewhere else"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    assert main(["merge-lora", str(STORIES), "--adapter", str(fresh_adapter), "--output", str(link)]) == 2
    assert one_error_line(capsys).startswith(f"error: --output: {link} is a link to")
    assert not (tmp_path / "target").exists()


def test_an_adapter_without_safetensors_is_refused(fresh_adapter, capsys):
    (fresh_adapter / "adapter_model.safetensors").rename(fresh_adapter / "adapter_model.bin")
    assert main(["generate", str(fresh_adapter), "--prompt", "Once"]) == 2
    assert one_error_line(capsys) == (f"error: model: {fresh_adapter} holds no adapter_model.safetensors; adapters are "
                                      "read as safetensors only (a .bin file is a pickle, which can run code)")


def test_a_model_folder_without_config_json_is_one_line(tmp_path, capsys):
    folder = tmp_path / "no_config"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "model.safetensors"):
        shutil.copy(STORIES / name, folder / name)
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["model"]["pretrained_model_name_or_path"] = str(folder)
    path = tmp_path / "cfg.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: model.pretrained_model_name_or_path: ") and str(folder) in line, line
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["checkpoint"]["checkpoint_dir"] = str(tmp_path / "taken")
    path = tmp_path / "cfg.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    assert one_error_line(capsys) == (f"error: checkpoint: checkpoint_dir {tmp_path / 'taken'} is a file; expected a "
                                      "folder (it is created when missing)")


def test_a_checkpoint_from_elsewhere_is_loaded_only_when_trusted(sft_run, tmp_path, capsys, monkeypatch):
    """A step folder written on another machine (another ledger) is refused by resume and export until accepted."""
    step = latest_step_dir(sft_run)
    assert sorted(p.suffix for p in (step / "model").iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")) == []
    foreign = tmp_path / "downloaded" / step.name
    shutil.copytree(step, foreign)
    monkeypatch.setenv("AUTOMODEL_CACHE", str(tmp_path / "this_machine"))  # whose ledger never saw the step
    risk = "its dcp/ training state is read with Python's pickle, which can run any code the files hold"

    assert main(["export", str(foreign), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: export: {foreign} was not written by your runs on this machine") and risk in line
    assert line.endswith("if you trust where it came from, pass --trust-pickled-state")
    assert main(["export", str(foreign), "--output", str(tmp_path / "out"), "--trust-pickled-state"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()

    cfg = __import__("yaml").safe_load((step / "config.yaml").read_text())
    cfg["checkpoint"] = {"checkpoint_dir": str(tmp_path / "new"), "restore_from": str(foreign)}
    path = tmp_path / "cfg.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: checkpoint.restore_from: {foreign} was not written by your runs") and risk in line
    assert line.endswith("run with --checkpoint.trust_pickled_state true")
    assert main(["finetune", "llm", "-c", str(path), "--checkpoint.trust_pickled_state", "true"]) == 0
    assert "nothing left to train" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("trainer_state.json", "trainer_state.json is not a valid trainer state (UnicodeDecodeError"),
    ("dcp/.metadata", "checkpoint: cannot read"),
])
def test_a_damaged_trusted_checkpoint_is_one_line(sft_run, tmp_path, capsys, damage, message):
    step = latest_step_dir(sft_run)
    copy = tmp_path / "copy" / step.name
    shutil.copytree(step, copy)
    (copy / damage).write_bytes(b"\x80\x04{oops")
    cfg = __import__("yaml").safe_load((step / "config.yaml").read_text())
    cfg["checkpoint"] = {"checkpoint_dir": str(tmp_path / "new"), "restore_from": str(copy)}
    cfg["step_scheduler"]["max_steps"] = 3
    path = tmp_path / "cfg.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path), "--checkpoint.trust_pickled_state", "true"]) == 2
    out = capsys.readouterr()
    line = one_error_line_of(out.err)
    assert message in line and "Traceback" not in out.out, line
    assert not (tmp_path / "new" / "LATEST").exists()


def one_error_line_of(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_export_output_may_not_be_a_link_or_inside_its_state(sft_run, tmp_path, capsys):
    step = latest_step_dir(sft_run)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    assert main(["export", str(step), "--output", str(link)]) == 2
    assert one_error_line(capsys).startswith(f"error: --output: {link} is a link to")
    assert main(["export", str(step), "--output", str(step / "dcp" / "model")]) == 2
    assert one_error_line(capsys) == (f"error: --output: {step / 'dcp' / 'model'} overlaps the input folder "
                                      f"{step / 'dcp'}; write somewhere else")
    assert not (tmp_path / "target").exists() and not (step / "dcp" / "model").exists()


# ---- writes never follow links (issue 26, point 6) -----------------------------------------------------------


@pytest.mark.parametrize("planted", ["config.yaml", "metrics.jsonl", "LATEST", "step_1", "mlflow.db", "tensorboard"])
def test_a_link_planted_in_the_checkpoint_dir_stops_the_run_before_it_writes(tmp_path, capsys, planted):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important").write_text("keep me")
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / planted).symlink_to(victim if planted in ("step_1", "tensorboard") else victim / "important")
    path = tmp_path / "cfg.yaml"
    path.write_text(__import__("yaml").safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    assert one_error_line(capsys).startswith(f"error: checkpoint.checkpoint_dir: {ckpt / planted} is a link to ")
    assert sorted(p.name for p in ckpt.iterdir()) == [planted]
    assert sorted(p.name for p in victim.iterdir()) == ["important"]
    assert (victim / "important").read_text() == "keep me"


def test_the_writers_themselves_never_follow_a_final_link(tmp_path):
    from automodel.checkpoint import write_config
    from automodel.checkpoint.save import write_atomically
    from automodel.logging.metrics import MetricsLogger

    target = tmp_path / "target"
    target.write_text("keep me")
    for name in ("config.yaml", "metrics.jsonl", ".LATEST.tmp"):
        (tmp_path / name).symlink_to(target)
    with pytest.raises(UserError, match=r"config.yaml is a link to .*target; automodel reads and writes"):
        write_config({"a": 1}, tmp_path / "config.yaml")
    with pytest.raises(UserError, match=r"logging.metrics_file: .*metrics.jsonl is a link to"):
        MetricsLogger(tmp_path / "metrics.jsonl")
    with pytest.raises(UserError, match=r"\.LATEST\.tmp is a link to"):
        write_atomically(tmp_path / "LATEST", "step_1\n")
    assert target.read_text() == "keep me" and not (tmp_path / "LATEST").exists()


def test_latest_naming_a_linked_step_folder_is_refused(sft_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step_9").symlink_to(latest_step_dir(sft_run), target_is_directory=True)
    (ckpt / "LATEST").write_text("step_9\n")
    with pytest.raises(UserError, match=r"checkpoint: .*step_9 is a link to"):
        latest_step_dir(ckpt)
    with pytest.raises(UserError, match=r"model: .*step_9 is a link to"):
        resolve_source(str(ckpt))


def test_serve_merge_output_goes_through_the_merge_output_check(fresh_adapter, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target", target_is_directory=True)
    assert main(["serve", str(STORIES), "--adapter", str(fresh_adapter), "--merge", "--output", str(link)]) == 2
    assert one_error_line(capsys).startswith(f"error: --output: {link} is a link to")
    assert main(["serve", str(STORIES), "--adapter", str(fresh_adapter), "--merge", "--output",
                 str(fresh_adapter), "--overwrite"]) == 2
    assert one_error_line(capsys) == (f"error: --output: {fresh_adapter} overlaps the input folder {fresh_adapter}; "
                                      "write somewhere else")
    assert not (tmp_path / "target").exists()


def test_overwriting_an_output_folder_that_holds_a_link_is_refused(fresh_adapter, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "bashrc").write_text("keep me")
    (output / "model.safetensors").symlink_to(tmp_path / "bashrc")
    assert main(["merge-lora", str(STORIES), "--adapter", str(fresh_adapter), "--output", str(output),
                 "--overwrite"]) == 2
    assert one_error_line(capsys).startswith(f"error: --output: {output / 'model.safetensors'} inside the output "
                                             "folder is a link to")
    assert (tmp_path / "bashrc").read_text() == "keep me"


def push_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(STORIES / name, folder / name)
    return folder


def test_push_refuses_a_hard_link_and_a_linked_model_folder(tmp_path, capsys):
    folder = push_folder(tmp_path)
    assert main(["push", str(folder), "--repo-id", "me/model", "--dry-run"]) == 0
    capsys.readouterr()
    (tmp_path / "elsewhere").mkdir()
    __import__("os").link(folder / "model.safetensors", tmp_path / "elsewhere" / "other")
    assert main(["push", str(folder), "--repo-id", "me/model", "--dry-run"]) == 2
    assert one_error_line(capsys) == (f"error: push: {folder / 'model.safetensors'} is a hard link (2 names for one "
                                      "file), so it may be a file from elsewhere; copy it into the folder (cp, not "
                                      "ln) to upload it")
    link = tmp_path / "linked_model"
    link.symlink_to(folder, target_is_directory=True)
    assert main(["push", str(link), "--repo-id", "me/model", "--dry-run"]) == 2
    assert one_error_line(capsys).startswith(f"error: push: {link} is a link to {folder}")
