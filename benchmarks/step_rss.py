"""The process's current RSS step by step through the README's main job: where the logged peak memory grows.

    python benchmarks/step_rss.py [--step_scheduler.max_steps=20 ...]
    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/step_rss.py ...   # the threshold fixed at 1 MiB, to compare

Runs examples/llm_finetune/smollm2_135m_squad_peft.yaml in this process (8 validation questions, no plot; any other
override on the command line) while a thread reads VmRSS from /proc/self/status every 0.1 s, and prints, for each
value of the run's step counter, the smallest and largest RSS seen while it held that value: the smallest is what
the process keeps between steps, the largest the step's own peak. The step log's `mem` is the running maximum.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXAMPLE = REPO / "examples" / "llm_finetune" / "smollm2_135m_squad_peft.yaml"
PERIOD_S = 0.1


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return kib * 1024 / 1e9


def main(overrides: list[str]) -> None:
    from automodel.config import load_config
    from automodel.training.recipe import FinetuneRecipe

    cfg = load_config(EXAMPLE, ["--validation_dataset.limit_dataset_samples=8", "--logging.progress_bar=false",
                                "--logging.plot=false", "--checkpoint.checkpoint_dir=/tmp/step_rss", *overrides])
    recipe = FinetuneRecipe(cfg)
    lowest, highest = collections.defaultdict(lambda: float("inf")), collections.defaultdict(float)
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            step = recipe.state.step if hasattr(recipe, "state") else -1  # -1: setup, before the state exists
            now = rss_gb()
            lowest[step], highest[step] = min(lowest[step], now), max(highest[step], now)
            time.sleep(PERIOD_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    recipe.run()
    running.clear()
    sampler.join()
    print("step counter  RSS min GB  RSS max GB")
    for step in sorted(highest):
        print(f"{step:12d}  {lowest[step]:10.2f}  {highest[step]:10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
