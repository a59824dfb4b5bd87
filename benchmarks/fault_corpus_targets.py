"""R2's corpus, attacks on the trust boundary (issue 26, points 1, 2 and 4): `_target_`s that walk to or name a
code loader, trust switches set by a config file or a step's saved config.yaml, and `serve` run from a folder
holding someone else's `.venv-vllm`. Every payload is harmless (`id > PWNED` in the case's folder): the corpus
checks that no PWNED file appears and that nothing else is created.
"""

from __future__ import annotations

import json
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml
from fault_corpus import STORIES, Case, base_config, finetune
from fault_corpus_io import tool

CATEGORY = "attacks"


def payload(folder: Path) -> str:
    return f"id > {folder / 'PWNED'}"


def evil_module(folder: Path, name: str = "evil_mod") -> Path:
    """A Python file that runs the payload when imported, in its own folder (also on no import path)."""
    code = folder / "code"
    code.mkdir(exist_ok=True)
    (code / f"{name}.py").write_text(f"import os\nos.system({payload(folder)!r})\nclass Evil:\n    pass\n")
    return code


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def evil_pickle(folder: Path) -> Path:
    path = folder / "weights.bin"
    path.write_bytes(pickle.dumps(_Payload(payload(folder))))
    return path


def loss_target(target: str, **kwargs):
    """The base config with `loss_fn` calling `target`; `{payload}` and `{folder}` in values are filled in."""
    def setup(folder: Path) -> list[str]:
        evil_module(folder)
        cfg = base_config(folder)
        cfg["loss_fn"] = {"_target_": target, **{k: v.format(payload=payload(folder), folder=folder, pickle=evil_pickle(
            folder)) if isinstance(v, str) else v for k, v in kwargs.items()}}
        return finetune(folder, cfg)
    return setup


