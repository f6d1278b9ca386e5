"""The `mad` command line: build, run, schema (and the commands the model families add)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

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


TF32_HELP = "allow TF32 for float32 matrix products on GPUs that have it (faster, at about 1e-3 relative error)"
TRUST_HELP = "import the Python modules a topology's `plugins:` names (runs their code)"
MEMORY_HELP = "load even if the weights look larger than the available memory"
TP_HELP = ("run split over the members of the group this process was launched in (tensor parallel; launch every "
           "member with mlx.launch, e.g. `mlx.launch -n 2 --backend ring -- mad run ...`); member 0 prints")
TOKENIZER_HELP = "tokenizer.json, or 'bytes' (default: the checkpoint's; bytes for a topology)"
REVISION_HELP = "branch, tag or commit sha of a Hugging Face repo id (default: main)"

# options that many commands share, declared once
Device = Annotated[Optional[str], typer.Option("--device", help="cpu or gpu")]
Tf32 = Annotated[bool, typer.Option("--tf32", help=TF32_HELP)]
TrustPlugins = Annotated[bool, typer.Option("--trust-plugins", help=TRUST_HELP)]
NoMemoryCheck = Annotated[bool, typer.Option("--no-memory-check", help=MEMORY_HELP)]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16")]
Overrides = Annotated[List[str], typer.Option("--set", help="topology override (also for checkpoints: what fits the "
                                                     "weights)")]
SAMPLING_FLAGS = {"temp": "--temp", "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p",
                  "repetition_penalty": "--repetition-penalty", "max_tokens": "--max-tokens"}


def _setup(device: Optional[str], kernels: Optional[str] = None, tf32: bool = False) -> None:
    """Apply --tf32, --device and (bench) --kernels, before anything is computed."""
    if tf32:
        import os

        os.environ["MLX_ENABLE_TF32"] = "1"  # MLX reads it at the first float32 matrix product
    if kernels is not None and kernels not in ("auto", "reference"):
        raise MadError(f"--kernels must be auto or reference, got '{kernels}'")
    _check_environment()
    _device(device)


def _check_environment() -> None:
    """The kernel settings of the environment (MAD_KERNELS, MAD_NATIVE, MAD_NATIVE_THREADS), checked before
    anything is traced, where a bad value would otherwise surface in the middle of a model's first call."""
    from .kernels import native, registry

    for check in (registry.policy, native.enabled, native.threads):
        try:
            check()
        except ValueError as e:
            raise MadError(f"environment: {e}") from None


def gpu_available() -> bool:
    import mlx.core as mx

    if hasattr(mx, "is_available"):
        try:
            return bool(mx.is_available(mx.gpu))
        except Exception:  # noqa: BLE001 - older MLX: ask the backends
            pass
    metal = getattr(getattr(mx, "metal", None), "is_available", lambda: False)
    cuda = getattr(getattr(mx, "cuda", None), "is_available", lambda: False)
    return bool(metal() or cuda())


def _device(device: Optional[str]) -> None:
    if device:
        import mlx.core as mx

        if device not in ("cpu", "gpu"):
            raise MadError(f"--device must be cpu or gpu, got '{device}'")
        if device == "gpu" and not gpu_available():
            raise MadError("--device gpu: MLX finds no GPU here (no Metal device, or an MLX without its CUDA "
                           "backend: pip install 'mlx[cuda13]'); use --device cpu")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)


def _check_dtype(dtype: Optional[str]) -> None:
    from .program import DTYPES

    if dtype is not None and dtype not in DTYPES:
        raise MadError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:
        raise MadError(f"--seed must be an integer in 0..{2**64 - 1}, got {seed}")


def _check_state_paths(save_state: Optional[Path], load_state: Optional[Path]) -> None:
    """Before any work: the state to load exists, the one to save can be written."""
    from .loading import check_state_target

    if load_state is not None and not load_state.is_file():
        raise MadError(f"--load-state {load_state}: " + ("is a folder" if load_state.is_dir() else "no such file"))
    if save_state is not None:
        check_state_target(save_state, "--save-state")


