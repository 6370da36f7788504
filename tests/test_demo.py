"""`make demo` as a user runs it in a terminal: Ctrl-C (SIGINT to the foreground process group) is
the way it ends, and a clean stop is not reported as an error."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.support.paths import REPO


def interrupt_when_up(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` in its own session, Ctrl-C it once the demo is up; (exit status, all output)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    out = ""
    try:
        while "Ctrl-C to stop." not in out:
            line = proc.stdout.readline()
            assert line, f"the demo ended before it was up:\n{out}"
            out += line
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out += proc.stdout.read()
        return proc.wait(30), out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_demo_script_exits_0_on_ctrl_c() -> None:
    code, out = interrupt_when_up(["bash", "scripts/demo.sh"])
    assert code == 0, out
    assert "hello through the mesh" in out and out.rstrip().endswith("demo stopped."), out


def test_make_demo_reports_no_error_on_ctrl_c() -> None:
    _, out = interrupt_when_up(["make", "--no-print-directory", "demo"])
    assert "demo stopped." in out, out
    assert "Error" not in out, out