def remote_code_model(folder: Path) -> Path:
    """stories260K whose config.json asks for the repo's own configuration class, which runs the payload."""
    model = folder / "remote_model"
    shutil.copytree(STORIES, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(f"import os\nos.system({payload(folder)!r})\n"
                                                 "from transformers import LlamaConfig\n"
                                                 "class EvilConfig(LlamaConfig):\n    pass\n")
    return model


def with_switch(edit):
    def setup(folder: Path) -> list[str]:
        cfg = base_config(folder)
        edit(cfg, folder)
        return finetune(folder, cfg)
    return setup


def saved_config(edit):
    """A damage for fault_corpus_io.tool: the step's config.yaml edited by someone else."""
    def damage(step: Path) -> None:
        cfg = yaml.safe_load((step / "config.yaml").read_text())
        edit(cfg, step.parents[1])
        (step / "config.yaml").write_text(yaml.safe_dump(cfg))
    return damage


@dataclass
class InFolderCase(Case):
    """Run with the case's folder as the current directory (benchmarks/faults.py)."""

    run_in_folder: bool = True


def serve_from_planted_folder(folder: Path) -> list[str]:
    """`serve --run` from a folder that holds someone else's `.venv-vllm/bin/python` (it writes PWNED when run).
    --device cuda stops it after vLLM was looked for: the CPU build is not for CUDA, or no vLLM is installed."""
    python = folder / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\n{payload(folder)}\nexit 1\n")
    python.chmod(0o755)
    with socket.socket() as probe:  # a free port: the port check comes before vLLM is looked for
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["serve", str(STORIES), "--output", str(folder / "serve"), "--run", "--device", "cuda", "--port", str(port)]


def target_cases() -> list[Case]:
    walks = [("automodel.config.trust.os.system", {"command": "{payload}"}),
             ("transformers.modeling_utils.os.system", {"command": "{payload}"}),
             ("torch.utils.data.dataloader.os.system", {"command": "{payload}"}),
             ("torch.optim.optimizer.torch.load", {"f": "{pickle}"}),
             ("datasets.load.importlib.import_module", {"name": "evil_mod"}),
             ("torch.nn.modules.module.torch.hub.load", {"repo_or_dir": "{folder}/code", "model": "x",
                                                         "source": "local"}),
             ("automodel.data.squad.Path", {}), ("torch.optim.AdamW.__init__", {}),
             ("automodel.models.loader.__builtins__", {})]
    loaders = [("transformers.dynamic_module_utils.get_class_from_dynamic_module",
                {"class_reference": "evil_mod.Evil", "pretrained_model_name_or_path": "{folder}/code"}),
               ("transformers.dynamic_module_utils.get_class_in_module",
                {"class_name": "Evil", "module_path": "{folder}/code/evil_mod.py"}),
               ("transformers.pipeline", {"task": "text-generation", "model": "{folder}/code",
                                          "trust_remote_code": False}),
               ("datasets.load.import_main_class", {"module_path": "evil_mod"}),
               ("transformers.modeling_utils.load_state_dict", {"checkpoint_file": "{pickle}",
                                                                "weights_only": True}),
               ("peft.utils.save_and_load.torch_load", {"f": "{pickle}"}),
               ("torch.utils.data.datapipes.utils.decoder.basichandlers", {"key": "x.pickle", "data": "x"}),
               ("automodel.config.instantiate.build", {"node": "x", "key": "k"}),
               ("automodel.logging.backends.require", {"module": "evil_mod"}),
               ("automodel.checkpoint.state.load_training_state", {}),
               ("transformers.utils.import_utils.direct_transformers_import", {"path": "{folder}/code"})]
    cases = [Case(CATEGORY, f"target walks: {t}", loss_target(t, **kw), "loss_fn._target_") for t, kw in walks]
    cases += [Case(CATEGORY, f"target loads code: {t}", loss_target(t, **kw), "loss_fn._target_") for t, kw in loaders]
    cases.append(Case(CATEGORY, "target walk as an override", lambda f: finetune(
        f, base_config(f), "--loss_fn._target_", "automodel.models.loader.os.system", "--loss_fn.command", payload(f)),
        "loss_fn._target_"))
    return cases


def switch_cases() -> list[Case]:
    def model(cfg, folder):
        cfg["model"].update(pretrained_model_name_or_path=str(remote_code_model(folder)), trust_remote_code=True)

    def tokenizer(cfg, folder):
        cfg["tokenizer"] = {"_target_": "transformers.AutoTokenizer.from_pretrained",
                            "pretrained_model_name_or_path": str(remote_code_model(folder)), "trust_remote_code": True}

    def allow(prefix):
        def edit(cfg, folder):
            cfg["allow_targets"] = [prefix]
            cfg["loss_fn"] = {"_target_": "torch.load", "f": str(evil_pickle(folder))}
        return edit

    edits = [("model.trust_remote_code: true, remote-code model", model, "model.trust_remote_code"),
             ("tokenizer target with trust_remote_code", tokenizer, "tokenizer.trust_remote_code"),
             ("trust_remote_code from ${oc.env:HOME}", lambda c, f: c["model"].update(
                 trust_remote_code="${oc.env:HOME}"), "model.trust_remote_code"),
             ("checkpoint.trust_pickled_state: true", lambda c, f: c["checkpoint"].update(trust_pickled_state=True),
              "checkpoint.trust_pickled_state"),
             ("weights_only: false in a target", lambda c, f: c["model"].update(
                 _target_="automodel.models.load_causal_lm", weights_only=False), "model.weights_only"),
             ("allow_pickle: true in a target", lambda c, f: c["dataset"].update(allow_pickle=True),
              "dataset.allow_pickle")]
    edits += [(f"allow_targets: [{p}] in the file", allow(p), "allow_targets") for p in ("yaml", "setuptools",
                                                                                         "torch", "os")]
    cases = [Case(CATEGORY, f"config file: {label}", with_switch(edit), expect) for label, edit, expect in edits]

    def trust(cfg, folder):
        cfg.setdefault("model", {})["trust_remote_code"] = True

    def widen(cfg, folder):
        cfg.update(allow_targets=["setuptools"], loss_fn={"_target_": "setuptools.sandbox.run_setup"})

    commands = [("export", ("--trust-pickled-state", "--output", "{folder}/out")),
                ("generate", ("--prompt", "x", "--device", "cpu")),
                ("eval", ("squad", "--limit", "1", "--device", "cpu")),
                ("serve", ("--output", "{folder}/out")), ("serve", ("--output", "{folder}/out", "--merge"))]
    for command, extra in commands:
        cases.append(Case(CATEGORY, f"saved config.yaml trust_remote_code: {command} {' '.join(extra[:2])}",
                          _saved(command, trust, extra), "--trust-remote-code"))
    cases.append(Case(CATEGORY, "saved config.yaml allow_targets: export", _saved("export", widen, (
        "--trust-pickled-state", "--output", "{folder}/out")), "allow_targets"))
    return cases


def _saved(command: str, edit, extra: tuple[str, ...]):
    if command == "eval":  # `automodel eval squad STEP`: the step comes after the benchmark's name
        inner = tool("eval", saved_config(edit), *extra[1:])

        def setup(folder: Path, real_step: Path) -> list[str]:
            argv = inner(folder, real_step)
            return [argv[0], "squad", *argv[1:]]
        return setup
    return tool(command, saved_config(edit), *extra)


def serve_cases() -> list[Case]:
    return [InFolderCase(CATEGORY, "serve --run from a folder with its own .venv-vllm", serve_from_planted_folder,
                         "vLLM")]


def attack_cases() -> list[Case]:
    return target_cases() + switch_cases() + serve_cases()
