"""A config `_target_` names a callable by its own module and reaches nothing that imports code, executes a string,
unpickles or starts a program: the attacks of issue 26 (harmless payloads: `id > FILE` in a temporary folder), and
every callable of the trusted packages a config can reach, checked against that rule (tests/target_reach.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from automodel.cli.main import main
from automodel.config import build, resolve_target, target_policy
from automodel.config.switches import SWITCHES
from automodel.config.trust import DENIED, denied_by
from automodel.errors import UserError
from tests.conftest import REPO_ROOT
from tests.helpers import tiny_squad_config
from tests.target_reach import package_files, reachable_callables, scan_module

PEFT_EXAMPLE = REPO_ROOT / "examples" / "llm_finetune" / "stories260K_squad_peft.yaml"

# Flagged by the static rule but reachable on purpose: what keeps the act from being a config's choice. A switch
# names the keyword that turns the act on, which a config file cannot set (config/switches.py).
REVIEWED: dict[str, tuple[str | None, str]] = {
    "automodel.training.host_memory.return_freed_memory_promptly":
        (None, "opens the C library ctypes.util.find_library('c') names, never one from its caller"),
    "transformers.generation.utils.GenerationMixin":
        ("trust_remote_code", "imports a `custom_generate` folder's code only with trust_remote_code=True"),
    "transformers.modeling_utils.PreTrainedModel":
        ("weights_only", "from_pretrained unpickles .bin weights only with weights_only=False (default True)"),
    "transformers.models.auto":
        ("trust_remote_code", "Auto*.from_pretrained import a repo's code only with trust_remote_code=True"),
    "peft.tuners.boft.layer": (None, "compiles the kernel source shipped inside peft (fbd_cuda), none from a caller"),
    "peft.tuners.lora.tp_layer.dispatch_megatron":
        (None, "imports LoraConfig.megatron_core only inside peft's own module allow-list (megatron.*)"),
    "datasets.load": (None, "imports one of datasets' packaged builders (json, csv, parquet, ...): datasets 5 runs "
                            "no dataset scripts"),
}


def _reviewed(name: str) -> tuple[str | None, str] | None:
    return next((why for prefix, why in REVIEWED.items() if name == prefix or name.startswith(prefix + ".")), None)


@pytest.fixture(scope="module")
def reachable():
    return reachable_callables()


def test_every_reachable_callable_that_loads_code_is_refused(reachable):
    found, refused_modules = reachable
    assert len(found) > 20000 and refused_modules > 50, "the packages were really enumerated"
    flagged = [c for c in found if c.acts]
    unrefused = [f"{c.name}: {', '.join(sorted(c.acts))}" for c in flagged
                 if not denied_by(c.name) and _reviewed(c.name) is None]
    assert unrefused == [], "reachable from a config, and loads code (add to DENIED or review):\n" + \
        "\n".join(unrefused)
    for switch, _ in REVIEWED.values():
        assert switch is None or switch in SWITCHES, switch  # a config file cannot turn it on
    denied = sum(bool(denied_by(c.name)) for c in flagged)
    print(f"{len(found)} reachable callables, {len(flagged)} of them flagged: {denied} refused by DENIED, "
          f"{len(flagged) - denied} reviewed; {refused_modules} modules refused whole")


def test_the_scan_sees_the_acts_it_must_refuse():
    """The rule finds the loaders the deny-list names when their modules are scanned anyway."""
    def acts(module: str) -> dict[str, set[str]]:
        [(name, path)] = list(package_files(module))
        return {c.name: c.acts for c in scan_module(name, path)}

    dynamic = acts("transformers.dynamic_module_utils")
    assert any("imports code" in a for a in dynamic["transformers.dynamic_module_utils.get_class_in_module"])
    assert dynamic["transformers.dynamic_module_utils.get_class_from_dynamic_module"]  # through its helpers
    assert any("unpickles (torch.load)" == a for a in acts("peft.utils.save_and_load")["peft.utils.save_and_load.torch_load"])
    assert any("starts a program" in a for a in acts("transformers.pipelines.audio_utils")
               ["transformers.pipelines.audio_utils.ffmpeg_read"])
    assert acts("torch.optim.adamw")["torch.optim.adamw.AdamW"] == set()


@pytest.mark.parametrize("dotted, message", [
    ("automodel.data.squad.logging.getLogger", "passes through automodel.data.squad.logging, which is the module "
                                               "logging reached as an attribute"),
    ("torch.optim.optimizer.torch.load", "passes through torch.optim.optimizer.torch, which is the module torch"),
    ("datasets.load.importlib.import_module", "which is the module importlib"),
    ("automodel.data.squad.Path", "is pathlib.Path, defined outside the trusted packages"),
    ("torch.nn.modules.module.torch.hub.load", "not a chain of 3 attributes"),
    ("torch.optim.AdamW.__init__", "'__init__' is not a public name"),
    ("automodel.data.squad._private", "'_private' is not a public name"),
    ("transformers.pipeline", "'transformers.pipeline' is transformers.pipelines.pipeline, which loads or runs code"),
    ("transformers.dynamic_module_utils.get_class_from_dynamic_module", "loads or runs code by design"),
    ("torch.utils.data.datapipes.utils.decoder.basichandlers", "loads or runs code by design"),
    ("automodel.config.trust.os.system", "loads or runs code by design (automodel.config"),
    ("automodel.checkpoint.state.load_training_state", "loads or runs code by design (automodel.checkpoint"),
])
def test_targets_are_taken_from_their_own_module(dotted, message):
    with pytest.raises(UserError, match="^x._target_: .*" + message.replace("(", r"\(").replace(".", r"\.")):
        resolve_target(dotted, "x")


def test_the_allowed_targets_still_resolve():
    import torch
    import transformers

    assert resolve_target("torch.optim.AdamW", "x") is torch.optim.AdamW
    assert resolve_target("transformers.AutoTokenizer.from_pretrained", "x") == \
        transformers.AutoTokenizer.from_pretrained
    assert resolve_target("automodel.data.squad.make_squad_dataset", "x").__name__ == "make_squad_dataset"
    policy = target_policy(cli=["collections.OrderedDict"], log=False)  # a prefix naming the callable itself
    assert resolve_target("collections.OrderedDict", "x", policy).__name__ == "OrderedDict"


def test_walking_to_os_system_runs_nothing_from_a_flag(tmp_path):
    planted = tmp_path / "FILE"
    out = subprocess.run([sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(PEFT_EXAMPLE),
                          "--loss_fn._target_", "automodel.models.loader.os.system", "--loss_fn.command",
                          f"id > {planted}"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 2 and not planted.exists(), out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: loss_fn._target_: 'automodel.models.loader.os.system' passes through automodel.models.loader.os, which "
        "is the module os reached as an attribute; name the callable by its own module"]


@pytest.mark.parametrize("target", ["automodel.config.trust.os.system", "torch.utils.data.dataloader.os.system",
                                    "transformers.modeling_utils.os.system"])
def test_walking_to_os_system_runs_nothing_from_a_yaml(tmp_path, capsys, target):
    planted = tmp_path / "FILE"
    cfg = tiny_squad_config(tmp_path, max_steps=1)
    cfg["loss_fn"] = {"_target_": target, "command": f"id > {planted}"}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", "llm", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: loss_fn._target_: '{target}'"), err
    assert not planted.exists() and not (tmp_path / "ckpt").exists()


def test_a_dynamic_module_is_never_imported_by_a_config(tmp_path):
    """transformers' own loader of a folder's Python files, named directly or through a re-export."""
    planted = tmp_path / "FILE"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "evil_mod.py").write_text(f"import os\nos.system('id > {planted}')\nclass Evil:\n    pass\n")
    for target in ("transformers.dynamic_module_utils.get_class_from_dynamic_module",
                   "transformers.dynamic_module_utils.get_class_in_module"):
        with pytest.raises(UserError, match="loads or runs code by design"):
            build({"_target_": target, "class_reference": "evil_mod.Evil", "class_name": "Evil",
                   "module_path": str(folder / "evil_mod.py"), "pretrained_model_name_or_path": str(folder)}, "x")
    assert not planted.exists()


def test_the_deny_list_stays_short():
    assert len(DENIED) <= 30
