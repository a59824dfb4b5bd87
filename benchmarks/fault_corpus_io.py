"""R2's corpus, continued: malformed checkpoints, paths and environments (see benchmarks/fault_corpus.py).

Checkpoint cases start from `real_step`, a step folder a short real run of this user wrote (made once by
benchmarks/faults.py), copied into the case's folder and then damaged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fault_corpus import STORIES, Case, base_config, finetune, with_set


def copied_run(real_step: Path, folder: Path) -> Path:
    """The real run's checkpoint_dir copied (R2 runs with a ledger that never saw it: the copy is untrusted)."""
    ckpt = folder / "ckpt"
    shutil.copytree(real_step.parent, ckpt, ignore=shutil.ignore_patterns("*.png"))
    return ckpt / real_step.name


def resume(damage, *overrides: str, trusted: bool = True):
    def setup(folder: Path, real_step: Path) -> list[str]:
        step = copied_run(real_step, folder)
        damage(step)
        cfg = base_config(folder)
        cfg["step_scheduler"]["max_steps"] = 3
        cfg["checkpoint"].update(restore_from=str(step))
        trust = ["--checkpoint.trust_pickled_state", "true"] if trusted else []  # the person's switch, not the file's
        return finetune(folder, cfg, *overrides, *trust)
    return setup


def tool(command: str, damage=None, *extra: str, target: str = "step"):
    """`automodel <command> PATH ...` on the copied run (its step folder or checkpoint_dir) after `damage`."""
    def setup(folder: Path, real_step: Path) -> list[str]:
        step = copied_run(real_step, folder)
        if damage:
            damage(step)
        path = {"step": step, "ckpt": step.parent, "model": step / "model"}[target]
        return [command, str(path), *[a.replace("{folder}", str(folder)) for a in extra]]
    return setup


def remove(name):
    return lambda step: (shutil.rmtree if (step / name).is_dir() else os.remove)(step / name)


def write(name, content):
    def damage(step):
        (step / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return damage


def truncate(name):
    def damage(step):
        path = step / name
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])
    return damage


def checkpoint_cases() -> list[Case]:
    resume_cases = [
        ("trainer_state.json missing", remove("trainer_state.json"), "trainer_state.json"),
        ("trainer_state.json not json", write("trainer_state.json", "{oops"), "trainer_state.json"),
        ("trainer_state.json without train_state", write("trainer_state.json", json.dumps({"lr_scheduler": {}})),
         "trainer_state.json"),
        ("trainer_state.json a list", write("trainer_state.json", "[1]"), "trainer_state.json"),
        ("dcp folder missing", remove("dcp"), "dcp"),
        ("dcp metadata truncated", truncate("dcp/.metadata"), "dcp"),
        ("dcp metadata garbage", write("dcp/.metadata", b"\x80\x04garbage"), "dcp"),
        ("dcp data truncated", truncate("dcp/__0_0.distcp"), "dcp"),
        ("rng state corrupt", write("rng/rank_0.pt", b"not a torch file"), "rank_0.pt"),
        ("config.yaml missing", remove("config.yaml"), "config.yaml"),
        ("config.yaml another model", write("config.yaml", "model: {pretrained_model_name_or_path: other}\n"),
         "model.pretrained_model_name_or_path"),
        ("config.yaml not yaml", write("config.yaml", "model: [\n"), "config.yaml"),
    ]
    cases = [Case("checkpoints", f"resume: {label}", resume(damage), expect) for label, damage, expect in resume_cases]
    cases.append(Case("checkpoints", "resume: copied in, not trusted", resume(lambda s: None, trusted=False),
                      "checkpoint.restore_from"))
    cases.append(Case("checkpoints", "resume: restore_from missing", with_set("checkpoint.restore_from", "/nonexistent/step_3"),
                      "restore_from"))
    cases.append(Case("checkpoints", "resume: restore_from is a file",
                      with_set("checkpoint.restore_from", str(STORIES / "config.json")), "restore_from"))

    def latest(text):
        def setup(folder: Path, real_step: Path) -> list[str]:
            step = copied_run(real_step, folder)
            (step.parent / "LATEST").write_text(text)
            return finetune(folder, base_config(folder))
        return setup
    for text in ("step_99\n", "../../etc\n", "", "\x00\x01"):
        cases.append(Case("checkpoints", f"LATEST {text!r}", latest(text), "LATEST"))
    cases += [
        Case("checkpoints", "export: not a step folder", tool("export", target="model"), "not an automodel step"),
        Case("checkpoints", "export: copied in, not trusted", tool("export", None, "--output", "{folder}/out"),
             "export"),
        Case("checkpoints", "export: output exists", tool("export", None, "--trust-pickled-state"), "model"),
        Case("checkpoints", "export: config.yaml missing", tool("export", remove("config.yaml"), "--trust-pickled-state"),
             "config.yaml"),
        Case("checkpoints", "export: config with untrusted target",
             tool("export", write("config.yaml", "loss_fn: {_target_: os.system}\n"), "--trust-pickled-state",
                  "--output", "{folder}/out"), "loss_fn._target_"),
        Case("checkpoints", "generate: adapter-less model folder", tool("generate", remove("model/config.json"),
                                                                       "--prompt", "x"), "model"),
        Case("checkpoints", "generate: weights truncated", tool("generate", truncate("model/model.safetensors"),
                                                               "--prompt", "x"), "model"),
        Case("checkpoints", "generate: LATEST garbage", tool("generate", lambda s: (s.parent / "LATEST").write_text(
            "../x"), "--prompt", "x", target="ckpt"), "LATEST"),
        Case("checkpoints", "push: no weights", tool("push", remove("model/model.safetensors"), "--repo-id", "a/b",
                                                     "--dry-run", target="model"), "safetensors"),
        Case("checkpoints", "push: bad repo id", tool("push", None, "--repo-id", "not a repo", "--dry-run",
                                                      target="model"), "repo"),
    ]
    return cases