def _decode(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MadError(f"{what} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save it as "
                       "UTF-8, or give the ids with --prompt-ids") from None


def _read_prompt(prompt: Optional[str], prompt_ids: Optional[str], prompt_file: Optional[Path]):
    given = [p for p in (prompt, prompt_ids, prompt_file) if p is not None]
    if len(given) > 1:
        raise MadError("give only one of --prompt, --prompt-ids, --prompt-file")
    if prompt_ids is not None:
        try:
            return [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise MadError(f"--prompt-ids must be comma-separated integers, got '{prompt_ids}'") from None
    if prompt_file is not None:
        try:
            data = prompt_file.read_bytes()
        except IsADirectoryError:
            raise MadError(f"cannot read --prompt-file {prompt_file}: it is a folder") from None
        except OSError as e:
            raise MadError(f"cannot read --prompt-file: {e.strerror}") from None
        return _decode(data, f"--prompt-file {prompt_file}")
    if prompt == "-":
        stream = getattr(sys.stdin, "buffer", None)  # bytes, to report bad UTF-8 instead of raising
        return _decode(stream.read(), "the prompt on standard input") if stream is not None else sys.stdin.read()
    return prompt if prompt is not None else "Hello"


def _tokenizer_for(path: Path, lm, tok, tokenizer: Optional[str]):
    """The tokenizer a command uses: --tokenizer, else the checkpoint's, else bytes; a checkpoint with a
    vocabulary larger than bytes and no tokenizer is an error (no silent fallback)."""
    from .errors import Source
    from .tokenizers import ByteTokenizer
    from .hub import is_repo_id
    from .loading import is_checkpoint_folder

    if tok is not None:
        return tok
    if (is_checkpoint_folder(path) or is_repo_id(path)) and lm.vocab_size > 256:
        raise MadError(f"the checkpoint has no tokenizer.json and a vocabulary of {lm.vocab_size} ids (bytes cover "
                       "256): pass --tokenizer FILE (a tokenizer.json), or --tokenizer bytes to use raw bytes "
                       "anyway", Source(str(path)))
    return ByteTokenizer()


@app.command()
def build(file: Path = typer.Argument(..., help="topology YAML"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="write resolved.yaml, graph.*, plan.json, summary.txt here (a new or empty folder, or one `mad build` wrote)"),
          set_: List[str] = typer.Option([], "--set", help="override, e.g. dims.D=512 (repeatable)"),
          shard: Optional[int] = typer.Option(None, "--shard", help="also print how the model splits over N "
                                              "tensor-parallel members (which node is split how, parameters "
                                              "per member, collectives per token)"),
          trust_plugins: TrustPlugins = False) -> None:
    """Check a topology and print its summary (every node's shape, parameters and state)."""
    from .loading import _load_topology
    from .program import Program
    from .graph import build_graph
    from .report import build_files, check_build_target, summary_table, write_atomic_dir

    if shard is not None and shard < 1:
        raise MadError(f"--shard must be at least 1, got {shard}")
    if out is not None:
        check_build_target(out, "-o")  # before the work: never build in vain, never touch a user's folder
    program = Program(build_graph(_load_topology(file, set_, trust_plugins)))
    if shard is not None:
        from .shard import plan_shards

        shard_plan = plan_shards(program.graph, shard)  # before anything is printed or written
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(summary_table(program.graph))
    if shard is not None:
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(shard_plan.table())
    if out is not None:
        write_atomic_dir(out, build_files(program), "-o")
        print(f"wrote {out}/: resolved.yaml graph.json graph.mmd graph.dot plan.json summary.txt")


@app.command()
def schema() -> None:
    """Print the JSON Schema of the topology language (for editor completion)."""
    from .schema import topology_schema

    print(json.dumps(topology_schema(), indent=1))


@app.command()
def run(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, checkpoint dir, or Hugging Face "
                                                "repo id (org/name)"),
        model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder or repo id (same as SOURCE)"),
        revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="prompt text, or - for stdin"),
        prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="comma-separated token ids"),
        prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="read the prompt from a file (UTF-8)"),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
        max_tokens: int = typer.Option(100, "--max-tokens", "-m", help="tokens to generate (0: only read the prompt)"),
        temp: float = typer.Option(0.0, "--temp", help=">= 0; 0 is greedy"),
        top_p: float = typer.Option(1.0, "--top-p", help="in (0, 1]"),
        top_k: int = typer.Option(0, "--top-k", help=">= 0; 0 is off"),
        min_p: float = typer.Option(0.0, "--min-p", help="in [0, 1]"),
        repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 0; 1 is off"),
        seed: int = typer.Option(0, "--seed"),
        dtype: Dtype = None,
        set_: Overrides = [],
        save_state: Optional[Path] = typer.Option(None, "--save-state", help="save the final state (safetensors, any file name)"),
        load_state: Optional[Path] = typer.Option(None, "--load-state", help="continue from a saved state"),
        prompts: Optional[Path] = typer.Option(None, "--prompts", help="a file of prompts, one per line (UTF-8), "
                                               "generated as one batch"),
        prompt_cache: Optional[Path] = typer.Option(None, "--prompt-cache", help="continue from the state this file "
                                                    "holds when its prompt begins this one; else save it there"),
        device: Device = None,
        tf32: Tf32 = False,
        trust_plugins: TrustPlugins = False,
        no_memory_check: NoMemoryCheck = False,
        tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help=TP_HELP)) -> None:
    """Generate text (or ids) from a topology with fresh weights, or from a checkpoint."""
    import mlx.core as mx

    from .generate import print_stats, stream_generate
    from .hub import check_revision
    from .sampling import check_sampling
    from .shard import cli_io

    _setup(device, tf32=tf32)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    _check_dtype(dtype)
    _check_seed(seed)
    check_sampling(SAMPLING_FLAGS, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                   repetition_penalty=repetition_penalty, max_tokens=max_tokens)
    _check_state_paths(save_state, load_state)
    check_revision(revision, "--revision")
    _check_batch_flags(prompts, prompt_cache, prompt, prompt_ids, prompt_file, save_state, load_state,
                       repetition_penalty)
    if tensor_parallel and (prompts is not None or prompt_cache is not None):
        raise MadError("--prompts and --prompt-cache do not run with --tensor-parallel")
    text_or_ids = _read_prompts(prompts) if prompts is not None else _read_prompt(prompt, prompt_ids, prompt_file)
    load, load_state_file, save_state_file = cli_io(tensor_parallel)
    mx.random.seed(seed)
    lm, tok = load(path, dtype=dtype, overrides=set_, tokenizer=tokenizer, trust_plugins=trust_plugins,
                   memory_check=not no_memory_check, revision=revision)
    tok = _tokenizer_for(path, lm, tok, tokenizer)
    state = load_state_file(load_state, lm) if load_state else None
    if prompts is not None or prompt_cache is not None:
        text_or_ids, state, note = _batch_or_cached(lm, tok, path, text_or_ids, prompts, prompt_cache, max_tokens,
                                                    seed, temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
        if text_or_ids is None:
            return
    show_ids = prompt_ids is not None and getattr(tok, "is_bytes", False)  # raw ids in, raw ids out
    last = None
    for last in stream_generate(lm, tok, text_or_ids, max_tokens=max_tokens, state=state, temp=temp,
                                top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty):
        if last.token is not None:
            print(f"{last.token} " if show_ids else last.text, end="", flush=True)
    print()
    if last is not None:
        print_stats(last)
        if prompt_cache is not None:
            print(note)
        if save_state:
            save_state_file(save_state, last.state, "--save-state")


@app.command()
def bench(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
          model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
          prompt_tokens: int = typer.Option(512, "--prompt-tokens", "-p"),
          generation_tokens: int = typer.Option(128, "--generation-tokens", "-g"),
          batch_size: int = typer.Option(1, "--batch-size", "-b"),
          num_trials: int = typer.Option(5, "--num-trials", "-n"),
          prefill_step: int = typer.Option(4096, "--prefill-step", help="prompt tokens per forward call"),
          dtype: Dtype = None,
          set_: Overrides = [],
          kernels: str = typer.Option("auto", "--kernels", help="auto (device kernels) or reference (pure MLX)"),
          device: Device = None,
          json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
          profile: bool = typer.Option(False, "--profile", help="also time each stage and block type on a prompt of "
                                       "--prompt-tokens tokens, beside their parameters and state"),
          limits: bool = typer.Option(False, "--limits", help="also measure the device's copy and matrix-product "
                                      "rates and print each figure as a fraction of its limit"),
          tf32: Tf32 = False,
          trust_plugins: TrustPlugins = False,
          no_memory_check: NoMemoryCheck = False,
          tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help=TP_HELP)) -> None:
    """Measure prompt and generation tokens/s (random weights unless a checkpoint is given)."""
    _setup(device, kernels, tf32)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    for name, value in (("--prompt-tokens", prompt_tokens), ("--batch-size", batch_size),
                        ("--num-trials", num_trials), ("--prefill-step", prefill_step)):
        if value < 1:
            raise MadError(f"{name} must be at least 1, got {value}")
    if generation_tokens < 0:
        raise MadError(f"--generation-tokens must be at least 0, got {generation_tokens}")
    _check_dtype(dtype)
    from .kernels.registry import use_reference

    with use_reference(kernels == "reference"):  # the kernel policy for this command only
        _bench(path, prompt_tokens, generation_tokens, batch_size, num_trials, prefill_step, dtype, set_, kernels,
               json_out, trust_plugins, no_memory_check, profile, limits, tensor_parallel)


