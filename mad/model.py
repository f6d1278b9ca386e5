"""The language-model wrapper: a `Program` with one token input and a `logits` output, and its checks.

`LanguageModel` is what `mad.load` returns and what the decode loop (`mad.generate`) drives; the token and
state checks sit here because the vocabulary and the state layout are the model's.

It is an `mlx.nn.Module` whose entries are the program's node modules (`Program.root`'s, the same
objects): `tree_flatten(model.parameters())` names are the checkpoint names (`backbone.blocks.0.mlstm_layer.q
.weight`), fused program or not, so MLX training works as usual:

    loss_and_grad = nn.value_and_grad(model, lambda model, x, y: nn.losses.cross_entropy(model(x)[0], y).mean())
    loss, grads = loss_and_grad(model, tokens, targets)
    optimizer.update(model, grads)          # mlx.optimizers.AdamW(...), say
    mx.eval(model.parameters(), optimizer.state)
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .dims import shape_str
from .errors import Diagnostics, MadError
from .kernels.registry import inference
from .program import Program


PREFILL_STEP = 4096  # prompt tokens per forward call when reading a long prompt


class LanguageModel(nn.Module):
    """A Program with one token input and a `logits` output: `logits, state = model(tokens, state=None)`.

    tokens: int32 (B, T); logits: float32 (B, T, V); state: {node: {name: float32 array}}.

    An `nn.Module` holding the program's node modules under the node names (the same objects as
    `program.root`, so an update through either is seen by both): `parameters()`, `trainable_parameters()`,
    `update()`, `freeze()`, `save_weights()` and `mlx.optimizers` work as for any MLX module and speak the
    checkpoint names; `nn.value_and_grad(model, fn)` differentiates `fn(model, ...)` through the compiled
    program in every mode (`model(tokens, mode="parallel" | "chunkwise" | ...)`). A fused program's
    concatenated weights follow the members' arrays (`Program._sync_fused`). `update()` also takes a tree
    nested by the dots of the names (`tree_unflatten` of a checkpoint), and `load_weights()` goes through
    `Program.load_weights` (names, shapes and dtypes checked before anything changes).
    """

    def __init__(self, program: Program, tokenizer: Any = None):
        super().__init__()
        g = program.graph
        ints = [k for k, t in g.inputs.items() if t.dtype == "int32"]
        if len(g.inputs) != 1 or len(ints) != 1:
            raise MadError(f"'{g.name}' is not a language model: it needs exactly one int32 token input")
        # plain attributes (object.__setattr__): nothing but the node modules goes into the module's tree
        for name, value in (("program", program), ("tokenizer", tokenizer), ("input_name", ints[0]),
                            ("_state_spec", state_spec(g))):
            object.__setattr__(self, name, value)
        self.output_name = "logits" if "logits" in g.outputs else next(iter(g.outputs))
        self.vocab_size = int(g.g.nodes[g.outputs[self.output_name]]["type"].shape[-1])
        for node, module in program.root.items():
            self[node] = module

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("program", "tokenizer", "_state_spec"):
            object.__setattr__(self, key, value)  # whatever it is, never part of the parameter tree
        else:
            super().__setattr__(key, value)

    __hash__ = object.__hash__  # a model is one object (nn.Module is a dict, unhashable by default)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def update(self, parameters: dict, strict: bool = True) -> "LanguageModel":
        """`nn.Module.update`, keyed by node (as `parameters()` gives them) or nested by the dots of the
        weight names (`tree_unflatten(list(checkpoint.items()))`)."""
        if isinstance(parameters, dict) and not all(k in self for k in parameters):
            by_node: dict[str, list] = {}
            for name, value in tree_flatten(parameters):
                try:
                    node = self.program._owner(name)
                except KeyError:
                    if strict:
                        raise ValueError(f'Module does not have parameter named "{name}".') from None
                    continue
                by_node.setdefault(node, []).append((name[len(node) + 1:], value))
            parameters = {n: tree_unflatten(items) for n, items in by_node.items()}
        super().update(parameters, strict=strict)
        return self

    def load_weights(self, file_or_weights: Any, strict: bool = True) -> "LanguageModel":
        """Load a `.safetensors` / `.npz` file or {name: array} / [(name, array)] by checkpoint name, through
        `Program.load_weights` (every name, shape and dtype checked first; `strict`: all of them)."""
        weights = mx.load(str(file_or_weights)) if isinstance(file_or_weights, (str, os.PathLike)) \
            else dict(file_or_weights)
        self.program.load_weights(weights, strict=strict)
        return self

    @property
    def pads_exactly(self) -> bool:
        """Whether a call can end in inert padding (`valid`; `Program.pads_exactly`)."""
        return self.program.pads_exactly

    def __call__(self, tokens: mx.array, state: Optional[dict] = None, mode: str = "auto",
                 last_only: bool = False, check_tokens: bool = True,
                 valid: Optional[int] = None, positions: Optional[mx.array] = None) -> tuple[mx.array, dict]:
        """logits (B, T, V), or (B, 1, V) at the last position with `last_only`, or (B, P, V) at `positions`
        (an integer (B, P) array: the head runs at those positions alone), and the new state.

        `valid` (1..T): the positions from `valid` on are padding that changes nothing (`Program`): the
        state is the one the first `valid` tokens leave, and `last_only` reads position valid - 1.

        `check_tokens` (default on): the tokens must be a 2-D integer array of ids inside the vocabulary
        (one host read of their min and max: ids outside would read memory outside the embedding), and a
        given state must hold arrays of the declared shapes and float32 for as many sequences as the
        tokens. Loops that feed back tokens they sampled themselves (the decode loop of `generate_step`,
        `mad bench`) pass False, so no host synchronisation is added between steps. `Program.__call__`
        checks rank and dtype only; the value check lives here, where the vocabulary is known.
        """
        if check_tokens:
            tokens = self.check_tokens(tokens)
            if state is not None:
                check_state_arrays(self.program.graph, state, batch=tokens.shape[0], spec=self._state_spec)
            if isinstance(positions, mx.array) and positions.size and positions.ndim == 2:
                lo, hi = mx.stack([positions.min(), positions.max()]).tolist()  # one host read, as check_tokens
                if lo < 0 or hi >= tokens.shape[1]:
                    raise MadError(f"positions must lie in 0..{tokens.shape[1] - 1} (the tokens' positions), got "
                                   f"{lo}..{hi}")
        outputs, state = self.program({self.input_name: tokens}, state, mode=mode, last_only=last_only, valid=valid,
                                      positions=positions)
        return outputs[self.output_name].astype(mx.float32), state

    def check_tokens(self, tokens: Any, what: str = "tokens") -> mx.array:
        """`tokens` as an integer (B, T) array with every id in 0..vocab_size-1, else a MadError."""
        if not isinstance(tokens, mx.array):
            try:
                tokens = mx.array(tokens)
            except Exception as e:  # noqa: BLE001 - ragged lists, objects, ...
                raise MadError(f"{what}: cannot be read as an array of token ids ({e})") from None
        if tokens.dtype == mx.bool_ or not mx.issubdtype(tokens.dtype, mx.integer):
            raise MadError(f"{what}: token ids must be integers, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise MadError(f"{what}: expected a (batch, sequence) array of token ids, got shape {tuple(tokens.shape)}")
        if tokens.size == 0:
            raise MadError(f"{what}: no tokens (shape {tuple(tokens.shape)})")
        lo, hi = mx.stack([tokens.min(), tokens.max()]).tolist()  # the one host read
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise MadError(f"{what}: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}, "
                           f"vocab size {self.vocab_size})")
        return tokens

    def init_state(self, batch: int = 1) -> dict:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise MadError(f"batch must be a positive integer, got {batch!r}")
        return self.program.init_state(batch)

    def prefill(self, tokens: mx.array, state: Optional[dict] = None,
                step_size: int = PREFILL_STEP, check_tokens: bool = True) -> tuple[mx.array, dict]:
        """Read a long prompt (B, T) in segments of `step_size` tokens, carrying the state.

        Returns the last position's logits (B, V) and the state. A segment is queued (`mx.async_eval`)
        before the one ahead of it is waited for, so the host builds the next while the device runs this
        one, and at most two are in flight: memory is bounded by two segments, whatever T is.
        Only the last position goes through the head (`last_only`): a prompt's other logits are
        never needed. The tokens (and a given state) are checked once, as `__call__` does, unless
        `check_tokens` is False.
        """
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise MadError(f"step_size must be a positive integer, got {step_size!r}")
        if check_tokens:
            tokens = self.check_tokens(tokens)
            if state is not None:
                check_state_arrays(self.program.graph, state, batch=tokens.shape[0], spec=self._state_spec)
        total = tokens.shape[1]
        ahead = None  # the state of the segment before, still running
        with inference():  # no gradient of a prompt's reading: kernels run bare (kernels/registry.py)
            for start in range(0, total, step_size):
                logits, state = self(tokens[:, start:start + step_size], state, last_only=True, check_tokens=False)
                if start + step_size < total:
                    mx.async_eval(state)
                    if ahead is not None:
                        mx.eval(ahead)
                    ahead = state
        return logits[:, -1], state


def state_spec(graph: Any) -> dict[str, dict[str, tuple]]:
    """{node: {name: (ndim, ((axis, size) fixed), (batch axes), dtype, shape text)}}: what `check_state_arrays`
    compares a state with, computed once per model (walking the graph per call would cost milliseconds)."""
    from .dims import Sym

    spec: dict[str, dict[str, tuple]] = {}
    for node in graph.state_nodes():
        for name, t in graph.g.nodes[node]["state"].items():
            fixed = tuple((i, int(d)) for i, d in enumerate(t.shape) if not isinstance(d, Sym))
            free = tuple(i for i, d in enumerate(t.shape) if isinstance(d, Sym))
            want = mx.float32 if t.dtype in ("float32", "float") else mx.int32
            spec.setdefault(node, {})[name] = (len(t.shape), fixed, free, want, shape_str(t.shape))
    return spec


def check_state_arrays(graph: Any, state: Any, batch: Optional[int] = None, where: str = "state",
                       spec: Optional[dict] = None) -> None:
    """A state's keys (`mad.graph.check_state`), then each entry: an MLX array of the declared rank, fixed
    sizes and dtype (float32), one batch size across entries (equal to `batch` when given)."""
    from .graph import check_state

    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise MadError(f"{where}: a state is a dict {{node: {{name: array}}}}, got {type(state).__name__}")
    spec = spec if spec is not None else state_spec(graph)
    if state.keys() != spec.keys() or any(state[n].keys() != names.keys() for n, names in spec.items()):
        check_state(graph, state, where=where)  # explains which keys are wrong
    diags = Diagnostics()
    seen: Optional[tuple[int, str]] = None
    for node, names in spec.items():
        entries = state[node]
        for name, (ndim, fixed, free, want, shape_text) in names.items():
            arr = entries[name]
            if type(arr) is not mx.array:
                diags.error(f"{where}: entry '{node}/{name}' is a {type(arr).__name__}, not an MLX array")
                continue
            shape = arr.shape
            if arr.dtype != want:
                diags.error(f"{where}: entry '{node}/{name}' has dtype {arr.dtype}, expected {want}")
            if len(shape) != ndim or any(shape[i] != d for i, d in fixed):
                diags.error(f"{where}: entry '{node}/{name}' has shape {tuple(shape)}, expected {shape_text}")
                continue
            for i in free:
                if seen is None:
                    seen = (shape[i], f"{node}/{name}")
                elif shape[i] != seen[0]:
                    diags.error(f"{where}: the entries hold different numbers of sequences: '{seen[1]}' "
                                f"{seen[0]}, '{node}/{name}' {shape[i]}", once="batch")
    if seen is not None and batch is not None and seen[0] != batch and not diags.items:
        diags.error(f"{where}: the state holds {seen[0]} sequence(s), the tokens {batch}")
    diags.raise_if_any()


def check_prompt(ids: Sequence[int], vocab_size: int) -> None:
    """A prompt of ids: not empty, every id inside the vocabulary (named in the error)."""
    if not ids:
        raise MadError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise MadError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
                       + (f" ({len(bad)} such ids)" if len(bad) > 1 else ""))


__all__ = ["LanguageModel", "PREFILL_STEP", "check_prompt", "check_state_arrays", "state_spec"]
