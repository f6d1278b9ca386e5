"""What the benchmark scripts share: interleaved trials, throughput figures and the JSON output."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# What the MAD worker process loads as its CPU BLAS (backends/cpu.py): the caller's choice, read before a
# comparison script sets MAD_BLAS=mlx for itself (it runs PyTorch; MAD there only checks agreement).
WORKER_BLAS = os.environ.get("MAD_BLAS", "auto")


PAUSE_S = 0.5  # between trials: OpenMP workers spin up to 200 ms (Intel's KMP_BLOCKTIME) after their last job


def interleave(fns: dict[str, Callable[[], float]], trials: int, pause: float = PAUSE_S) -> dict[str, list[float]]:
    """Run each function `trials` times, alternating which goes first (ABBA...).

    Each function returns the seconds it measured itself (so it can leave set-up out of the clock).
    A `pause` before each trial lets the previous one's BLAS threads go to sleep, so that one library's
    spinning workers do not take the cores from the other's trial.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for t in range(trials):
        for name in (names if t % 2 == 0 else names[::-1]):
            time.sleep(pause)
            times[name].append(fns[name]())
    return times


def throughput(times: list[float], tokens: int) -> dict:
    """Figures of `tokens` tokens timed `len(times)` times (seconds): median, tokens/s, ms/token."""
    med = statistics.median(times)
    return {"median_s": med, "tokens_per_s": tokens / med, "ms_per_token": med / tokens * 1e3,
            "trials": len(times), "tokens_per_trial": tokens, "times_s": times}


def timed(fn: Callable, trials: int) -> tuple[object, list[float]]:
    """MLX work timed on the device: `fn()` once untimed (warm-up: traces and compiles), then `trials`
    times, each evaluated and clocked from a synchronised start. Returns the last result and the seconds."""
    import mlx.core as mx

    out = fn()
    mx.eval(out)
    times = []
    for _ in range(trials):
        mx.synchronize()
        t = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t)
    return out, times


def slstm_inputs(steps: int):
    """bench_nxai's sLSTM layer inputs at the 125M shapes (batch 1, 4 heads of 192), for both of its
    processes: gate pre-activations in NX-AI's layout (S, B, 4*H), gate-major; recurrent weights
    (NH, 4*DH, DH); bias (4*H,)."""
    import numpy as np

    B, NH, DH = 1, 4, 192
    H = NH * DH
    rng = np.random.default_rng(0)
    wx = rng.normal(size=(steps, B, 4 * H)).astype(np.float32)
    R = (rng.normal(size=(NH, 4 * DH, DH)) * 0.05).astype(np.float32)
    b = rng.normal(size=(4 * H,)).astype(np.float32)
    return wx, R, b


def write_json(results: dict, dest: str | None) -> None:
    """`--json -` prints the results; `--json PATH` writes them; no `--json`, nothing."""
    if not dest:
        return
    text = json.dumps(results, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")


class MadProcess:
    """MAD's timers served by a child process, `mad_worker.py` (which says why).

    Writes the token arrays next to the checkpoint in `folder`, starts the worker with MAD_BLAS set to
    the caller's choice and waits until it has read the prompt. `timer(command)` returns a function that
    asks the worker to run one trial and returns the seconds it measured.
    """

    def __init__(self, folder: str | Path, prompt, long, steps: int):
        import numpy as np

        self.folder = Path(folder)
        np.save(self.folder / "prompt.npy", np.asarray(prompt, dtype=np.int32))
        np.save(self.folder / "long.npy", np.asarray(long, dtype=np.int32))
        env = dict(os.environ, MAD_BLAS=WORKER_BLAS)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mad_worker.py")), str(folder),
                                      str(steps)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).parent)
        ready = json.loads(self._line())
        self.t_prompt, self.blas = ready["t_prompt"], ready["blas"]

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the MAD worker stopped (exit code {self.proc.wait()})")
        return line

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def timer(self, command: str) -> Callable[[], float]:
        return lambda: float(self.ask(command))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def kernel_setting(text: str, several: bool = False) -> tuple[Any, str, Any]:
    """An argparse type: `MODULE.NAME=VALUE` (with `several`, `MODULE.NAME=V1,V2,...`) as (module, name, the
    value or the list of values), a kernel module's setting a benchmark run changes, e.g.
    mad.kernels.linear_device.SHARED_X=True; values are Python literals."""
    target, sep, given = text.partition("=")
    module_name, dot, name = target.rpartition(".")
    if not sep or not dot or not name or not given:
        raise argparse.ArgumentTypeError(f"{text!r} is not MODULE.NAME=VALUE")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise argparse.ArgumentTypeError(f"{text!r}: no module {module_name}") from None
    if not hasattr(module, name):
        raise argparse.ArgumentTypeError(f"{text!r}: {module_name} has no {name}")
    try:
        values = [ast.literal_eval(v) for v in (given.split(",") if several else [given])]
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not a Python literal") from None
    return module, name, values if several else values[0]


def add_setting_option(ap: argparse.ArgumentParser) -> None:
    """`--setting MODULE.NAME=VALUE` (repeatable): a kernel module's setting for the run (`apply_settings`)."""
    ap.add_argument("--setting", action="append", default=[], metavar="MODULE.NAME=VALUE", type=kernel_setting,
                    help="a kernel module's setting for this run, e.g. mad.kernels.linear_device.PROMPT_ADDMM=True")


def apply_settings(settings: list[tuple[Any, str, Any]]) -> dict[str, str]:
    """Set each (module, name, value) of `--setting`, before anything is traced (settings are read when a
    program is traced); returns them as {"module.NAME": repr(value)} for the run's JSON."""
    for module, name, value in settings:
        setattr(module, name, value)
    return {f"{module.__name__}.{name}": repr(value) for module, name, value in settings}