def _bench(path, prompt_tokens, generation_tokens, batch_size, num_trials, prefill_step, dtype, set_, kernels,
           json_out, trust_plugins, no_memory_check, profile=False, limits=False, tensor_parallel=False) -> None:
    from .bench import bench as run_bench, profile as run_profile, profile_tables
    from .loading import available_memory
    from .shard import cli_io, tensor_parallel_report

    load = cli_io(tensor_parallel)[0]
    if tensor_parallel:
        import mlx.core as mx

        mx.random.seed(0)  # fresh weights: every member draws the same

    lm, _ = load(path, dtype=dtype, overrides=set_, trust_plugins=trust_plugins, memory_check=not no_memory_check)
    if not no_memory_check:  # the prompt ids and two states per sequence, beside the weights
        need = batch_size * (prompt_tokens * 4 + 2 * lm.program.graph.state_bytes())
        avail, where = available_memory()
        if avail is not None and need > avail:
            raise MadError(f"--batch-size {batch_size} x --prompt-tokens {prompt_tokens} need about {need / 1e9:.1f} GB "
                           f"for the prompt and the states, but only {avail / 1e9:.1f} GB are available ({where}); "
                           "--no-memory-check tries anyway")
    result = run_bench(lm, prompt_tokens, generation_tokens, batch_size, num_trials, prefill_step,
                       echo=(lambda line: None) if json_out else print)
    if tensor_parallel:
        result["tensor_parallel"] = tensor_parallel_report(lm, echo=(lambda line: None) if json_out else print)
    if limits:
        from .bench import device_limits, limit_fractions, size_text, step_costs

        result["limits"] = device_limits(lm.program.dtype)
        result["costs"] = step_costs(lm)
        result["fractions"] = limit_fractions(result, result["limits"], result["costs"])
        if not json_out:
            lim, frac = result["limits"], result["fractions"]
            print(f"Device: copy {lim['copy_bytes_per_s'] / 1e12:.3f} TB/s, matmul {lim['matmul_flops_per_s'] / 1e12:.1f} "
                  f"TFLOP/s ({lim['matmul_size']}^3 {lim['matmul_dtype']})")
            if "decode_fraction" in frac:
                print(f"Decode: {size_text(frac['decode_bytes_per_step'])} a step, median at "
                      f"{100 * frac['decode_fraction']:.1f}% of the copy rate")
            print(f"Prompt: {result['costs']['flops_per_token'] / 1e9:.4g} GFLOP a token, median at "
                  f"{100 * frac['prefill_fraction']:.1f}% of the matmul rate")
    if profile:
        result["profile"] = run_profile(lm, prompt_tokens, batch_size)
        if not json_out:
            console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
            for table in profile_tables(result["profile"]):
                console.print()
                console.print(table)
    if json_out:
        result.update(model=str(path), dtype=str(lm.program.dtype), kernels=kernels)
        print(json.dumps(result, indent=1))


