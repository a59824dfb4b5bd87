"""The knowledge-distillation recipe (`automodel kd llm`): its loss against a direct float64 reference, a teacher
identical to the student, bad input, exact resume and two FSDP2 processes, on the real stories260K model and SQuAD."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from automodel.batch import IGNORE_INDEX
from automodel.cli.main import main
from automodel.config.precision import native_bf16
from automodel.models.forward_plan import plan_forward
from automodel.training.kd import DistillForwardLoss, KDRecipe
from automodel.training.kd_loss import KDLoss
from automodel.training.loss import ForwardLoss, MaskedCrossEntropy
from tests.conftest import STORIES
from tests.distributed_helpers import FAST, automodel_cmd, run
from tests.helpers import tiny_squad_config


def kd_config(tmp_path, peft: bool, max_steps: int = 3, **kd) -> dict:
    """stories260K distilled from stories260K: 3 steps of global batch 4 (2 micro-batches of 2), seq_length 128."""
    cfg = tiny_squad_config(tmp_path, peft=peft, max_steps=max_steps, train_samples=16, global_batch=4,
                            local_batch=2)
    cfg["recipe"] = "llm_kd"
    cfg["teacher_model"] = {"pretrained_model_name_or_path": str(STORIES)}
    cfg["kd_ratio"] = 0.5
    cfg["kd_loss_fn"] = {"temperature": 2.0}
    cfg["dataset"]["seq_length"] = cfg["validation_dataset"]["seq_length"] = 128
    cfg["validation_dataset"]["limit_dataset_samples"] = 5  # odd: a second rank's sampler pads one row
    cfg["step_scheduler"].update(log_every_steps=1, val_every_steps=max_steps)
    cfg.update(kd)
    return cfg


def records(ckpt, kind: str) -> list[dict]:
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---- the loss -------------------------------------------------------------------------------------------------


def reference_kd(student_logits, teacher_logits, labels, temperature, kd_ratio):
    """(1 - r) x CE + r x T^2 x KL(p_t || p_s) summed over label positions, written out from the definitions."""
    targets, student, teacher = labels[:, 1:], student_logits[:, :-1], teacher_logits[:, :-1]
    mask = targets != IGNORE_INDEX
    s, t, y = student[mask], teacher[mask], targets[mask]

    def log_softmax(z):
        shifted = z - z.max(dim=-1, keepdim=True).values.detach()
        return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))

    ce = -log_softmax(s).gather(1, y[:, None]).sum()
    log_p_t, log_p_s = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (torch.exp(log_p_t) * (log_p_t - log_p_s)).sum() * temperature ** 2
    return (1 - kd_ratio) * ce + kd_ratio * kl, ce, kl


def stories_float64(noise_seed: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64)
    if noise_seed is not None:  # a teacher that disagrees with the student
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    return model


def test_kd_loss_and_gradient_match_a_float64_reference(stories_tokenizer):
    """Padding and prompt positions masked, temperature 2, chunks of 3 label tokens, through the recipe's forward."""
    student, teacher = stories_float64(), stories_float64(noise_seed=0).requires_grad_(False).eval()
    rows = [stories_tokenizer(text)["input_ids"] for text in ("Once upon a time there was a little girl",
                                                            "The cat sat on the mat and")]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    temperature, ratio = 2.0, 0.3

    want, want_ce, want_kl = reference_kd(student(input_ids=input_ids, attention_mask=attention_mask).logits,
                                          teacher(input_ids=input_ids, attention_mask=attention_mask).logits,
                                          labels, temperature, ratio)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    assert want_kl > 0.01

    kd = KDLoss(temperature=temperature, chunk_size=3)
    loss = MaskedCrossEntropy(3)
    forward = DistillForwardLoss(ForwardLoss(student, loss, plan_forward(student, loss)),
                                 ForwardLoss(teacher, loss, plan_forward(teacher, loss)), kd, ratio)
    assert forward.describe().startswith("0.7 x cross-entropy + 0.3 x KD (T=2, 3 label tokens a chunk); " + FAST[:30])
    student.train()
    teacher_graph = []  # whether the teacher's forward recorded a graph
    teacher.register_forward_hook(lambda module, args, output: teacher_graph.append(
        output.hidden_states[-1].requires_grad))
    got, tokens = forward(batch)
    assert teacher_graph == [False]
    got.backward()
    ce, kl, counted = forward.pop_sums()
    assert tokens == counted == int((labels[:, 1:] != IGNORE_INDEX).sum()) > 3 * 2
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    assert ce == pytest.approx(want_ce.item(), rel=1e-12) and kl == pytest.approx(want_kl.item(), rel=1e-12)
    for name, param in student.named_parameters():
        torch.testing.assert_close(param.grad, want_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("peft, precision", [
    (True, "fp32"), (False, "fp32"),
    pytest.param(False, "bf16-mixed", marks=pytest.mark.skipif(not native_bf16(torch.device("cpu"))[0],
                                                               reason="this CPU has no native bf16"))],
    ids=["lora", "full", "full-bf16-mixed"])
def test_a_teacher_identical_to_the_student_gives_zero_kd_before_the_first_update(tmp_path, peft, precision):
    cfg = kd_config(tmp_path, peft=peft, max_steps=1)
    del cfg["model"]["dtype"]
    cfg["precision"] = precision
    recipe = KDRecipe(cfg)
    result = recipe.run()
    (step,) = records(tmp_path / "ckpt", "train")
    assert step["kd_loss"] == 0.0 and step["ce_loss"] > 1.0
    assert result.train_losses == [pytest.approx(0.5 * step["ce_loss"], rel=1e-6)]
    teacher = recipe.parts.forward_loss.teacher.model
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # The teacher is built in the run's weights dtype, as the student: the same numbers in the same operations.
    assert {p.dtype for p in teacher.parameters()} == {p.dtype for p in recipe.parts.model.parameters()}
    assert records(tmp_path / "ckpt", "validation_kd")[0]["val_kd_loss"] > 0.0, "the student moved"


# ---- bad input ------------------------------------------------------------------------------------------------


def _write_tiny_teacher_with_another_vocabulary(folder):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(STORIES)
    config.vocab_size = 600
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("change, message", [
    ({"kd_ratio": 1.5}, "kd_ratio: expected a number in [0, 1] (0: cross-entropy only, 1: KD only), got 1.5"),
    ({"kd_loss_fn": {"temperature": 0}}, "kd_loss_fn.temperature: expected a number > 0, got 0"),
    ({"teacher_model": {"pretrained_model_name_or_path": str(STORIES), "peft": {"dim": 8}}},
     "teacher_model.peft: the teacher is frozen and takes no adapter"),
    ({"teacher_model": {"pretrained_model_name_or_path": "/nowhere/teacher"}},
     "teacher_model.pretrained_model_name_or_path: folder not found: /nowhere/teacher"),
    ("other vocabulary", "teacher_model: its vocabulary has 600 tokens, the student's (model) 512"),
    ("finetune", "teacher_model: only the knowledge-distillation recipe reads it"),
    ("short form", "kd_ratio: expected a number in [0, 1]"),
], ids=["ratio", "temperature", "teacher-peft", "teacher-missing", "vocabulary", "finetune", "recipe-key"])
def test_bad_kd_input_is_one_line_and_exit_2(tmp_path, capsys, change, message):
    cfg = kd_config(tmp_path, peft=True)
    command = "kd"
    if change == "other vocabulary":
        cfg["teacher_model"]["pretrained_model_name_or_path"] = _write_tiny_teacher_with_another_vocabulary(
            tmp_path / "teacher")
    elif change == "finetune":
        cfg["recipe"], command = "llm_finetune", "finetune"
    elif change == "short form":  # `automodel FILE`: the YAML's `recipe: llm_kd` picks the kd recipe
        cfg["kd_ratio"], command = -0.1, None
    else:
        cfg.update(change)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([command, "llm", "-c", str(path)] if command else [str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_kd_llm_help_lists_the_kd_sections(capsys):
    assert main(["kd", "llm", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: automodel kd llm -c CONFIG.yaml") and "KL(teacher || student)" in text
    for section in ("teacher_model", "kd_ratio", "kd_loss_fn"):
        assert f"\n  {section} " in text


# ---- resume and processes -------------------------------------------------------------------------------------


TRAINED = ("loss", "ce_loss", "kd_loss", "grad_norm", "lr", "label_tokens")


def trained(ckpt) -> list[tuple]:
    return [(r["step"], *(r[key] for key in TRAINED)) for r in records(ckpt, "train")]


@pytest.mark.slow
def test_resumed_kd_run_is_bit_identical(tmp_path):
    """A full student resumed from step 2 of 4 continues exactly as the run that went straight through."""
    cfg = kd_config(tmp_path / "a", peft=False, max_steps=4)
    cfg["step_scheduler"]["ckpt_every_steps"] = 2
    straight = KDRecipe(cfg)
    straight.run()
    cfg = kd_config(tmp_path / "b", peft=False, max_steps=4)
    cfg["checkpoint"]["restore_from"] = str(tmp_path / "a" / "ckpt" / "step_2")
    resumed = KDRecipe(cfg)
    resumed.run()
    assert resumed.start_step == 2
    assert trained(tmp_path / "b" / "ckpt") == trained(tmp_path / "a" / "ckpt")[2:]
    assert all(step[3] > 0 for step in trained(tmp_path / "b" / "ckpt")), "the KD term is in play"
    for (name, a), b in zip(straight.parts.model.named_parameters(), resumed.parts.model.parameters()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The checkpoint folder of a one-process run with a LoRA student, done once for the multi-process tests."""
    folder = tmp_path_factory.mktemp("kd_one")
    KDRecipe(kd_config(folder, peft=True)).run()
    return folder / "ckpt"


def run_two_processes(tmp_path, **distributed) -> str:
    """The LoRA run of `one_process` in two processes started by the launcher; their stdout."""
    cfg = kd_config(tmp_path, peft=True)
    if distributed:
        cfg["distributed"] = distributed
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = run([*automodel_cmd(str(cfg_path), "--nproc-per-node", "2")[:3], "kd", "llm", "-c", str(cfg_path),
               "--nproc-per-node", "2"])
    assert "── automodel kd llm" in out.stdout
    return out.stdout


def assert_same_curves(ckpt, reference) -> None:
    """Per-step loss, CE and KD terms and the validation KD as one process's: fp32, only the order of sums
    differs (tests/test_distributed.py's tolerance)."""
    got, want = records(ckpt, "train"), records(reference, "train")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-5), key
    assert got[0]["kd_loss"] == 0.0 and got[-1]["kd_loss"] > 0, "teacher = student until the first update"
    (val,) = records(ckpt, "validation_kd")
    assert val["val_kd_loss"] == pytest.approx(records(reference, "validation_kd")[0]["val_kd_loss"], rel=1e-5)


# The teacher's row of the start banner: how rank 0 holds its parameters, read from them (kd.py's held_as).
TEACHER_ROW = f"  teacher     {STORIES} (frozen, 260,032 parameters, "


@pytest.mark.slow
def test_two_fsdp2_processes_train_like_one(tmp_path, one_process):
    """LoRA student, teacher sharded like it: per-step loss, CE and KD terms as one process's."""
    out = run_two_processes(tmp_path)  # strategy auto
    assert "world size 2, strategy fsdp2" in out
    assert TEACHER_ROW + "45 of 47 tensors split over dp (2 processes))" in out
    assert_same_curves(tmp_path / "ckpt", one_process)


@pytest.mark.slow
def test_two_tensor_parallel_processes_train_like_one(tmp_path, one_process):
    """tp_size 2: the teacher's projections split by the model's TP plan as the student's are."""
    out = run_two_processes(tmp_path, tp_size=2)
    assert "world size 2, strategy none, data parallel 1 x tensor parallel 2" in out
    assert TEACHER_ROW + "35 of 47 tensors split over tp (2 processes))" in out
    assert_same_curves(tmp_path / "ckpt", one_process)
