"""Runs `gptscale` command lines (JSON list on stdin), each in a forked child of this process
(imports paid once), time-boxed; prints one JSON result per case: exit code, stderr, timed out.

A child is killed after its time box; a traceback or any exit code other than 0 / 2 is the
test's to judge. Run by tests/e2e/test_cli_fuzz.py."""
import io
import json
import os
import signal
import sys

import gptscale.cli  # noqa: F401 - imported once here, before forking
import gptscale.train.loop  # noqa: F401


def _child(argv: list[str], write_fd: int) -> None:
    err = io.StringIO()
    code = 1
    sys.stdout = io.StringIO()
    sys.stderr = err
    try:
        from gptscale.cli import main

        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - what the test looks for
        import traceback

        err.write(traceback.format_exc())
        code = 99
    os.write(write_fd, json.dumps({"code": code, "stderr": err.getvalue()[-4000:]}).encode())
    os._exit(0)


def run_case(argv: list[str], cwd: str, seconds: float) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.chdir(cwd)
        signal.alarm(int(seconds))  # the time box, from inside: SIGALRM ends the child
        _child(argv, write_fd)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 1 << 16):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"argv": argv, "code": None, "stderr": "", "timed_out": os.WIFSIGNALED(status)
                and os.WTERMSIG(status) == signal.SIGALRM, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status)
                else None}
    return {"argv": argv, **json.loads(b"".join(chunks)), "timed_out": False}


def main() -> None:
    request = json.load(sys.stdin)
    for argv in request["cases"]:
        print(json.dumps(run_case(argv, request["cwd"], request["seconds"])), flush=True)


if __name__ == "__main__":
    main()