@app.command()
def train(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir to fine-tune "
                                                  "(with --resume: may be left out)"),
          data: Path = typer.Option(..., "--data", help="a text file, a folder of text files, or a JSONL file with a "
                                    "'text' field (UTF-8)"),
          out: Path = typer.Option(..., "-o", "--out", help="the checkpoint folder to write (new, empty, or one MAD "
                                   "wrote)"),
          steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps in all [1000]"),
          batch: Optional[int] = typer.Option(None, "--batch", help="sequences per step [8]"),
          seq: Optional[int] = typer.Option(None, "--seq", help="tokens per sequence [256]"),
          lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate [3e-4]"),
          warmup: Optional[int] = typer.Option(None, "--warmup", help="linear warmup steps [min(100, steps/10)]"),
          schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine (to lr/10 at --steps) or constant "
                                                 "[cosine]"),
          weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay [0.01]"),
          grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="clip the gradient norm; 0: off [1.0]"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 or bfloat16 (weights and compute) "
                                              "[float32]"),
          seed: Optional[int] = typer.Option(None, "--seed", help="initial weights and data order [0]"),
          eval_every: Optional[int] = typer.Option(None, "--eval-every", help="held-out loss every N steps; 0: at "
                                                   "the end only [100]"),
          save_every: Optional[int] = typer.Option(None, "--save-every", help="write the checkpoint every N steps; "
                                                   "0: at the end only [500]"),
          resume: bool = typer.Option(False, "--resume", help="continue the run saved in -o (same settings)"),
          device: Device = None,
          tf32: Tf32 = False,
          trust_plugins: TrustPlugins = False,
          no_memory_check: NoMemoryCheck = False) -> None:
    """Train a model (any topology) as a next-token language model; write a checkpoint `mad run` reads."""
    from .train import TrainConfig, train as run_train

    _setup(device, tf32=tf32)
    given = {name: value for name, value in (
        ("steps", steps), ("batch", batch), ("seq", seq), ("lr", lr), ("warmup", warmup), ("schedule", schedule),
        ("weight_decay", weight_decay), ("grad_clip", grad_clip), ("dtype", dtype), ("seed", seed),
        ("eval_every", eval_every), ("save_every", save_every)) if value is not None}
    config = TrainConfig(**given)
    if not resume:
        config.check()  # bad flags before anything is read
    run_train(source, data, out, config, resume=resume, given=set(given), trust_plugins=trust_plugins,
              memory_check=not no_memory_check)


