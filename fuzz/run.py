"""Run every fuzz target (fuzz/targets.py) with a time budget: `FUZZ_SECONDS=300 make fuzz`.

    python -m fuzz.run [--seconds N] [--engine hypothesis|atheris] [TARGET ...]

The budget is split evenly between the targets. The hypothesis engine runs batches of random examples
until the target's deadline (failures are saved in .hypothesis/ and replayed first next time); the
atheris engine (if `pip install atheris` worked) runs one coverage-guided child per target, feeding
libFuzzer's bytes to Hypothesis' `fuzz_one_input`, with a corpus under build/fuzz-corpus/TARGET.
Exit status 1 if any target failed; the minimal failing input is printed: make it a regression test in
tests/reliability/test_fuzz_regressions.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

REPO = Path(__file__).resolve().parent.parent


def _hypothesis_test(name: str, max_examples: int, derandomize: bool = False) -> Any:
    from fuzz.targets import TARGETS

    target = TARGETS[name]

    @settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=derandomize,
        print_blob=True,
    )
    @given(target.strategy)
    def run(value: Any) -> None:
        target.run(value)

    return run, target


def run_hypothesis(name: str, seconds: float) -> bool:
    test, target = _hypothesis_test(name, max_examples=2000)
    deadline = time.monotonic() + seconds
    batches = 0
    while True:
        try:
            test()
        except Exception as exc:
            notes = "\n".join(getattr(exc, "__notes__", []))
            print(f"FAIL {name} after {target.tried} inputs: {exc!r}\n{notes}", flush=True)
            return False
        batches += 1
        if time.monotonic() >= deadline:
            break
    print(f"ok   {name}: {target.tried} inputs in {seconds:.0f} s ({batches} batches)", flush=True)
    return True


def atheris_child(name: str, seconds: float) -> None:
    import atheris  # type: ignore[import-not-found]

    with atheris.instrument_imports(include=["meshd", "h2", "hpack", "hyperframe", "h11", "dns"]):
        test, _ = _hypothesis_test(name, max_examples=10**9)
    corpus = REPO / "build" / "fuzz-corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", "-rss_limit_mb=4096", str(corpus)]
    atheris.Setup(args, test.hypothesis.fuzz_one_input)
    atheris.Fuzz()


def run_atheris(name: str, seconds: float) -> bool:
    cmd = [sys.executable, "-m", "fuzz.run", "--atheris-child", name, "--seconds", str(seconds)]
    proc = subprocess.run(cmd, cwd=REPO, timeout=seconds + 120, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    ok = proc.returncode == 0
    print(
        f"{'ok  ' if ok else 'FAIL'} {name} (atheris, {seconds:.0f} s)" + ("" if ok else f"\n{tail}"),
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", "60")))
    parser.add_argument(
        "--engine", choices=["hypothesis", "atheris"], default=os.environ.get("FUZZ_ENGINE", "hypothesis")
    )
    parser.add_argument("--atheris-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.atheris_child:
        sys.argv = sys.argv[:1]
        atheris_child(args.atheris_child, args.seconds)
        return 0
    from fuzz.targets import TARGETS

    names = args.targets or sorted(TARGETS)
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(TARGETS))}")
    each = args.seconds / len(names)
    print(f"fuzzing {len(names)} targets, {each:.0f} s each, engine {args.engine}", flush=True)
    runner = run_atheris if args.engine == "atheris" else run_hypothesis
    failed = [n for n in names if not runner(n, each)]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
