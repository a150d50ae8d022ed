"""Running the `tok1d` command in tests: a subprocess in the repository, its output parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOK1D = [sys.executable, "-m", "flows.cli"]
# The pipeline stages that need no trained model: fast enough to run many times in tests.
DATA_STAGES = "stages=[ingest,caption,embed-text]"
# What the quick paths (presets, status, help, config loading, a fully cached run) must not import:
# seconds and about 1 GB each (torch and what builds on it), or a server start (Prefect).
HEAVY = ("torch", "timm", "torchvision", "transformers", "prefect")
MARKER = "tok1d-test-imported:"
# Reports, as the interpreter exits, which of HEAVY it had imported. `python -c` puts the working
# directory (the checkout) first on sys.path, as `python -m` does.
REPORT = f"""
import atexit, json, sys
atexit.register(lambda: print({MARKER!r} + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})),
                              file=sys.stderr))
"""
TOK1D_MAIN = """
import runpy
sys.argv = ["tok1d", *sys.argv[1:]]
runpy.run_module("flows.cli", run_name="__main__")
"""


def tok1d(*args: str, env: dict | None = None, check: bool = True, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    result = subprocess.run([*TOK1D, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"tok1d {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stage_results(output: str) -> dict[str, str]:
    """stage -> computed|cached, from the table `tok1d run` prints."""
    results = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("computed", "cached"):
            results[parts[0]] = parts[1]
    return results


def artifact_ids(output: str) -> dict[str, str]:
    """stage -> artifact id, from the table `tok1d run` prints (its last column is the artifact folder)."""
    return {parts[0]: parts[-1].rsplit("/", 1)[-1] for parts in map(str.split, output.splitlines())
            if len(parts) == 4 and parts[1] in ("computed", "cached")}


def python_imports(code: str, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `code` in a fresh interpreter in the repository: (the process, the HEAVY packages it imported)."""
    result = subprocess.run([sys.executable, "-c", REPORT + code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith(MARKER)]
    assert lines, f"{' '.join(args) or code} did not report its imports:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(lines[-1].removeprefix(MARKER))


def tok1d_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `tok1d <args>` in a fresh interpreter: (the process, the HEAVY packages it imported)."""
    return python_imports(TOK1D_MAIN, *args)
