"""R2's corpus: malformed inputs for the CLI (configs, overrides, data files and rows, tokenizers, checkpoints, paths,
environment), each with the text its one-line error must name. Used by benchmarks/faults.py.

Every case gets its own folder; `setup(folder)` writes its files and returns the argv.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("AUTOMODEL_ASSETS", REPO.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
SQUAD_TRAIN = ASSETS / "squad_v1.1" / "train-v1.1.subset.json"


@dataclass
class Case:
    category: str
    name: str
    setup: Callable[[Path], list[str]]
    expect: str  # what the error line must name (key, file or row)
    env: dict[str, str] = field(default_factory=dict)
    absent: str = ""  # text the output must not hold (a secret read from the environment)
    forbidden: str = ""  # a path, relative to the case's folder, that must not be created (an attack's payload)


def base_config(folder: Path) -> dict:
    """A valid 1-step full fine-tune of stories260K on 8 SQuAD questions."""
    return {
        "recipe": "llm_finetune", "seed": 1,
        "model": {"pretrained_model_name_or_path": str(STORIES)},
        "dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(SQUAD_TRAIN),
                    "split": "train", "seq_length": 128, "limit_dataset_samples": 8},
        "step_scheduler": {"global_batch_size": 2, "local_batch_size": 2, "max_steps": 1},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
        "checkpoint": {"checkpoint_dir": str(folder / "ckpt")},
        "logging": {"progress_bar": False, "plot": False},
    }


def write_yaml(folder: Path, cfg, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return path


def finetune(folder: Path, cfg, *overrides: str) -> list[str]:
    return ["finetune", "llm", "-c", str(write_yaml(folder, cfg)), *overrides]


def with_set(dotted: str, value):
    """A setup: the base config with `dotted` set to `value` (a missing section is created)."""
    def setup(folder: Path) -> list[str]:
        cfg = base_config(folder)
        node, parts = cfg, dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        return finetune(folder, cfg)
    return setup


def with_override(*overrides: str):
    return lambda folder: finetune(folder, base_config(folder), *overrides)


def with_data_file(name: str, content: str | bytes, builder: str = "squad", extra: dict | None = None):
    def setup(folder: Path) -> list[str]:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        cfg = base_config(folder)
        if builder == "squad":
            cfg["dataset"]["dataset_name"] = str(path)
        else:
            cfg["dataset"] = {"_target_": f"automodel.data.{builder}.make_{builder}_dataset",
                              "dataset_name": str(path), "seq_length": 128, **(extra or {})}
        return finetune(folder, cfg)
    return setup


def config_cases() -> list[Case]:
    cases = []
    sections = ["model", "dataset", "step_scheduler", "optimizer", "checkpoint", "logging", "lr_scheduler",
                "distributed", "dist_env", "peft", "loss_fn", "dataloader", "tokenizer", "clip_grad_norm",
                "packed_sequence", "validation_dataset"]
    for section in sections:
        for label, value in (("list", [1, 2]), ("number", 7), ("text", "oops")):
            if section == "clip_grad_norm" and label == "number":
                continue  # a number is its max_norm
            cases.append(Case("config", f"{section} is a {label}", with_set(section, value), section))
    for typo in ("modle", "datset", "step_schedular", "optimiser", "chekpoint", "loging"):
        cases.append(Case("config", f"section typo {typo}", with_set(typo, {}), typo))
    for dotted, value in [("step_scheduler.max_steps", "ten"), ("step_scheduler.max_steps", -3),
                          ("step_scheduler.global_batch_size", 0), ("step_scheduler.global_batch_size", 3),
                          ("step_scheduler.local_batch_size", "two"), ("step_scheduler.max_stepz", 5),
                          ("step_scheduler.val_every_steps", "x"), ("step_scheduler.num_epochs", -1),
                          ("lr_scheduler.decay", "cosin"), ("lr_scheduler.warmup_steps", "a"),
                          ("checkpoint.keep_last_n", 0), ("checkpoint.enabled", "maybe"),
                          ("checkpoint.save_consolidated", "sometimes"), ("checkpoint.restore_fromm", "x"),
                          ("logging.level", "LOUD"), ("logging.wandb", {"projetc": "x"}),
                          ("logging.mlflow", {"tags": ["a"]}), ("logging.progress_bar", "yes"),
                          ("distributed.strategy", "magic"), ("distributed.tp_size", 0),
                          ("dist_env.timeout_minutes", 0), ("dist_env.timeout_minutes", "soon"),
                          ("peft.dim", "eight"), ("peft.target_modules", 5), ("peft.alpha", [1]),
                          ("peft.dropout", "high"), ("peft.rank", 8),
                          ("clip_grad_norm.max_norm", -1), ("clip_grad_norm.max_norm", "big"),
                          ("optimizer.lr", "abc"), ("optimizer.lrr", 1e-3), ("optimizer.betas", "x"),
                          ("model.dtype", "float13"), ("model.attn_implementation", "warp"),
                          ("dataset.seq_length", 0), ("dataset.seq_length", "long"),
                          ("dataset.limit_dataset_samples", -5), ("dataset.answer_only_loss", "yes"),
                          ("dataset.prompt_template", "{nothing}"), ("dataset.unknown_option", 1),
                          ("packed_sequence.packed_sequence_size", -1), ("seed", "random"), ("recipe", "llm_pretrain")]:
        cases.append(Case("config", f"{dotted}={value!r}", with_set(dotted, value), dotted.split(".")[-1]))
    for target in ("os.system", "subprocess.Popen", "builtins.eval", "torch.load", "pickle.loads", "shutil.rmtree",
                   "importlib.import_module", "torch.hub.load", "nosuchpkg.Thing", "torch.optim.AdamWW"):
        cases.append(Case("config", f"optimizer target {target}", with_set("optimizer._target_", target),
                          "optimizer._target_"))
    for target in ("", 5, "torch.optim", "automodel.data.squad.DEFAULT_PROMPT_TEMPLATE"):
        cases.append(Case("config", f"dataset target {target!r}", with_set("dataset._target_", target),
                          "dataset._target_"))
    cases.append(Case("config", "dataset section missing", lambda f: finetune(
        f, {k: v for k, v in base_config(f).items() if k != "dataset"}), "dataset"))
    cases.append(Case("config", "allow_targets stdlib in file", with_set("allow_targets", ["os"]), "allow_targets"))
    cases.append(Case("config", "allow_targets not a list", with_set("allow_targets", [3]), "allow_targets"))
    texts = {"tab indentation": "model:\n\tpretrained_model_name_or_path: x\n", "unclosed list": "peft: [a, b\n",
             "bad indentation": "model:\n  a: 1\n b: 2\n", "top-level list": "- 1\n- 2\n",
             "top-level scalar": "hello\n", "duplicate colon": "model: a: b\n", "unclosed quote": "seed: 'x\n"}
    for label, text in texts.items():
        cases.append(Case("config", f"YAML {label}", lambda f, t=text: finetune(f, t), "cfg.yaml"))
    cases.append(Case("config", "binary config", lambda f: ["finetune", "llm", "-c", str(
        (f / "cfg.yaml").write_bytes(b"\x00\xff\xfe\x80binary") and f / "cfg.yaml")], "cfg.yaml"))
    cases.append(Case("config", "empty config", lambda f: finetune(f, ""), "dataset"))
    return cases


def override_cases() -> list[Case]:
    bad = [(["--"], "--"), (["--step_scheduler.max_steps"], "--step_scheduler.max_steps"),
           (["--.max_steps", "1"], "--.max_steps"), (["--step_scheduler..max_steps", "1"], "max_steps"),
           (["stray"], "stray"), (["--step_scheduler.max_steps", "abc"], "step_scheduler.max_steps"),
           (["--step_scheduler.max_steps=-1"], "max_steps"), (["--model.dtype", "half-ish"], "model.dtype"),
           (["--step_scheduler", "5"], "step_scheduler"), (["--model.pretrained_model_name_or_path.x", "1"], "model"),
           (["--optimizer.lr", "[1, 2]"], "optimizer"), (["--peft.dim", "{a: 1}"], "peft.dim"),
           (["--loss_fn._target_", "os.system", "--loss_fn.command", "touch PWNED"], "loss_fn._target_"),
           (["--optimizer._target_", "subprocess.run"], "optimizer._target_"),
           (["--dataset.tokenizer._target_", "builtins.exec"], "dataset.tokenizer._target_"),
           (["--checkpoint.keep_last_n", "0"], "keep_last_n"), (["--logging.level", "SHOUT"], "logging.level"),
           (["--distributed.strategy", "fsdp9"], "distributed.strategy"), (["--recipe", "other"], "recipe"),
           (["--unknown_section.key", "1"], "unknown_section"), (["--seed", "[1"], "seed"),
           (["--step_scheduler.global_batch_size", "3"], "global_batch_size"),
           (["--lr_scheduler.decay", "exp"], "lr_scheduler.decay"), (["--dataset.seq_length", "-4"], "seq_length"),
           (["--dataset.limit_dataset_samples", "0"], "limit_dataset_samples"),
           (["--model.pretrained_model_name_or_path", "/nonexistent/model"], "/nonexistent/model"),
           (["--checkpoint.restore_from", "/nonexistent/step_1"], "restore_from"),
           (["--allow_targets", "[os]"], "allow_targets"), (["--allow-target", "", "--seed", "1"], "--allow-target"),
           (["--log-level", "LOUD"], "--log-level"), (["--nproc-per-node", "zero"], "--nproc-per-node"),
           (["--nproc-per-node", "2", "--distributed.tp_size", "3"], "tp_size")]
    return [Case("overrides", " ".join(argv), with_override(*argv), expect) for argv, expect in bad]


SQUAD_ROW = {"id": "1", "title": "t", "context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France"], "answer_start": [12]}}


def data_cases() -> list[Case]:
    rows = [SQUAD_ROW] * 4
    squad = [("missing file", None, "missing.json"), ("empty file", "", "data.json"), ("not json", "{oops", "data.json"),
             ("json scalar", "42", "data.json"), ("list of strings", '["a", "b"]', "data.json"),
             ("nested without paragraphs", json.dumps({"data": [{"title": "x"}]}), "row 0"),
             ("paragraph without qas", json.dumps({"data": [{"paragraphs": [{"context": "c"}]}]}), "paragraph 0"),
             ("row without context", json.dumps([{k: v for k, v in SQUAD_ROW.items() if k != "context"}] * 4), "row 0"),
             ("row without question", json.dumps([{k: v for k, v in SQUAD_ROW.items() if k != "question"}] * 4), "row 0"),
             ("answers not a mapping", json.dumps([{**SQUAD_ROW, "answers": "France"}] * 4), "row 0"),
             ("question is a number", json.dumps([{**SQUAD_ROW, "question": 5}] * 4), "row 0"),
             ("bad third row", json.dumps(rows[:2] + [{"title": 1}] + rows[:1]), "row 2"),
             ("unsupported suffix", "a,b\n", "data.xyz"), ("binary json", b"\x89PNG\r\n\x1a\n\x00", "data.json"),
             ("utf-16 json", json.dumps(rows).encode("utf-16"), "data.json"),
             ("empty list", "[]", "dataset")]
    cases = []
    for label, content, expect in squad:
        name = "data.xyz" if label == "unsupported suffix" else "data.json"
        if content is None:
            cases.append(Case("data", f"squad {label}", with_set("dataset.dataset_name", "/nonexistent/missing.json"),
                              expect))
        else:
            cases.append(Case("data", f"squad {label}", with_data_file(name, content), expect))
    good = [{"instruction": "say hi", "output": "hi"}] * 4
    jsonl = lambda items: "\n".join(json.dumps(i) for i in items) + "\n"  # noqa: E731
    instruction = [("bad json line", jsonl(good[:2]) + "{oops\n", "data.jsonl", "row 2"),
                   ("missing column", jsonl([{"instruction": "x"}] * 4), "data.jsonl", "column_mapping"),
                   ("output is a list", jsonl(good[:1] + [{"instruction": "x", "output": [1]}] + good[:2]), "data.jsonl",
                    "row 1"),
                   ("empty jsonl", "", "data.jsonl", "data.jsonl"),
                   ("csv without columns", "a,b\n1,2\n", "data.csv", "column_mapping"),
                   ("jsonl of scalars", "1\n2\n3\n", "data.jsonl", "data.jsonl"),
                   ("unknown role mapping", jsonl(good), "data.jsonl", "column_mapping.speaker"),
                   ("bad prompt template", jsonl(good), "data.jsonl", "prompt_template")]
    for label, content, name, expect in instruction:
        extra = {"column_mapping": {"speaker": "instruction", "answer": "output"}} if "role" in label else \
            {"prompt_template": "{nothing}"} if "template" in label else {}
        cases.append(Case("data", f"instruction {label}", with_data_file(name, content, "instruction", extra),
                          expect))
    chat = [("messages not a list", jsonl([{"messages": "hi"}] * 4), "row 0"),
            ("unknown role", jsonl([{"messages": [{"role": "wizard", "content": "x"}]}] * 4), "row 0"),
            ("no messages column", jsonl([{"text": "x"}] * 4), "messages"),
            ("content not text", jsonl([{"messages": [{"role": "user", "content": 5}]}] * 4), "row 0")]
    template = {"tokenizer": {"chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                              "{% endfor %}"}}
    for label, content, expect in chat:
        cases.append(Case("data", f"chat {label}", with_data_file("chat.jsonl", content, "chat", template), expect))
    cases.append(Case("data", "dataset_name is a folder", with_set("dataset.dataset_name", str(ASSETS / "models")),
                      str(ASSETS / "models")))
    cases.append(Case("data", "dataset_name glob matching nothing", with_set("dataset.dataset_name", "/tmp/none*.json"),
                      "none*.json"))
    cases.append(Case("data", "dataset_name a number", with_set("dataset.dataset_name", 5), "dataset_name"))
    return cases


def tokenizer_folder(folder: Path, keep: tuple[str, ...], corrupt: dict[str, str] | None = None) -> Path:
    model = folder / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(STORIES / name, model / name)
    for name, text in (corrupt or {}).items():
        (model / name).write_text(text)
    return model


def tokenizer_cases() -> list[Case]:
    def model_at(keep, corrupt=None):
        return lambda f: finetune(f, {**base_config(f), "model": {
            "pretrained_model_name_or_path": str(tokenizer_folder(f, keep, corrupt))}})
    all_files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    no_config = tuple(n for n in all_files if n != "config.json")
    cases = [Case("tokenizer", "model folder without config.json", model_at(no_config), "model"),
             Case("tokenizer", "model folder without tokenizer", model_at(("config.json", "model.safetensors")),
                  "model"),
             Case("tokenizer", "corrupt tokenizer.json", model_at(all_files, {"tokenizer.json": "{not json"}), "model"),
             Case("tokenizer", "tokenizer_config not json", model_at(all_files, {"tokenizer_config.json": "]"}),
                  "model"),
             Case("tokenizer", "config.json not json", model_at(all_files, {"config.json": "{"}), "model"),
             Case("tokenizer", "config.json without model_type", model_at(all_files, {"config.json": "{}"}), "model"),
             Case("tokenizer", "weights truncated", model_at(all_files, {"model.safetensors": "xx"}), "model")]
    for dotted, value, expect in [("tokenizer", 5, "tokenizer"), ("tokenizer.add_bos", "yes", "tokenizer.add_bos"),
                                  ("tokenizer.padding_side", "middle", "padding_side"),
                                  ("tokenizer.chat_template", "/nonexistent/t.jinja", "chat_template"),
                                  ("tokenizer.pretrained_model_name_or_path", "/nonexistent/tok", "/nonexistent/tok"),
                                  ("dataset.tokenizer", [1], "dataset.tokenizer"),
                                  ("tokenizer._target_", "os.getcwd", "tokenizer._target_")]:
        cases.append(Case("tokenizer", f"{dotted}={value!r}", with_set(dotted, value), expect))
    return cases
