"""Provenance by content: a step folder's training state is loaded only when it is, file for file, what this
user's runs wrote (checkpoint/provenance.py). The attacks of issue 26, with a harmless payload."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from automodel.checkpoint import latest_step_dir
from automodel.checkpoint.provenance import MANIFEST, hash_files
from automodel.cli.main import main


class Touch:
    """A pickle that creates a file when loaded: what a hostile .metadata would do, made harmless."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def resume_config(step: Path, tmp_path: Path) -> Path:
    cfg = yaml.safe_load((step / "config.yaml").read_text())
    cfg["checkpoint"] = {"checkpoint_dir": str(tmp_path / "new"), "restore_from": str(step)}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def own_copy(sft_run, tmp_path):
    """A byte-identical copy of one of this user's steps: trusted by content, wherever it lies."""
    copy = tmp_path / "copy" / latest_step_dir(sft_run).name
    shutil.copytree(latest_step_dir(sft_run), copy, symlinks=True)
    return copy


def test_a_copy_with_the_same_content_is_trusted_and_export_reads_it(own_copy, tmp_path):
    assert main(["export", str(own_copy), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    recorded = __import__("json").loads((own_copy / MANIFEST).read_text())["sha256"]
    assert sorted(recorded) == ["config.yaml", "dcp/.metadata", "dcp/__0_0.distcp", "rng/rank_0.pt",
                                "trainer_state.json"]


def test_metadata_edited_in_place_with_mtime_restored_is_refused_and_never_unpickled(own_copy, tmp_path, capsys):
    metadata = own_copy / "dcp" / ".metadata"
    before = metadata.stat()
    marker = tmp_path / "payload_ran"
    payload = pickle.dumps(Touch(str(marker)))
    assert len(payload) < before.st_size
    with open(metadata, "r+b") as handle:  # same inode, same size: the pickle stops reading at its STOP opcode
        handle.write(payload + b" " * (before.st_size - len(payload)))
    os.utime(metadata, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = metadata.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    assert main(["finetune", "llm", "-c", str(resume_config(own_copy, tmp_path))]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: checkpoint.restore_from: {metadata} changed since your run wrote it"), line
    assert line.endswith("run with --checkpoint.trust_pickled_state true")
    assert main(["export", str(own_copy), "--output", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: export: {metadata} changed since your run wrote it")
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "new").exists()


def test_a_step_whose_dcp_links_to_a_trusted_one_is_refused_before_its_config_is_built(sft_run, tmp_path, capsys):
    trusted = latest_step_dir(sft_run)
    step = tmp_path / "planted" / trusted.name
    step.mkdir(parents=True)
    (step / "dcp").symlink_to(trusted / "dcp", target_is_directory=True)
    for name in ("rng", "trainer_state.json", MANIFEST):
        os.symlink(trusted / name, step / name)
    cfg = yaml.safe_load((trusted / "config.yaml").read_text())
    cfg["loss_fn"] = {"_target_": "automodel.training.loss.MaskedCrossEntropy"}  # the attacker's own config
    (step / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(step), "--output", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == (f"error: export: {step / 'dcp'} is a link to {trusted / 'dcp'}; a checkpoint "
                                      "is read from the files your run wrote, never through links")
    assert main(["finetune", "llm", "-c", str(resume_config(step, tmp_path))]) == 2
    assert one_error_line(capsys).startswith(f"error: checkpoint.restore_from: {step / 'dcp'} is a link to")
    assert not (tmp_path / "out").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("attack, message", [
    ("linked file", "dcp/__0_0.distcp is a link to"),
    ("linked step folder", " is a link to"),
    ("extra file", "dcp/__1_0.distcp was not written by the run that wrote"),
    ("missing file", "rng/rank_0.pt is missing"),
    ("edited config", "config.yaml changed since your run wrote it"),
    ("no manifest", "was not written by your runs on this machine"),
])
def test_each_way_of_changing_a_trusted_step_is_one_line(own_copy, tmp_path, capsys, attack, message):
    step = own_copy
    if attack == "linked file":
        shard = step / "dcp" / "__0_0.distcp"
        shutil.move(shard, tmp_path / "shard")
        shard.symlink_to(tmp_path / "shard")
    elif attack == "linked step folder":
        step = tmp_path / "link_step"
        step.symlink_to(own_copy, target_is_directory=True)
    elif attack == "extra file":
        shutil.copy(step / "dcp" / "__0_0.distcp", step / "dcp" / "__1_0.distcp")
    elif attack == "missing file":
        (step / "rng" / "rank_0.pt").unlink()
    elif attack == "edited config":
        (step / "config.yaml").write_text((step / "config.yaml").read_text().replace("seed: 1234", "seed: 4321"))
    else:
        (step / MANIFEST).unlink()
    assert main(["export", str(step), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: export: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_an_edited_manifest_is_not_in_the_ledger(own_copy, tmp_path, capsys):
    manifest = own_copy / MANIFEST
    (own_copy / "dcp" / ".metadata").write_bytes(pickle.dumps(Touch(str(tmp_path / "ran"))))
    recorded = __import__("json").loads(manifest.read_text())
    recorded["sha256"].update(hash_files(own_copy, ["dcp/.metadata"]))  # the attacker re-hashes what they changed
    manifest.write_text(__import__("json").dumps(recorded))
    assert main(["export", str(own_copy), "--output", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys).startswith(f"error: export: {own_copy} was not written by your runs on this machine")
    assert not (tmp_path / "ran").exists()


def test_a_large_file_is_hashed_block_by_block_the_same_in_any_number_of_threads(tmp_path):
    from automodel.checkpoint import provenance

    data = os.urandom(2 * provenance.BLOCK + 5)
    (tmp_path / "big").write_bytes(data)
    blocks = [__import__("hashlib").sha256(data[i:i + provenance.BLOCK]).digest()
              for i in range(0, len(data), provenance.BLOCK)]
    expected = __import__("hashlib").sha256(b"".join(blocks)).hexdigest()
    assert len(blocks) == 3
    assert hash_files(tmp_path, ["big"], threads=1) == hash_files(tmp_path, ["big"], threads=4) == {"big": expected}


def test_two_processes_split_the_hashing_and_both_refuse_a_file_only_one_of_them_hashed(own_copy, tmp_path):
    """Each process hashes its share of the files (rank 1 holds dcp/.metadata); they agree before either loads."""
    import subprocess

    from automodel.checkpoint.provenance import state_files
    from tests.distributed_helpers import REPO_ROOT, automodel_cmd, clean_env

    assert state_files(own_copy, "k")[1::2] == ["dcp/.metadata", "rng/rank_0.pt"]  # rank 1's share of 2
    pickle_in_place = own_copy / "dcp" / ".metadata"
    size = pickle_in_place.stat().st_size
    payload = pickle.dumps(Touch(str(tmp_path / "payload_ran")))
    pickle_in_place.write_bytes(payload + b" " * (size - len(payload)))
    cfg = yaml.safe_load((own_copy / "config.yaml").read_text())
    cfg["checkpoint"] = {"checkpoint_dir": str(tmp_path / "new"), "restore_from": str(own_copy)}
    cfg["step_scheduler"]["max_steps"] = 3
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run(automodel_cmd(str(path), "--nproc-per-node", "2"), capture_output=True, text=True,
                         cwd=REPO_ROOT, env=clean_env(), timeout=300)
    assert out.returncode != 0
    changed = f"{pickle_in_place} changed since your run wrote it"
    last = out.stderr.strip().splitlines()[-1]  # the launcher's line: each rank and why it stopped
    assert "worker rank 0" in last and "worker rank 1" in last and last.count(changed) == 2, out.stderr[-3000:]
    assert not (tmp_path / "payload_ran").exists() and not (tmp_path / "new" / "LATEST").exists()
