"""Processes that use lmkernel end cleanly: exit status 0 (or the documented one), no traceback,
no signal. Each pattern runs as its own Python process, with the test session's environment
(model folder, cache) and, where it matters, MLX's compiler switched on as users have it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from .conftest import TINY

CRASH_SIGNS = ("Traceback", "Exception ignored", "Segmentation fault", "terminate called", "Fatal Python error")


def run_python(code: str, *args: str, compile_mlx: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if compile_mlx:
        env.pop("MLX_DISABLE_COMPILE", None)  # users' default: mx.compile on (the tests switch it off)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def assert_clean(done: subprocess.CompletedProcess, status: int = 0) -> None:
    assert done.returncode == status, f"exit status {done.returncode}\n{done.stderr}"
    for sign in CRASH_SIGNS:
        assert sign not in done.stderr, done.stderr


# lmkernel loads MLX on its engine thread; the program's own mlx-lm use runs on the main thread
# (or a thread of its own) in between lmkernel predictions, and, with "hook", in an atexit hook.
# Without the hook the main thread's last mlx-lm call comes before lmkernel's last one: the
# pattern that crashed at exit.
MIXED = """
    import atexit, sys, threading
    key, path, where, hook = sys.argv[1:]
    import lmkernel as lms

    def direct():
        import mlx_lm
        model, tok = mlx_lm.load(path)
        return "".join(r.text for r in mlx_lm.stream_generate(model, tok, "hi", max_tokens=5))

    def predict():
        return lms.llm(key).complete("hi", config={"maxTokens": 5}).content

    def in_thread(fn):
        box = []
        t = threading.Thread(target=lambda: box.append(fn()))
        t.start()
        t.join()
        return box[0]

    run = predict if where == "main" else lambda: in_thread(predict)
    run()
    direct()
    run()
    if hook == "hook":
        atexit.register(lambda: (direct(), print("exit hook used mlx-lm", flush=True)))
    print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("where", "compile_mlx", "hook"),
    [("main", True, ""), ("main", False, ""), ("thread", True, ""), ("main", True, "hook")],
    ids=["main-thread-compile-on", "main-thread-compile-off", "user-thread-compile-on", "mlx-in-exit-hook"],
)
def test_mixed_direct_mlx_use_exits_cleanly(tiny_path, where, compile_mlx, hook):
    """Used to die with SIGSEGV at exit when MLX's compiler was on (the main thread's compile cache)."""
    done = run_python(MIXED, TINY, str(tiny_path), where, hook or "-", compile_mlx=compile_mlx)
    assert_clean(done)
    assert done.stdout.splitlines() == ["done"] + (["exit hook used mlx-lm"] if hook else [])


def test_only_lmkernel_with_compile_on_exits_cleanly():
    done = run_python(
        """
        import sys, lmkernel as lms
        print(lms.llm(sys.argv[1]).complete("hi", config={"maxTokens": 5, "temperature": 0.8}).stats.stop_reason)
        """,
        TINY,
        compile_mlx=True,
    )
    assert_clean(done)
    assert done.stdout.strip() == "maxPredictedTokensReached"


def test_non_daemon_thread_finishes_its_prediction_after_main_returns():
    """The kernel stops after the program's threads are done (it used to cut this to modelUnloaded)."""
    done = run_python(
        """
        import sys, threading, lmkernel as lms

        def work():
            result = lms.llm(sys.argv[1]).complete("x", config={"maxTokens": 30})
            print(result.stats.stop_reason, repr(result.content), flush=True)

        threading.Thread(target=work).start()
        """,
        TINY,
    )
    assert_clean(done)
    reason = done.stdout.split()[0] if done.stdout.strip() else ""
    assert reason in ("maxPredictedTokensReached", "eosFound"), done.stdout


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmkernel", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_cli_output_into_a_closed_pipe_ends_quietly():
    """``lmkernel complete ... | head -c 20``: the reader goes away after 20 bytes."""
    with cli("complete", "The cat in the", "--model", TINY, "--max-tokens", "2000", "--temperature", "1") as proc:
        head = proc.stdout.read(20)
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        proc.wait(timeout=120)
    assert len(head) == 20
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr), status=141)


def test_cli_interrupted_mid_stream_ends_quietly():
    with cli("complete", "The cat in the", "--model", TINY, "--max-tokens", "2000", "--temperature", "1") as proc:
        assert proc.stdout.read(1)  # streaming has begun
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, b"", stderr.decode()), status=130)


FORK = """
    import os, sys, time
    import lmkernel as lms
    model = lms.llm(sys.argv[1])
    model.complete("hi", config={"maxTokens": 2})
    pid = os.fork()
    if pid == 0:
        start = time.monotonic()
        try:
            model.complete("hi", config={"maxTokens": 2})
        except lms.LMKernelConnectionError as exc:
            print("old handle:", exc)
        try:
            lms.llm(sys.argv[1])
        except lms.LMKernelBackendError as exc:
            print("new load:", exc)
        print(f"child took {time.monotonic() - start:.1f} s")
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child status", status)
    print(model.complete("hi", config={"maxTokens": 2}).stats.predicted_tokens_count >= 1)
"""


def test_a_forked_child_is_told_at_once_that_the_kernel_stayed_with_its_parent():
    done = run_python(FORK, TINY, timeout=60)
    assert_clean(done)
    lines = done.stdout.splitlines()
    assert lines[0] == ("old handle: Lost the connection to the kernel: the process forked: the kernel runs in "
                        "the parent process, not in this one")
    assert lines[1].startswith("new load: Backend 'mlx' failed while loading model 'tiny': RuntimeError: MLX was "
                               "started in the parent of this forked process and cannot run here")
    assert float(lines[2].split()[2]) < 5.0
    assert lines[3:] == ["child status 0", "True"]  # the parent's kernel is untouched


def test_a_second_ctrl_c_during_the_servers_shutdown_exits_at_once_without_a_traceback():
    from .serve_helpers import Server

    server = Server("--model", TINY)
    with __import__("lmkernel").Client(server.host) as client:
        stream = client.llm.model(TINY).complete_stream(
            "the cat", config={"maxTokens": 100_000, "stopStrings": ["never-produced-xyz"]})
        stream.start()
        import time

        time.sleep(0.5)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        server.proc.send_signal(signal.SIGINT)
        rc = server.proc.wait(30)
    server.log.seek(0)
    log = server.log.read()
    assert rc == 130, log
    assert "SIGINT again during shutdown: exiting now" in log
    for sign in CRASH_SIGNS:
        assert sign not in log, log
    server.stop()
