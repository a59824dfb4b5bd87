"""R2's corpus, continued: attacks on what lies at rest (issue 26, points 3, 5 and 6; see fault_corpus.py).

provenance: a step folder that this user's runs wrote (its manifest is in the ledger R2 runs with), then changed as
            an attacker would; the hostile `.metadata` is a pickle that creates `PWNED` when loaded.
links:      links planted where a run, merge-lora, serve or push writes or reads.
secrets:    a value read from the environment that the error would echo (it must name the variable instead).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

from fault_corpus import STORIES, Case, base_config, finetune
from fault_corpus_io import copied_run

SECRET = "planted-secret-r2-5b1d"
SECRET_VAR = "AUTOMODEL_BENCH_SECRET"


class Touch:
    """Loaded, this pickle creates a file: a harmless stand-in for code a hostile checkpoint runs."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def trusted_copy(real_step: Path, folder: Path) -> Path:
    """The real run copied, and its manifest noted in R2's ledger: a step this user's runs wrote."""
    from automodel.checkpoint.provenance import MANIFEST, ledger_path

    step = copied_run(real_step, folder)
    ledger_path().parent.mkdir(parents=True, exist_ok=True)
    with open(ledger_path(), "a") as ledger:
        ledger.write(hashlib.sha256((step / MANIFEST).read_bytes()).hexdigest() + "\n")
    return step


def pickle_in_place(name: str):
    """Overwrite a file with a same-size pickle that creates PWNED, then put its modification time back."""
    def damage(step: Path) -> None:
        path = step / name
        before = path.stat()
        payload = pickle.dumps(Touch(step.parents[1] / "PWNED"))
        with open(path, "r+b") as handle:
            handle.write(payload + b" " * max(0, before.st_size - len(payload)))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return damage


def link_to_trusted(name: str):
    """Replace `name` by a link to the same entry of another trusted step (the real run's)."""
    def damage(step: Path, real_step: Path) -> None:
        path = step / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.symlink_to(real_step / name, target_is_directory=(real_step / name).is_dir())
    return damage


def edit(name: str, old: bytes, new: bytes):
    def damage(step: Path) -> None:
        (step / name).write_bytes((step / name).read_bytes().replace(old, new))
    return damage


def extra_shard(step: Path) -> None:
    shutil.copy(step / "dcp" / "__0_0.distcp", step / "dcp" / "__1_0.distcp")


def rehashed_manifest(step: Path) -> None:
    """The attacker changes .metadata and writes its new hash into the manifest (which the ledger then lacks)."""
    import json

    from automodel.checkpoint.provenance import MANIFEST, hash_files

    pickle_in_place("dcp/.metadata")(step)
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["sha256"].update(hash_files(step, ["dcp/.metadata"]))
    (step / MANIFEST).write_text(json.dumps(manifest))


def attacked(command: str, damage, with_real: bool = False, *extra: str):
    """`resume` (finetune with restore_from) or `export` of a trusted step after `damage`."""
    def setup(folder: Path, real_step: Path) -> list[str]:
        step = trusted_copy(real_step, folder)
        damage(step, real_step) if with_real else damage(step)
        if command == "export":
            return ["export", str(step), "--output", str(folder / "out"), *extra]
        cfg = base_config(folder)
        cfg["step_scheduler"]["max_steps"] = 3
        cfg["checkpoint"].update(checkpoint_dir=str(folder / "new"), restore_from=str(step))
        return finetune(folder, cfg)
    return setup


def linked_step_folder(folder: Path, real_step: Path) -> list[str]:
    trusted_copy(real_step, folder)
    (folder / "step_1").symlink_to(real_step, target_is_directory=True)
    return ["export", str(folder / "step_1"), "--output", str(folder / "out")]


def provenance_cases() -> list[Case]:
    rows = [
        ("metadata pickled in place, mtime restored", pickle_in_place("dcp/.metadata"), False, ".metadata"),
        ("data shard pickled in place, mtime restored", pickle_in_place("dcp/__0_0.distcp"), False, "__0_0.distcp"),
        ("rng file pickled in place", pickle_in_place("rng/rank_0.pt"), False, "rank_0.pt"),
        ("dcp/ a link to a trusted step's", link_to_trusted("dcp"), True, "dcp"),
        ("data shard a link to a trusted step's", link_to_trusted("dcp/__0_0.distcp"), True, "__0_0.distcp"),
        ("manifest a link to a trusted step's", link_to_trusted("provenance.json"), True, "provenance.json"),
        ("rng/ a link to a trusted step's", link_to_trusted("rng"), True, "rng"),
        ("an extra shard in dcp/", extra_shard, False, "__1_0.distcp"),
        ("trainer_state.json edited", edit("trainer_state.json", b'"step": 1', b'"step": 0'), False,
         "trainer_state.json"),
        ("config.yaml edited", edit("config.yaml", b"lr: 0.001", b"lr: 0.002"), False, "config.yaml"),
        ("manifest re-hashed by the attacker", rehashed_manifest, False, "was not written by your runs"),
        ("manifest removed", lambda step: (step / "provenance.json").unlink(), False, "was not written by your runs"),
    ]
    cases = []
    for command in ("resume", "export"):
        for label, damage, with_real, expect in rows:
            cases.append(Case("provenance", f"{command}: {label}", attacked(command, damage, with_real), expect,
                              forbidden="PWNED"))
    cases.append(Case("provenance", "export: the step folder a link to a trusted one", linked_step_folder,
                      "is a link to"))
    return cases


