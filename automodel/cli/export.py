"""`automodel export STEP_DIR [--output DIR]`: write the HF-loadable model folder of any checkpoint step."""

from __future__ import annotations

from automodel.cli.common import new_parser


def main(argv: list[str]) -> int:
    parser = new_parser(
        "automodel export",
        "Turn a checkpoint step folder (its dcp/ training state) into a Hugging Face model folder: full weights "
        "for SFT, the PEFT adapter for LoRA. Works offline, in one process, whatever the number of processes that "
        "trained.")
    parser.add_argument("step_dir", help="a <checkpoint_dir>/step_<N> folder")
    parser.add_argument("--output", help="where to write (default: STEP_DIR/model)")
    parser.add_argument("--trust-pickled-state", action="store_true",
                        help="read a step folder your runs did not write: its dcp/ state is unpickled, which can run "
                             "code (docs/security.md)")
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX",
                        help="let the step's config `_target_`s come from PREFIX too (docs/security.md)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="the step's config sets model.trust_remote_code: run the model repo's own code (off)")
    args = parser.parse_args(argv)
    from automodel.checkpoint.export import export_step

    print(export_step(args.step_dir, args.output, args.trust_pickled_state, tuple(args.allow_target),
                      args.trust_remote_code))
    return 0