@app.command()
def chat(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
         model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
         max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="per reply"),
         temp: float = typer.Option(0.0, "--temp", help=">= 0; 0 is greedy"),
         top_p: float = typer.Option(1.0, "--top-p", help="in (0, 1]"),
         seed: int = typer.Option(0, "--seed"),
         dtype: Dtype = None,
         tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
         save_state: Optional[Path] = typer.Option(None, "--save-state", help="save the conversation state at exit"),
         load_state: Optional[Path] = typer.Option(None, "--load-state", help="resume a saved conversation"),
         system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="a system message read before "
                                                     "the first turn (not with --load-state)"),
         use_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="render each turn "
                                           "with the checkpoint's chat template, when it has one [on]"),
         device: Device = None,
         tf32: Tf32 = False,
         trust_plugins: TrustPlugins = False,
         no_memory_check: NoMemoryCheck = False) -> None:
    """Chat: each turn reads only the new text; the recurrent state carries the conversation.

    With a chat template (the checkpoint's tokenizer_config.json, chat_template.json or .jinja) each turn
    is the template's rendering of the new user message with the assistant's prompt after it (the first
    turn also of the --system-prompt); without one, the line as typed."""
    import mlx.core as mx

    from .chat_template import ChatTemplate, template_source
    from .generate import stream_generate
    from .loading import load, load_state_file, save_state_file
    from .sampling import check_sampling

    _setup(device, tf32=tf32)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    _check_dtype(dtype)
    _check_seed(seed)
    check_sampling(SAMPLING_FLAGS, temp=temp, top_p=top_p, max_tokens=max_tokens)
    _check_state_paths(save_state, load_state)
    if system_prompt is not None and load_state is not None:
        raise MadError("--system-prompt starts a conversation and --load-state continues one: give one of them")
    source, special, where = template_source(Path(path)) if use_template else (None, {}, "")
    template = ChatTemplate(source, special, where) if source is not None else None
    mx.random.seed(seed)
    lm, tok = load(path, dtype=dtype, tokenizer=tokenizer, trust_plugins=trust_plugins,
                   memory_check=not no_memory_check)
    tok = _tokenizer_for(path, lm, tok, tokenizer)
    state = load_state_file(load_state, lm) if load_state else None
    system = system_prompt  # read with the first turn
    interactive = sys.stdin.isatty()
    n = 0
    while True:
        if interactive:
            print(">> ", end="", flush=True)
        stream = getattr(sys.stdin, "buffer", None)  # bytes, to report bad UTF-8 instead of raising
        raw = stream.readline() if stream is not None else sys.stdin.readline().encode("utf-8", "surrogateescape")
        n += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            err_console.print(f"error: line {n} of standard input is not UTF-8 text (byte {raw[e.start]:#04x} at "
                              f"offset {e.start}); skipped", markup=False)
            continue
        if not line or line.strip() in ("q", "quit", "exit"):
            break
        if not line.strip():
            continue
        try:
            if template is not None:
                messages = [{"role": "system", "content": system}] if system else []
                prompt = template.render(messages + [{"role": "user", "content": line.rstrip("\n")}])
            else:
                prompt = (system + "\n" if system else "") + line.rstrip("\n") + "\n"
            for r in stream_generate(lm, tok, prompt, max_tokens=max_tokens, state=state, temp=temp, top_p=top_p):
                print(r.text, end="", flush=True)
        except MadError as e:  # e.g. a character the vocabulary lacks: this turn only; the conversation goes on
            err_console.print(e.render(), markup=False, soft_wrap=True)
            continue
        state, system = r.state, None
        print()
    if save_state and state is not None:
        save_state_file(save_state, state, "--save-state")


