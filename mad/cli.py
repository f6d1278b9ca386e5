"""The `mad` command line: build, run, schema (and the commands the model families add)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .errors import MadError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MAD: declarative block wiring for recurrent language models on MLX.")
err_console = Console(stderr=True, highlight=False)
DEBUG = {"on": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks for errors")) -> None:
    DEBUG["on"] = debug


def _setup(device: Optional[str], kernels: str = "auto") -> None:
    """Apply --device and --kernels."""
    from .kernels.registry import set_policy

    if kernels not in ("auto", "reference"):
        raise MadError(f"--kernels must be auto or reference, got '{kernels}'")
    set_policy(kernels)
    _device(device)


def _device(device: Optional[str]) -> None:
    if device:
        import mlx.core as mx

        if device not in ("cpu", "gpu"):
            raise MadError(f"--device must be cpu or gpu, got '{device}'")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)


@app.command()
def build(file: Path = typer.Argument(..., help="topology YAML"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="write resolved.yaml, graph.*, plan.json, summary.txt here"),
          set_: List[str] = typer.Option([], "--set", help="override, e.g. dims.D=512 (repeatable)")) -> None:
    """Check a topology and print its summary (every node's shape, parameters and state)."""
    from .program import Program
    from .graph import build_graph
    from .report import build_files, summary_table, write_atomic_dir
    from .topology import load_topology

    program = Program(build_graph(load_topology(file, set_)))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(summary_table(program.graph))
    if out is not None:
        write_atomic_dir(out, build_files(program))
        print(f"wrote {out}/: resolved.yaml graph.json graph.mmd graph.dot plan.json summary.txt")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the topology language (for editor completion)."""
    from .schema import topology_schema

    print(json.dumps(topology_schema(), indent=1))


@app.command()
def run(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
        model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="prompt text, or - for stdin"),
        prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="comma-separated token ids"),
        prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the prompt from a file"),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json (default: the checkpoint's, else bytes)"),
        max_tokens: int = typer.Option(100, "--max-tokens", "-m"),
        temp: float = typer.Option(0.0, "--temp"),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        min_p: float = typer.Option(0.0, "--min-p"),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
        seed: int = typer.Option(0, "--seed"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16"),
        set_: List[str] = typer.Option([], "--set", help="topology override (with a topology file)"),
        save_state: Optional[Path] = typer.Option(None, "--save-state", help="save the final state (safetensors)"),
        load_state: Optional[Path] = typer.Option(None, "--load-state", help="continue from a saved state"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu or gpu")) -> None:
    """Generate text (or ids) from a topology with fresh weights, or from a checkpoint."""
    import mlx.core as mx

    from .generate import HFTokenizer, print_stats, stream_generate
    from .loading import load, load_state_file, save_state_file

    _device(device)
    mx.random.seed(seed)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    lm, tok = load(path, dtype=dtype, overrides=set_)
    if tokenizer is not None:
        tok = HFTokenizer(tokenizer, getattr(tok, "eos_token_ids", ()))
    given = [p for p in (prompt, prompt_ids, prompt_file) if p is not None]
    if len(given) > 1:
        raise MadError("give only one of --prompt, --prompt-ids, --prompt-file")
    if prompt_ids is not None:
        try:
            text_or_ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise MadError(f"--prompt-ids must be comma-separated integers, got '{prompt_ids}'") from None
    elif prompt_file is not None:
        try:
            text_or_ids = prompt_file.read_text()
        except OSError as e:
            raise MadError(f"cannot read --prompt-file: {e.strerror}") from None
    elif prompt == "-":
        text_or_ids = sys.stdin.read()
    else:
        text_or_ids = prompt if prompt is not None else "Hello"
    state = load_state_file(load_state, lm) if load_state else None
    from .generate import ByteTokenizer

    tok = tok or ByteTokenizer()
    show_ids = prompt_ids is not None and getattr(tok, "is_bytes", False)  # raw ids in, raw ids out
    last = None
    for last in stream_generate(lm, tok, text_or_ids, max_tokens=max_tokens, state=state, temp=temp,
                                top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty):
        print(f"{last.token} " if show_ids else last.text, end="", flush=True)
    print()
    if last is not None:
        print_stats(last)
        if save_state:
            save_state_file(save_state, last.state)


@app.command()
def bench(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
          model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
          prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p"),
          generation_tokens: int = typer.Option(128, "--generation-tokens", "-g"),
          batch_size: int = typer.Option(1, "--batch-size", "-b"),
          num_trials: int = typer.Option(5, "--num-trials", "-n"),
          prefill_step: int = typer.Option(4096, "--prefill-step", help="prompt tokens per forward call"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16"),
          set_: List[str] = typer.Option([], "--set", help="topology override (with a topology file)"),
          kernels: str = typer.Option("auto", "--kernels", help="auto (device kernels) or reference (pure MLX)"),
          device: Optional[str] = typer.Option(None, "--device", help="cpu or gpu"),
          json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of text")) -> None:
    """Measure prompt and generation tokens/s (random weights unless a checkpoint is given)."""
    from .bench import bench as run_bench
    from .loading import load

    _setup(device, kernels)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    for name, value in (("--prompt-tokens", prompt_tokens), ("--batch-size", batch_size),
                        ("--num-trials", num_trials), ("--prefill-step", prefill_step)):
        if value < 1:
            raise MadError(f"{name} must be at least 1, got {value}")
    if generation_tokens < 0:
        raise MadError(f"--generation-tokens must be at least 0, got {generation_tokens}")
    lm, _ = load(path, dtype=dtype, overrides=set_)
    result = run_bench(lm, prompt_tokens, generation_tokens, batch_size, num_trials, prefill_step,
                       echo=(lambda line: None) if json_out else print)
    if json_out:
        result.update(model=str(path), dtype=str(lm.program.dtype), kernels=kernels)
        print(json.dumps(result, indent=1))


@app.command()
def chat(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
         model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
         max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="per reply"),
         temp: float = typer.Option(0.0, "--temp"),
         top_p: float = typer.Option(1.0, "--top-p"),
         seed: int = typer.Option(0, "--seed"),
         dtype: Optional[str] = typer.Option(None, "--dtype"),
         save_state: Optional[Path] = typer.Option(None, "--save-state", help="save the conversation state at exit"),
         load_state: Optional[Path] = typer.Option(None, "--load-state", help="resume a saved conversation"),
         device: Optional[str] = typer.Option(None, "--device")) -> None:
    """Chat: each turn reads only the new text; the recurrent state carries the conversation."""
    import mlx.core as mx

    from .generate import ByteTokenizer, stream_generate
    from .loading import load, load_state_file, save_state_file

    _device(device)
    mx.random.seed(seed)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    lm, tok = load(path, dtype=dtype)
    tok = tok or ByteTokenizer()
    state = load_state_file(load_state, lm) if load_state else None
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("q", "quit", "exit"):
            break
        if not line.strip():
            continue
        for r in stream_generate(lm, tok, line.rstrip("\n") + "\n", max_tokens=max_tokens, state=state,
                                 temp=temp, top_p=top_p):
            print(r.text, end="", flush=True)
        state = r.state
        print()
    if save_state and state is not None:
        save_state_file(save_state, state)


def main() -> None:
    try:
        app(standalone_mode=False)
    except MadError as e:
        if DEBUG["on"]:
            raise
        err_console.print(e.render(), markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors of the (possibly vendored) click under typer
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
