"""Fault figures: how many faults and bad inputs automodel survives. Prints one table per figure.

    python benchmarks/faults.py r2          # >= 200 malformed inputs through the CLI (in-process, ~5 min)
    python benchmarks/faults.py r2-at-rest  # only its attacks on checkpoints, links and secrets at rest
    python benchmarks/faults.py r2 attacks  # only the attacks on the trust boundary (categories: r2 CATEGORY...)
    python benchmarks/faults.py r1          # 20 SIGKILLs of a full-SFT run, each resumed (~15 min on 2 cores)
    python benchmarks/faults.py r4          # one rank of a 2-process FSDP2 run killed mid-step
    python benchmarks/faults.py all

R1: stories260K full SFT, 12 steps, a checkpoint every 2 steps. Each kill lands at a random moment after training
    has started: half at a random time, half while a checkpoint save is in progress (a watcher waits for the
    temporary step folder, then kills after a random few ms). A kill that comes after the run ended is retried
    with another moment. Each killed run is resumed with the same command; its final weights are compared bit
    for bit with an uninterrupted run's.
R2: each malformed input must end with exit 2 and exactly one stderr line `error: ...` naming the expected key,
    file or row; no traceback, no hang (60 s), no partial folder or checkpoint left behind.
R4: `--nproc-per-node 2`, fsdp2 on gloo; rank 1 is SIGKILLed in the middle of a step; the job must end within
    dist_env.timeout_minutes with a line naming the rank and signal, leave LATEST on a complete step, and resume.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_corpus import (  # noqa: E402
    REPO,
    SQUAD_TRAIN,
    STORIES,
    config_cases,
    data_cases,
    override_cases,
    tokenizer_cases,
)
from fault_corpus_io import checkpoint_cases, env_cases, path_cases  # noqa: E402
from fault_corpus_targets import attack_cases  # noqa: E402
from fault_corpus_trust import at_rest_cases  # noqa: E402

HANG_S = 60
SUBPROCESS_HANG_S = 240  # importing torch and transformers alone takes a while on a loaded 2-core machine


def cli(argv: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "automodel", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- R2


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_in_process(argv: list[str]) -> tuple[object, str, str]:
    from automodel.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
    except Hang:
        code = "hang"
    except BaseException as error:  # a bug: what the CLI would show as a traceback
        import traceback

        code = "traceback"
        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(error))[-800:])
    finally:
        signal.alarm(0)
    return code, out.getvalue(), err.getvalue()


def judge(case, code, out: str, err: str, before: set[str], folder: Path) -> str | None:
    lines = [line for line in err.splitlines() if line.strip()]
    if code == "hang":
        return "hang"
    if any(folder.rglob("PWNED")):  # an attack's payload ran
        return "the payload ran: PWNED exists"
    if "Traceback" in err or "Traceback" in out:
        return "traceback: " + err.strip().splitlines()[-1][:160]
    if code != 2:
        return f"exit {code}: {(lines or ['(no stderr)'])[-1][:160]}"
    if case.absent and (case.absent in out or case.absent in err):
        return f"printed {case.absent!r}"
    if case.forbidden and (folder / case.forbidden).exists():
        return f"created {case.forbidden}: the attack's payload ran"
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} stderr lines: {' | '.join(lines)[:200]}"
    if case.expect not in lines[0]:
        return f"does not name {case.expect!r}: {lines[0][:200]}"
    new = {str(p.relative_to(folder)) for p in folder.rglob("*")} - before
    left = [p for p in new if p.endswith((".partial", ".tmp")) or "/step_" in "/" + p or p.endswith("LATEST")]
    if left:
        return f"left behind: {', '.join(sorted(left))[:160]}"
    if case.category == "attacks" and new:
        return f"created: {', '.join(sorted(new))[:160]}"
    return None


def real_step_folder(root: Path) -> Path:
    """A 1-step run's step folder written by this user (the checkpoint cases damage copies of it)."""
    from fault_corpus import base_config

    folder = root / "real"
    folder.mkdir()
    cfg = base_config(folder)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = cli(["finetune", "llm", "-c", str(path)])
    assert out.returncode == 0, out.stderr[-2000:]
    return folder / "ckpt" / "step_1"