def path_cases() -> list[Case]:
    def file_at(name):
        def setup(folder: Path) -> Path:
            (folder / name).write_text("a file")
            return folder / name
        return setup
    return [
        Case("paths", "config missing", lambda f: ["finetune", "llm", "-c", str(f / "missing.yaml")], "missing.yaml"),
        Case("paths", "config is a folder", lambda f: ["finetune", "llm", "-c", str(f)], str("config")),
        Case("paths", "short form config missing", lambda f: [str(f / "nope.yaml")], "nope.yaml"),
        Case("paths", "checkpoint_dir is a file", lambda f: finetune(f, {**base_config(f), "checkpoint": {
            "checkpoint_dir": str(file_at("taken")(f))}}), "checkpoint_dir"),
        Case("paths", "checkpoint_dir under a file", lambda f: finetune(f, {**base_config(f), "checkpoint": {
            "checkpoint_dir": str(file_at("taken")(f) / "sub")}}), "checkpoint_dir"),
        Case("paths", "model path is a file", with_set("model.pretrained_model_name_or_path", str(STORIES / "config.json")),
             "model"),
        Case("paths", "model path missing", with_set("model.pretrained_model_name_or_path", "./no/such/model"),
             "model"),
        Case("paths", "model path empty", with_set("model.pretrained_model_name_or_path", ""), "model"),
        Case("paths", "metrics_file is a folder", with_set("logging.metrics_file", "/"), "metrics_file"),
        Case("paths", "metrics_file outside checkpoint_dir", with_set("logging.metrics_file", "../../m.jsonl"),
             "metrics_file"),
        Case("paths", "serve --name ..", lambda f: ["serve", str(STORIES), "--output", str(f / "o"), "--name", ".."],
             "--name"),
        Case("paths", "serve --name a/b", lambda f: ["serve", str(STORIES), "--output", str(f / "o"), "--name", "a/b"],
             "--name"),
        Case("paths", "serve --name ../../x", lambda f: ["serve", str(STORIES), "--output", str(f / "o"), "--name",
                                                         "../../x"], "--name"),
        Case("paths", "serve model missing", lambda f: ["serve", "./missing", "--output", str(f / "o")], "missing"),
        Case("paths", "merge: output is a link", lambda f: (
            (f / "link").symlink_to(f / "elsewhere", target_is_directory=True) or
            ["merge-lora", str(STORIES), "--output", str(f / "link")]), "model"),
        Case("paths", "plot: missing folder", lambda f: ["plot", str(f / "none")], "none"),
        Case("paths", "plot: a file", lambda f: ["plot", str(file_at("m.txt")(f))], "m.txt"),
        Case("paths", "generate: model is a file", lambda f: ["generate", str(STORIES / "config.json"), "--prompt", "x"],
             "config.json"),
        Case("paths", "eval: prompts file missing", lambda f: ["generate", str(STORIES), "--prompts-file",
                                                               str(f / "p.txt")], "p.txt"),
        Case("paths", "export: step folder missing", lambda f: ["export", str(f / "step_1")], "step_1"),
    ]


def env_cases() -> list[Case]:
    """Run as subprocesses (the process environment is the input)."""
    cases = []
    for label, value, expect in [("unset variable, no default", "${oc.env:AUTOMODEL_BENCH_UNSET}", "AUTOMODEL_BENCH_UNSET"),
                                 ("empty interpolation", "${oc.env:}", "${oc.env:}"),
                                 ("unclosed interpolation", "${oc.env:HOME", "${oc.env:HOME"),
                                 ("nested interpolation", "${oc.env:${HOME}}", "${oc.env:"),
                                 ("plain unset variable", "${AUTOMODEL_BENCH_UNSET}", "AUTOMODEL_BENCH_UNSET")]:
        cases.append(Case("environment", label, with_set("model.pretrained_model_name_or_path", value), expect))
    for label, env, expect in [
            ("AUTOMODEL_ALLOW_TARGETS widens nothing for os.system", {"AUTOMODEL_ALLOW_TARGETS": "subprocess"},
             "loss_fn._target_"),
            ("AUTOMODEL_CACHE is a file", {"AUTOMODEL_CACHE": "{folder}/cachefile"}, "AUTOMODEL_CACHE"),
            ("WORLD_SIZE not a number", {"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
            ("RANK beyond WORLD_SIZE", {"WORLD_SIZE": "1", "RANK": "3", "LOCAL_RANK": "0"}, "RANK"),
            ("LOCAL_RANK garbage", {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK"),
            # The error names the variable, not its value (docs/security.md: no secrets in error messages).
            ("AUTOMODEL_ASSETS missing", {"AUTOMODEL_ASSETS": "/nonexistent/assets"}, "${oc.env:AUTOMODEL_ASSETS}")]:
        def setup(folder: Path, label=label) -> list[str]:
            (folder / "cachefile").write_text("x")
            cfg = base_config(folder)
            if "ALLOW" in label:
                cfg["loss_fn"] = {"_target_": "os.system", "command": "true"}
            if "ASSETS" in label:
                cfg["model"]["pretrained_model_name_or_path"] = "${oc.env:AUTOMODEL_ASSETS,x}/models/stories260K"
            return finetune(folder, cfg)
        cases.append(Case("environment", label, setup, expect, env=env))
    return cases