@app.command()
def design(files: List[Path] = typer.Argument(..., help="topology files to compare"),
           task: List[str] = typer.Option(["all"], "--task", help="a task, a comma list, or all (in-context-recall, "
                                          "fuzzy-in-context-recall, noisy-in-context-recall, selective-copying, "
                                          "compression, memorization, mqar, parity, majority)"),
           steps: int = typer.Option(300, "--steps", help="training steps per run"),
           seeds: int = typer.Option(1, "--seeds", help="runs per topology and task (seeds 0..K-1)"),
           batch: int = typer.Option(32, "--batch", help="sequences per step"),
           lr: float = typer.Option(1e-3, "--lr", help="peak AdamW learning rate (cosine schedule)"),
           weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay"),
           preset: str = typer.Option("small", "--preset", help="small (a CPU in minutes) or mad (mad-lab's "
                                      "baseline task settings; parity, majority: the xLSTM paper's lengths)"),
           train_len: Optional[str] = typer.Option(None, "--train-len", help="parity, majority: lengths of the "
                                                   "training bit strings, MIN:MAX (default: the preset's)"),
           test_len: Optional[str] = typer.Option(None, "--test-len", help="parity, majority: lengths of the "
                                                  "held-out bit strings, MIN:MAX (longer than trained: length "
                                                  "generalisation)"),
           plot: Optional[Path] = typer.Option(None, "-o", "--plot", help="also write an SVG chart of the "
                                               "accuracies to this file"),
           json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
           device: Device = None,
           trust_plugins: TrustPlugins = False) -> None:
    """Train each topology on synthetic tasks (MAD, formal languages); a table of held-out accuracies."""
    from .design import DesignConfig, check_plot_target, design as run_design, parse_lengths, table, write_plot

    _setup(device)
    cfg = DesignConfig(steps=steps, seeds=seeds, batch=batch, lr=lr, weight_decay=weight_decay, preset=preset,
                       train_len=None if train_len is None else parse_lengths(train_len, "--train-len"),
                       test_len=None if test_len is None else parse_lengths(test_len, "--test-len")).check()
    if plot is not None:
        check_plot_target(plot)
    summary = run_design(files, task, cfg, trust_plugins=trust_plugins,
                         echo=None if json_out else (lambda line: err_console.print(line, markup=False)))
    if plot is not None:
        write_plot(summary, plot)
    if json_out:
        print(json.dumps(summary, indent=1))
    else:
        Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table(summary))


@app.command("eval")
def eval_(source: Optional[Path] = typer.Argument(None, help="checkpoint dir, Hugging Face repo id (org/name), topology "
                                                 "file or build dir"),
          model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder or repo id (same as SOURCE)"),
          data: Path = typer.Option(..., "--data", help="a text file, a folder of text files, or a JSONL file with a "
                                    "'text' field (UTF-8), as `mad train` reads it"),
          split: str = typer.Option("held-out", "--split", help="held-out (the last 5%, what `mad train` holds out) "
                                    "or all"),
          seq: int = typer.Option(256, "--seq", help="tokens per sequence (use the training's --seq)"),
          batch: int = typer.Option(8, "--batch", help="sequences per forward call"),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="score at most this many tokens"),
          dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the "
                                              "checkpoint's)"),
          tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
          revision: Optional[str] = typer.Option(None, "--revision", help=REVISION_HELP),
          json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
          device: Device = None,
          tf32: Tf32 = False,
          trust_plugins: TrustPlugins = False,
          no_memory_check: NoMemoryCheck = False) -> None:
    """Held-out loss (nats/token), perplexity and tokens/s of a model on text, e.g. a quantized model against bf16."""
    from .data import data_files
    from .evaluate import SPLITS, check_settings, evaluate_data
    from .hub import check_revision
    from .loading import load

    _setup(device, tf32=tf32)
    path = model or source
    if path is None:
        raise MadError("give a checkpoint folder, a Hugging Face repo id or a topology file (SOURCE or --model)")
    _check_dtype(dtype)
    if split not in SPLITS:
        raise MadError(f"--split must be {' or '.join(SPLITS)}, got '{split}'")
    check_settings(None, seq, batch, max_tokens)
    check_revision(revision, "--revision")
    data_files(data)  # a missing --data fails before the model is loaded
    lm, tok = load(path, dtype=dtype, tokenizer=tokenizer, trust_plugins=trust_plugins,
                   memory_check=not no_memory_check, revision=revision)
    tok = _tokenizer_for(path, lm, tok, tokenizer)
    result = evaluate_data(lm, data, tok, seq=seq, batch=batch, max_tokens=max_tokens, split=split)
    result.update(model=str(path), data=str(data))
    if json_out:
        print(json.dumps(result, indent=1))
        return
    ppl = "beyond float range" if result["perplexity"] is None else f"{result['perplexity']:.4f}"
    bpb = "" if result["bits_per_byte"] is None else f", {result['bits_per_byte']:.4f} bits per byte"
    print(f"{split}: {result['tokens']:,} tokens ({result['windows']:,} sequences of {seq}) of {data} "
          f"({result['corpus_tokens']:,} tokens in all)")
    print(f"Loss: {result['loss']:.4f} nats/token, perplexity {ppl}{bpb}")
    print(f"Speed: {result['tokens_per_sec']:,.0f} tokens/s ({result['seconds']:.2f} s, {result['dtype']})")