def r2(only: tuple[str, ...] = (), corpus: list | None = None) -> None:
    corpus = corpus or config_cases() + override_cases() + data_cases() + tokenizer_cases() + checkpoint_cases() + \
        path_cases() + env_cases() + at_rest_cases() + attack_cases()
    if only:
        corpus = [case for case in corpus if case.category in only]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults_r2_") as tmp:
        root = Path(tmp)
        real_step = real_step_folder(root)
        results: dict[str, list[int]] = {}
        misses = []
        os.environ["AUTOMODEL_CACHE"] = str(root / "cache")  # the ledger of written checkpoints lives here too
        real_env = dict(os.environ)
        for index, case in enumerate(corpus):
            folder = root / f"case_{index:03d}"
            folder.mkdir()
            needs_step = len([p for p in inspect.signature(case.setup).parameters.values()
                              if p.default is inspect.Parameter.empty]) == 2
            argv = case.setup(folder, real_step) if needs_step else case.setup(folder)
            before = {str(p.relative_to(folder)) for p in folder.rglob("*")}
            if case.category == "environment":
                env = {k: v.replace("{folder}", str(folder)) for k, v in case.env.items()}
                try:
                    done = cli(argv, env, timeout=SUBPROCESS_HANG_S)
                    code, out, err = done.returncode, done.stdout, done.stderr
                except subprocess.TimeoutExpired:
                    code, out, err = "hang", "", ""
            else:
                with contextlib.chdir(folder) if getattr(case, "run_in_folder", False) else contextlib.nullcontext():
                    code, out, err = run_in_process(argv)
                os.environ.clear()
                os.environ.update(real_env)
            problem = judge(case, code, out, err, before, folder)
            tally = results.setdefault(case.category, [0, 0])
            tally[0] += problem is None
            tally[1] += 1
            if problem:
                misses.append(f"  [{case.category}] {case.name}: {problem}")
                print(misses[-1], flush=True)
    total_ok = sum(v[0] for v in results.values())
    total = sum(v[1] for v in results.values())
    print(f"\nR2 malformed inputs through the CLI ({time.monotonic() - started:.0f} s)")
    print(f"{'category':<14}{'clean':>7}{'cases':>7}")
    for category, (ok, n) in results.items():
        print(f"{category:<14}{ok:>7}{n:>7}")
    print(f"{'total':<14}{total_ok:>7}{total:>7}")
    print("clean = exit 2, one line `error: ...` naming the key/file/row, no traceback, no hang, nothing half-written")
    if misses:
        print("misses:\n" + "\n".join(misses))


# ---------------------------------------------------------------- R1


def sft_config(folder: Path, max_steps: int = 12) -> dict:
    return {
        "recipe": "llm_finetune", "seed": 7,
        "model": {"pretrained_model_name_or_path": str(STORIES)},
        "dataset": {"_target_": "automodel.data.squad.make_squad_dataset", "dataset_name": str(SQUAD_TRAIN),
                    "split": "train", "seq_length": 128, "limit_dataset_samples": 32},
        "step_scheduler": {"global_batch_size": 4, "local_batch_size": 2, "max_steps": max_steps,
                           "ckpt_every_steps": 2, "log_every_steps": 1},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
        "checkpoint": {"checkpoint_dir": str(folder / "ckpt")},
        "logging": {"progress_bar": False, "plot": False},
    }


def final_weights(ckpt: Path, max_steps: int):
    # numpy, not torch: this process forks the runs, and must not start torch's thread pool before it does.
    from safetensors.numpy import load_file

    return load_file(ckpt / f"step_{max_steps}" / "model" / "model.safetensors")


class ForkedRun:
    """`automodel finetune llm -c CFG` in a child forked from this process, which has imported torch,
    transformers and automodel once (a fresh interpreter spends most of a short run importing them). The child
    runs exactly the CLI's main() and exits with its code; a SIGKILL ends it as it would end `automodel`."""

    def __init__(self, cfg_path: Path):
        from automodel.cli.main import main

        self.pid = os.fork()
        if self.pid == 0:  # the child: the command, its output out of the way
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = 1
            try:
                code = main(["finetune", "llm", "-c", str(cfg_path)])
            finally:
                os._exit(code)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def preload() -> None:
    """What every run imports, loaded before forking (no torch op runs here, so no thread pool is forked)."""
    import automodel.cli.main  # noqa: F401
    import automodel.training.recipe  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


def kill_once(cfg_path: Path, ckpt: Path, in_save: bool, rng: random.Random, window_s: float) -> dict:
    """Start the run, SIGKILL it at a random moment once training runs; what happened."""
    proc = ForkedRun(cfg_path)
    deadline = time.monotonic() + 300
    while not (ckpt / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if in_save:  # wait for a save in progress (its temporary folder), up to the random step's save
        wanted = rng.choice([2, 4, 6, 8, 10])
        while proc.poll() is None and not (ckpt / f".step_{wanted}.partial").exists():
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.02))
    else:
        time.sleep(rng.uniform(0.0, window_s))
    partial_before = [p.name for p in ckpt.glob(".step_*.partial")]
    proc.kill()
    proc.wait()
    partial_after = [p.name for p in ckpt.glob(".step_*.partial")]
    latest = (ckpt / "LATEST").read_text().strip() if (ckpt / "LATEST").exists() else None
    return {"mid_run": proc.returncode == -signal.SIGKILL and latest != "step_12",
            "in_save": bool(partial_before and partial_after), "latest": latest}


