"""`automodel` commands run in forks of one interpreter that has already imported the CLI's libraries.

Every `automodel` command starts a Python and imports torch, transformers and peft before it does any work, which
is most of what a small command (a dry-run push, a serve folder, an eval of four questions) costs. tests/test_docs.py
runs a guide's few dozen commands: a server started once per guide imports those libraries, then forks one child per
command. The child takes the command's working folder, environment and standard streams (passed over a Unix socket
with SCM_RIGHTS, so the command writes straight to what its caller reads) and calls automodel.cli.main.main, as
`python -m automodel` does; the caller gets its exit status back.

What a fork cannot give a command: a library reads some environment variables once, when it is imported
(huggingface_hub's HF_HUB_OFFLINE and HF_HOME). The server is started with the environment the commands share; a
command run with another value of such a variable has to start a fresh interpreter instead.

    python tests/forked_cli.py serve SOCKET          # prints "ready" once it accepts commands
    python -I -S tests/forked_cli.py run SOCKET ARG...   # one command; only the standard library is imported
    python -I -S tests/forked_cli.py python SOCKET CODE  # a Python block, as `python -c CODE` would run it
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import traceback

STREAMS = (0, 1, 2)  # stdin, stdout, stderr: the caller's, handed to the child
MAX_REQUEST = 1 << 20


def serve(path: str) -> None:
    """Import what the commands need, then fork a child per request (until the server is killed)."""
    if sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # tests/ is not on a command's path
    import peft  # noqa: F401  (the libraries every command imports: once, here)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  (their lazy modules resolved)

    from peft.import_utils import is_bnb_available

    if is_bnb_available():  # peft imports bitsandbytes when it makes a LoRA layer, if it is installed
        import peft.tuners.lora.bnb  # noqa: F401

    import automodel.cli.main  # noqa: F401
    import automodel.training.recipe  # noqa: F401

    # A fork copies only the calling thread: a child could inherit a lock another thread held. No Python thread
    # runs here; the one native thread (OpenBLAS's pool, through numpy) is stopped and restarted by OpenBLAS's own
    # fork handlers. `datasets` is left to the commands: pyarrow starts jemalloc's background thread on import.
    assert threading.active_count() == 1, f"the fork server runs threads: {threading.enumerate()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen()
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, len(STREAMS))
            request = json.loads(message)
            sys.stdout.flush(), sys.stderr.flush()  # nothing buffered is written twice
            child = os.fork()
            if child == 0:
                server.close()
                run_in_child(request, fds)
            for fd in fds:
                os.close(fd)
            _, status = os.waitpid(child, 0)
            connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())


def run_in_child(request: dict, fds: list[int]) -> None:
    """Become the command: its streams, folder, environment and arguments; never returns."""
    for target, fd in zip(STREAMS, fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path.insert(0, "" if "python" in request else os.getcwd())  # as `python -c` and `python -m` put it
    code = 1
    try:
        if "python" in request:
            sys.argv = ["-c"]
            exec(compile(request["python"], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        else:
            from automodel.cli.main import main

            sys.argv = ["automodel", *request["argv"]]
            code = main(request["argv"])
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (what an uncaught exception does to `python -m automodel`)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(path: str, request: dict) -> int:
    """Send one command with this process's folder, environment and streams; its exit status."""
    request = {**request, "cwd": os.getcwd(), "env": dict(os.environ)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.connect(path)
        socket.send_fds(client, [json.dumps(request).encode()], list(STREAMS))
        return int(client.recv(16))


if __name__ == "__main__":
    mode, path, *rest = sys.argv[1:]
    if mode == "serve":
        serve(path)
    elif mode == "run":
        sys.exit(run(path, {"argv": rest}))
    elif mode == "python":
        sys.exit(run(path, {"python": rest[0]}))
    else:
        sys.exit(f"forked_cli.py: unknown mode {mode!r}")
