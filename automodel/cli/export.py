"""`automodel export STEP_DIR [--output DIR]`: write the HF-loadable model folder of any checkpoint step."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="automodel export",
        description="Turn a checkpoint step folder (its dcp/ training state) into a Hugging Face model folder: "
                    "full weights for SFT, the PEFT adapter for LoRA. Works offline, in one process, whatever "
                    "the number of processes that trained.")
    parser.add_argument("step_dir", help="a <checkpoint_dir>/step_<N> folder")
    parser.add_argument("--output", help="where to write (default: STEP_DIR/model)")
    args = parser.parse_args(argv)
    from automodel.checkpoint.export import export_step

    print(export_step(args.step_dir, args.output))
    return 0