@app.command()
def convert(source: Path = typer.Argument(..., help="topology file, build dir, MAD / Hugging Face / NX-AI checkpoint dir"),
            out: Path = typer.Option(..., "-o", "--out", help="the MAD checkpoint folder to write (new, or an empty folder)"),
            quantize: bool = typer.Option(False, "-q", "--quantize", help="quantize the projections, the head and the "
                                          "embeddings (mx.quantize, as mlx-lm)"),
            q_bits: Optional[int] = typer.Option(None, "--q-bits", help="bits per weight: affine 2, 3, 4, 5, 6, 8 [4]; "
                                                 "mxfp4 and nvfp4 4; mxfp8 8"),
            q_group_size: Optional[int] = typer.Option(None, "--q-group-size", help="weights per scale: affine 32, 64, "
                                                       "128 [64]; mxfp4 and mxfp8 32; nvfp4 16"),
            q_mode: Optional[str] = typer.Option(None, "--q-mode", help="affine (the default), mxfp4, mxfp8 or nvfp4"),
            dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16: the weights left "
                                                "unquantized and the scales (default: the source's)"),
            set_: Overrides = [],
            seed: int = typer.Option(0, "--seed", help="the fresh weights of a topology file"),
            trust_plugins: TrustPlugins = False,
            no_memory_check: NoMemoryCheck = False) -> None:
    """Write a model as a MAD checkpoint folder, quantized with -q; `mad run|chat|bench` and mad.load read it."""
    from .quantize import convert as run_convert

    _check_dtype(dtype)
    _check_seed(seed)
    run_convert(source, out, quantize, q_bits, q_group_size, q_mode, dtype, set_, seed, trust_plugins,
                not no_memory_check)


def _check_batch_flags(prompts, prompt_cache, prompt, prompt_ids, prompt_file, save_state, load_state,
                       repetition_penalty) -> None:
    """`mad run --prompts` / `--prompt-cache`: the flags they do not go with, the cache file's target."""
    from .loading import check_state_target

    if prompts is not None:
        if any(p is not None for p in (prompt, prompt_ids, prompt_file)):
            raise MadError("give only one of --prompts, --prompt, --prompt-ids, --prompt-file")
        if save_state is not None:
            raise MadError("--save-state keeps one sequence's state: it does not go with --prompts")
    if prompts is not None or prompt_cache is not None:
        if repetition_penalty != 1.0:
            raise MadError("--repetition-penalty does not go with --prompts or --prompt-cache")
    if prompt_cache is not None:
        if load_state is not None:
            raise MadError("give only one of --prompt-cache and --load-state (both start from a saved state)")
        check_state_target(prompt_cache, "--prompt-cache")


def _read_prompts(file: Path) -> list[str]:
    """--prompts: the non-empty lines of a UTF-8 file."""
    try:
        data = file.read_bytes()
    except IsADirectoryError:
        raise MadError(f"cannot read --prompts {file}: it is a folder") from None
    except OSError as e:
        raise MadError(f"cannot read --prompts {file}: {e.strerror}") from None
    lines = [line for line in _decode(data, f"--prompts {file}").splitlines() if line.strip()]
    if not lines:
        raise MadError(f"--prompts {file}: no prompt in the file (one per line)")
    return lines


def _batch_or_cached(lm, tok, path, text_or_ids, prompts, prompt_cache, max_tokens, seed, **sampling):
    """`mad run --prompts` (generated here as one batch: returns None) or `--prompt-cache` (returns the part
    of the prompt left to read, the state that has read the rest, and a line saying what the cache did).

    The cache file holds the state after the prompt's last whole block of `PREFILL_BLOCK` tokens (before
    its last token), where a prompt read from the start is split anyway: continuing from it gives the
    tokens of a run without it (mad.prompt_cache says why). It is replaced when its prompt does not begin
    this one, or begins it and is shorter.
    """
    import mlx.core as mx

    from .generate import PREFILL_BLOCK, batch_generate, print_stats, prompt_ids
    from .model import check_prompt
    from .prompt_cache import PromptCache, read_cache_file, write_cache_file

    found = read_cache_file(prompt_cache, lm) if prompt_cache is not None else None
    ids = [prompt_ids(t, tok) for t in (text_or_ids if prompts is not None else [text_or_ids])]
    for i, one in enumerate(ids):
        try:
            check_prompt(one, lm.vocab_size)
        except MadError as e:
            raise MadError(f"--prompts {prompts}: line {i + 1}: {e.diagnostics[0].message}" if prompts is not None
                           else e.diagnostics[0].message) from None
    shared = len(ids[0])  # the prefix every prompt shares: what the cache file can hold
    for one in ids[1:]:
        shared = min(shared, next((k for k, (a, b) in enumerate(zip(ids[0], one)) if a != b), len(one)))
    block_end = (min(shared, min(map(len, ids)) - 1)) // PREFILL_BLOCK * PREFILL_BLOCK
    reused = len(found[0]) if found and all(one[:len(found[0])] == found[0] for one in ids) else 0
    state = found[1] if reused else None
    if prompts is None:
        start = reused
        if block_end > reused:
            _, state = lm.prefill(mx.array([ids[0][reused:block_end]], dtype=mx.int32), state, PREFILL_BLOCK)
            write_cache_file(prompt_cache, ids[0][:block_end], state, lm, str(path))
            start = block_end
        note = f"Prompt cache: {reused} tokens reused" + (f", {block_end} saved to {prompt_cache}"
                                                          if block_end > reused else f" from {prompt_cache}")
        return ids[0][start:], state, note
    cache = PromptCache(1 << 62) if prompt_cache is not None else None
    if reused:
        cache.add(found[0], found[1])
    result = batch_generate(lm, tok, ids, max_tokens, seed=seed, prompt_cache=cache,
                            cuts=(block_end,) if block_end else (), **sampling)
    for i, text in enumerate(result.texts):
        print(f"[{i + 1}] {text}")
    print_stats(result)
    if prompt_cache is not None:
        hit, state, _ = cache.lookup(ids[0][:block_end + 1]) if block_end > reused else (0, None, None)
        if hit == block_end and hit > 0:
            write_cache_file(prompt_cache, ids[0][:block_end], state, lm, str(path))
        print(f"Prompt cache: {reused} tokens reused" + (f", {block_end} saved to {prompt_cache}" if hit else ""))
    return None, None, None