def r1(kills: int = 20) -> None:
    from automodel.checkpoint.provenance import LEDGER_ENV

    started = time.monotonic()
    rng = random.Random(int(os.environ.get("FAULTS_SEED", "20")))
    with tempfile.TemporaryDirectory(prefix="faults_r1_") as tmp:
        root = Path(tmp)
        os.environ[LEDGER_ENV] = str(root / "cache")
        ref_dir = root / "reference"
        ref_dir.mkdir()
        (ref_dir / "cfg.yaml").write_text(yaml.safe_dump(sft_config(ref_dir)))
        preload()
        t0 = time.monotonic()
        assert ForkedRun(ref_dir / "cfg.yaml").wait() == 0, "the uninterrupted run failed"
        reference = final_weights(ref_dir / "ckpt", 12)
        window = 0.8 * (time.monotonic() - t0)  # kills land at a random point of this span after training starts
        rows = []
        for index in range(kills):
            in_save = index % 2 == 1
            for attempt in range(1, 6):
                folder = root / f"kill_{index:02d}_{attempt}"
                folder.mkdir()
                cfg_path = folder / "cfg.yaml"
                cfg_path.write_text(yaml.safe_dump(sft_config(folder)))
                what = kill_once(cfg_path, folder / "ckpt", in_save, rng, window)
                if what["mid_run"]:
                    break
            resumed = ForkedRun(cfg_path)
            resumed.wait()
            got = final_weights(folder / "ckpt", 12) if resumed.returncode == 0 else {}
            identical = got.keys() == reference.keys() and all(
                got[k].dtype == reference[k].dtype and numpy.array_equal(got[k], reference[k]) for k in reference)
            rows.append({**what, "attempts": attempt, "resumed": resumed.returncode == 0, "identical": identical})
            print(f"  kill {index + 1:2d}: {'in a save' if what['in_save'] else 'mid-step':<10} LATEST at kill "
                  f"{what['latest']}, resumed {resumed.returncode == 0}, bit-identical {identical}", flush=True)
    mid = sum(r["mid_run"] for r in rows)
    print(f"\nR1 SIGKILL of a full-SFT run, resumed with the same command ({time.monotonic() - started:.0f} s)")
    print(f"{'kills':<34}{len(rows):>4}")
    print(f"{'landed mid-run':<34}{mid:>4}")
    print(f"{'landed inside a checkpoint save':<34}{sum(r['in_save'] for r in rows):>4}")
    print(f"{'resumed to the end':<34}{sum(r['resumed'] for r in rows):>4}")
    print(f"{'final weights bit-identical':<34}{sum(r['identical'] for r in rows):>4}")


# ---------------------------------------------------------------- R4


def worker_pids(launcher_pid: int) -> dict[int, int]:
    children = []
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        children += (task / "children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(item.decode().split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if b"=" in item)
        if "RANK" in env:
            ranks[int(env["RANK"])] = pid
    return ranks


def r4() -> None:
    started = time.monotonic()
    timeout_minutes = 1
    with tempfile.TemporaryDirectory(prefix="faults_r4_") as tmp:
        folder = Path(tmp)
        os.environ["AUTOMODEL_CACHE"] = str(folder / "cache")
        cfg = sft_config(folder, max_steps=8)
        cfg["distributed"] = {"strategy": "fsdp2"}
        cfg["dist_env"] = {"backend": "gloo", "timeout_minutes": timeout_minutes}
        path = folder / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = "1"
        argv = [sys.executable, "-m", "automodel", "finetune", "llm", "-c", str(path), "--nproc-per-node", "2"]
        launcher = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ckpt = folder / "ckpt"
        while launcher.poll() is None and not (ckpt / "LATEST").exists():  # a first checkpoint exists
            time.sleep(0.05)
        metrics = ckpt / "metrics.jsonl"
        logged = metrics.read_text().count("\n") if metrics.exists() else 0
        while launcher.poll() is None and metrics.read_text().count("\n") == logged:  # a step just ended
            time.sleep(0.01)
        time.sleep(0.05)  # inside the next step
        pids = worker_pids(launcher.pid)
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = launcher.communicate(timeout=timeout_minutes * 60 + 120)
        ended_s = time.monotonic() - killed_at
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        latest = (ckpt / "LATEST").read_text().strip()
        complete = (ckpt / latest / "trainer_state.json").is_file() and (ckpt / latest / "dcp" / ".metadata").is_file()
        resumed = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
        final = (ckpt / "LATEST").read_text().strip()
    print(f"\nR4 rank 1 of 2 (fsdp2, gloo) SIGKILLed mid-step ({time.monotonic() - started:.0f} s)")
    print(f"  job ended after                {ended_s:.1f} s (dist_env.timeout_minutes {timeout_minutes} = "
          f"{timeout_minutes * 60} s), exit {launcher.returncode}")
    print(f"  last line                      {last[:150]}")
    print(f"  LATEST after the kill          {latest} (complete: {complete})")
    print(f"  resumed with the same command  exit {resumed.returncode}, "
          f"{'resumed from ' + latest if 'resuming from' in resumed.stdout else 'did not resume'}, ended at {final}")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which == "r2-at-rest":  # only the attacks on what lies at rest (fault_corpus_trust.py)
        r2(corpus=at_rest_cases())
        sys.exit()
    if which == "r2" and len(sys.argv) > 2:  # r2 CATEGORY...: only those categories (e.g. attacks)
        r2(tuple(sys.argv[2:]))
        sys.exit()
    for name, figure in (("r2", r2), ("r1", r1), ("r4", r4)):
        if which in (name, "all"):
            figure()