def planted_in_checkpoint_dir(name: str, target_is_folder: bool = False):
    def setup(folder: Path) -> list[str]:
        (folder / "victim").mkdir()
        (folder / "victim" / "keep").write_text("keep me")
        (folder / "ckpt").mkdir()
        (folder / "ckpt" / name).symlink_to(folder / "victim" if target_is_folder else folder / "victim" / "keep")
        return finetune(folder, base_config(folder))
    return setup


def adapter_folder(folder: Path, real_step: Path) -> Path:
    """A model folder of the real run, copied (push and serve read it)."""
    model = folder / "model"
    shutil.copytree(real_step / "model", model)
    return model


def push_with(damage):
    def setup(folder: Path, real_step: Path) -> list[str]:
        model = adapter_folder(folder, real_step)
        target = damage(folder, model)
        return ["push", str(target or model), "--repo-id", "a/b", "--dry-run"]
    return setup


def symlinked_weights(folder: Path, model: Path) -> None:
    (model / "model.safetensors").rename(folder / "weights")
    (model / "model.safetensors").symlink_to(folder / "weights")


def hard_linked_weights(folder: Path, model: Path) -> None:
    os.link(model / "model.safetensors", folder / "second_name")


def linked_model_folder(folder: Path, model: Path) -> Path:
    (folder / "link").symlink_to(model, target_is_directory=True)
    return folder / "link"


def serve_merge_into_link(folder: Path) -> list[str]:
    (folder / "link").symlink_to(folder / "elsewhere", target_is_directory=True)
    return ["serve", str(STORIES), "--output", str(folder / "link"), "--merge"]


def output_holding_a_link(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "bashrc").write_text("keep me")
    (folder / "out" / "config.json").symlink_to(folder / "bashrc")
    return ["serve", str(STORIES), "--output", str(folder / "out"), "--overwrite"]


def link_cases() -> list[Case]:
    cases = [Case("links", f"run: {name} in checkpoint_dir a link", planted_in_checkpoint_dir(name, folder), name)
             for name, folder in (("config.yaml", False), ("metrics.jsonl", False), ("LATEST", False),
                                  ("step_1", True), (".step_1.partial", True))]
    cases += [
        Case("links", "serve --merge --output a link", serve_merge_into_link, "--output"),
        Case("links", "serve --overwrite into a folder holding a link", output_holding_a_link, "config.json"),
        Case("links", "push: a weights file that is a link", push_with(symlinked_weights), "model.safetensors"),
        Case("links", "push: a weights file with a hard link", push_with(hard_linked_weights), "hard link"),
        Case("links", "push: the model folder a link", push_with(linked_model_folder), "link"),
    ]
    return cases


def from_environment(key: str, value: str):
    """The base config with `key` read from the environment variable holding a value that embeds the secret."""
    def setup(folder: Path) -> list[str]:
        os.environ[SECRET_VAR] = value  # R2 restores the environment after each in-process case
        cfg = base_config(folder)
        section, name = key.split(".")
        cfg[section][name] = f"${{oc.env:{SECRET_VAR}}}"
        return finetune(folder, cfg)
    return setup


def secret_cases() -> list[Case]:
    expression = f"${{oc.env:{SECRET_VAR}}}"
    return [Case("secrets", f"error echoing {key} from the environment", from_environment(key, value), expression,
                 absent=SECRET)
            for key, value in (("model.pretrained_model_name_or_path", f"/nowhere/{SECRET}"),
                               ("dataset.dataset_name", f"/nowhere/{SECRET}.json"),
                               ("step_scheduler.max_steps", SECRET),
                               ("checkpoint.save_consolidated", SECRET),
                               ("model.dtype", SECRET))]


def at_rest_cases() -> list[Case]:
    return provenance_cases() + link_cases() + secret_cases()