@app.command()
def serve(source: Optional[Path] = typer.Argument(None, help="topology file, build dir, or checkpoint dir"),
          model: Optional[Path] = typer.Option(None, "--model", help="checkpoint folder (same as SOURCE)"),
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(8080, "--port"),
          model_name: Optional[str] = typer.Option(None, "--model-name", help="the model id clients give (default: "
                                                   "the folder or file name)"),
          max_batch: int = typer.Option(32, "--max-batch", help="sequences decoded together at most"),
          max_tokens: int = typer.Option(512, "--max-tokens", "-m", help="per completion, when a request does not say"),
          temp: float = typer.Option(0.0, "--temp", help="when a request does not say; 0 is greedy"),
          top_p: float = typer.Option(1.0, "--top-p", help="when a request does not say"),
          prompt_cache_bytes: Optional[int] = typer.Option(None, "--prompt-cache-bytes", help="memory for the prompt "
                                                           "state snapshots (0: no prompt cache) [4 GiB]"),
          max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", help="largest request body "
                                                       "[16 MiB]"),
          tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
          dtype: Dtype = None,
          set_: Overrides = [],
          device: Device = None,
          log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug"),
          tf32: Tf32 = False,
          trust_plugins: TrustPlugins = False,
          no_memory_check: NoMemoryCheck = False,
          tensor_parallel: bool = typer.Option(False, "--tensor-parallel", help="serve split over the members of "
                                               "the group this process was launched in (`mlx.launch -n 2 --backend "
                                               "ring -- mad serve DIR --tensor-parallel`): member 0 serves, the "
                                               "others run its steps and open no port")) -> None:
    """Serve the OpenAI API (completions, chat, streaming); concurrent clients are decoded as one batch."""
    from .prompt_cache import DEFAULT_BYTES
    from .serve import MAX_BODY_BYTES, check_server_args, serve as run_server
    from .shard import cli_io

    _setup(device, tf32=tf32)
    path = model or source
    if path is None:
        raise MadError("give a topology file, a build folder or --model DIR")
    _check_dtype(dtype)
    prompt_cache_bytes = DEFAULT_BYTES if prompt_cache_bytes is None else prompt_cache_bytes
    max_body_bytes = MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise MadError(f"--log-level must be critical, error, warning, info or debug, got '{log_level}'")
    check_server_args(host, port, max_batch, max_tokens, prompt_cache_bytes, max_body_bytes, temp, top_p)
    load = cli_io(tensor_parallel)[0]
    if tensor_parallel:
        import mlx.core as mx

        mx.random.seed(0)  # fresh weights (a topology): every member draws the same
    lm, tok = load(path, dtype=dtype, overrides=set_, tokenizer=tokenizer, trust_plugins=trust_plugins,
                   memory_check=not no_memory_check)
    tok = _tokenizer_for(path, lm, tok, tokenizer)
    name = model_name or (Path(path).stem if Path(path).is_file() else Path(path).resolve().name)
    settings = dict(model_name=name, folder=Path(path) if Path(path).is_dir() else None, host=host, port=port,
                    max_batch=max_batch, max_tokens=max_tokens, temp=temp, top_p=top_p,
                    prompt_cache_bytes=prompt_cache_bytes, max_body_bytes=max_body_bytes, log_level=log_level)
    if tensor_parallel:
        from .shard_serve import serve_sharded

        serve_sharded(lm, tok, **settings)  # member 0 serves, the others run its steps
        return
    run_server(lm, tok, **settings)


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
    except BrokenPipeError:  # `mad run ... | head`: the reader left; no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
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
