"""Synthetic tasks for `mad design`: the six tasks of Mechanistic Architecture Design and formal-language
tasks of the xLSTM paper, generated from a seed with numpy's `Generator` (the same data on every machine).

Every task is `make(seed, n, **settings) -> (inputs, targets, mask)`: int32 (n, T) token ids, int32 (n, T)
targets (0 where not scored) and bool (n, T) `mask`, the positions scored. `train=True` asks for the
training form where the source defines one (the recall tasks: next-token targets everywhere, as mad-lab's
`is_training`); evaluation uses `train=False`. Accuracy is the fraction of scored positions whose argmax is
the target (mad-lab: `MulticlassAccuracy`, micro, `ignore_index=-100`).

MAD tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures"), ported from
github.com/athms/mad-lab `mad/data/instances.py`, defaults from its `configs/tasks/*.yml` baselines (where
`multi_query: True`). Each instance draws from one Generator in the order mad-lab's functions draw, so the
recall, memorization and compression inputs are mad-lab's for the same Generator; departures:
  * selective copying: mad-lab places the blanks with the global `np.random.randint` (unseeded); here the
    task's Generator (`rng.integers`) places them;
  * compression: mad-lab trains an encoder + MLP decoder (`AutoEncoder`) to rebuild the sequence from the
    state at the compression token; a causal language model has no decoder, so here the sequence (mad-lab's
    input, ending in the compression token) is followed by T - 2 more compression tokens, and the model
    must emit x_1 .. x_{T-1} from the compression token on: recall through the recurrent state alone.
Multi-query associative recall (`mqar`; Arora et al. 2023, Zoology `multiquery_ar`, the xLSTM paper's MQAR):
key-value pairs, then every key once more as a query among random tokens; drawn with the task's Generator
instead of numpy's global seed.
Formal languages (Beck et al. 2024, xLSTM, Fig. 4 / Deletang et al. 2023, "Neural Networks and the Chomsky
Hierarchy"), on which sLSTM (state tracking) and mLSTM differ:
  * parity: bits b_1..b_L (tokens 0/1), L uniform in [min_len, max_len], then a QUERY token, then PAD to
    seq_len; scored: the QUERY position, target sum(b) mod 2 (token 0 or 1). NX-AI's generator
    (experiments/data/formal_language) reads the answer at the last bit instead, one step earlier;
  * majority: the same layout; L odd; target the more frequent bit (a counting task).
The xLSTM paper trains on lengths 3..40 and tests on 40..256 (length generalisation): each task has
held-out settings of its own (`Task.test`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations
from typing import Any, Callable

import numpy as np

from .errors import MadError

IGNORE = -100  # mad-lab's target_ignore_idx, before it becomes the mask


def _rng(seed: Any) -> np.random.Generator:
    return np.random.default_rng(seed)


def _stack(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances (inputs, targets with IGNORE) -> (inputs, targets with 0 where ignored, mask)."""
    inputs = np.stack([np.asarray(r[0]) for r in rows]).astype(np.int32)
    raw = np.stack([np.asarray(r[1]) for r in rows]).astype(np.int64)
    mask = raw != IGNORE
    return inputs, np.where(mask, raw, 0).astype(np.int32), mask


def _vocab_permutations(vocab: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """mad-lab `generate_vocab_permutations`: all ordered `size`-tuples, shuffled (list shuffle, as there),
    returned as an array so that `rng.choice` picks rows with the same draws as on the list."""
    values = list(permutations(vocab, size))
    rng.shuffle(values)
    return np.array(values)


# ----------------------------------------------------------------------------------------- recall
def _recall_instance(rng, vocab_size, seq_len, train, multi_query, noise_vocab_size, frac_noise):
    copy_prefix = vocab_size - 1
    non_special = (vocab_size if multi_query else vocab_size - 1) - noise_vocab_size
    key_vocab = np.arange(non_special // 2)
    value_vocab = np.arange(non_special // 2, non_special)
    if frac_noise > 0:
        noise_vocab = np.arange(non_special, non_special + noise_vocab_size)
    kv_map: dict = {}
    inputs: list = []
    targets: list = []
    presented: dict = {}
    pairs = seq_len // 2
    not_noise = rng.choice(pairs)
    for i in range(pairs - 1):
        is_noise = rng.random() < frac_noise if i != not_noise and frac_noise > 0 else False
        if is_noise:
            inputs += list(rng.choice(noise_vocab, size=2, replace=True))
            targets += [IGNORE] * 2
            continue
        k = rng.choice(key_vocab)
        if k not in kv_map:
            kv_map[k] = rng.choice(value_vocab)
        v = kv_map[k]
        inputs += [k, v]
        targets += [IGNORE, v if (k in presented and multi_query) else IGNORE]
        presented[k] = v
    k_probe = rng.choice(list(presented.keys()))
    v_probe = presented[k_probe]
    if not multi_query:
        inputs.append(copy_prefix)
        targets.append(IGNORE)
    inputs += [k_probe, v_probe]
    targets += [IGNORE, v_probe]
    inputs, targets = np.array(inputs, dtype=np.int64), np.array(targets, dtype=np.int64)
    return (inputs[:-1], inputs[1:]) if train else (inputs[:-1], targets[1:])


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise MadError(what)


def in_context_recall(seed: Any, n: int, seq_len: int = 128, vocab_size: int = 16, *, multi_query: bool = True,
                      noise_vocab_size: int = 0, frac_noise: float = 0.0, train: bool = False):
    """MAD in-context recall: key-value pairs (keys 0..K-1, values K..2K-1, K = (V - noise) // 2), each key
    always with the same value in a sequence; scored: every value whose key appeared before (multi-query),
    including the final probe. T = seq_len - 1 (mad-lab: seq_len tokens, shifted by one)."""
    _check(seq_len % 2 == 0 and seq_len >= 4, f"in-context recall: seq_len must be even and >= 4, got {seq_len}")
    _check((vocab_size - noise_vocab_size - (0 if multi_query else 1)) // 2 >= 1,
           f"in-context recall: vocab_size {vocab_size} leaves no keys")
    _check(0 <= frac_noise < 1, f"frac_noise must be in [0, 1), got {frac_noise}")
    rng = _rng(seed)
    return _stack([_recall_instance(rng, vocab_size, seq_len, train, multi_query, noise_vocab_size, frac_noise)
                   for _ in range(n)])


def noisy_in_context_recall(seed: Any, n: int, seq_len: int = 128, vocab_size: int = 32, *,
                            noise_vocab_size: int = 16, frac_noise: float = 0.2, multi_query: bool = True,
                            train: bool = False):
    """MAD noisy in-context recall: in-context recall with pairs replaced, at rate frac_noise, by two tokens
    of a separate noise vocabulary (the last noise_vocab_size ids). T = seq_len - 1."""
    _check(noise_vocab_size > 0, "noisy in-context recall needs noise_vocab_size > 0")
    return in_context_recall(seed, n, seq_len, vocab_size, multi_query=multi_query,
                             noise_vocab_size=noise_vocab_size, frac_noise=frac_noise, train=train)


def _fuzzy_instance(rng, vocab_size, seq_len, k_motif_size, v_motif_size, train, multi_query):
    copy_prefix = vocab_size - 1
    pad = vocab_size - 2 if not multi_query else vocab_size - 1
    non_special = vocab_size - 2 if not multi_query else vocab_size - 1
    key_vocab = np.arange(non_special // 2)
    value_vocab = np.arange(non_special // 2, non_special)
    if train:
        keys = {s: _vocab_permutations(key_vocab, s, rng) for s in range(1, k_motif_size + 1)}
    else:  # probed at the largest key size
        keys = {k_motif_size: _vocab_permutations(key_vocab, k_motif_size, rng)}
    values = {s: _vocab_permutations(value_vocab, s, rng) for s in range(1, v_motif_size + 1)}
    k_probe_size = rng.choice(list(keys.keys())) if train else k_motif_size
    v_probe_size = rng.choice(list(values.keys()))
    k_probe = tuple(rng.choice(keys[k_probe_size]))
    v_probe = tuple(rng.choice(values[v_probe_size]))
    kv_probe_size = k_probe_size + v_probe_size
    probe_idx = rng.choice(seq_len - kv_probe_size - kv_probe_size)
    probe_added = False
    kv_map: dict = {s: {} for s in range(1, k_motif_size + 1)}
    inputs: list = []
    targets: list = []
    presented: dict = {}
    while len(inputs) < seq_len - kv_probe_size - (k_motif_size + v_motif_size):
        k_size = rng.choice(list(keys.keys())) if train else k_motif_size
        v_size = rng.choice(list(values.keys()))
        if len(inputs) >= probe_idx and not probe_added:
            inputs.extend(k_probe)
            inputs.extend(v_probe)
            targets.extend([IGNORE] * (k_probe_size + len(v_probe)))
            kv_map[k_probe_size][k_probe] = v_probe
            presented[k_probe] = v_probe
            probe_added = True
            continue
        k = tuple(rng.choice(keys[k_size]))
        inputs.extend(k)
        if k == k_probe:
            v = v_probe
            probe_added = True
        elif k not in kv_map[k_size]:
            v = tuple(rng.choice(values[v_size]))
            kv_map[k_size][k] = v
        else:
            v = kv_map[k_size][k]
        inputs.extend(v)
        targets.extend([IGNORE] * k_size)
        targets.extend(v if (k in presented and multi_query) else [IGNORE] * len(v))
        presented[k] = v
    if not multi_query:
        inputs.append(copy_prefix)
        targets.append(IGNORE)
    inputs.extend(k_probe)
    inputs.extend(v_probe)
    targets.extend([IGNORE] * k_probe_size)
    targets.extend(v_probe)
    inputs, targets = np.array(inputs, dtype=np.int64), np.array(targets, dtype=np.int64)
    if len(inputs) < seq_len + 1:
        n_pad = seq_len + 1 - len(inputs)
        inputs = np.concatenate([np.full(n_pad, pad), inputs])
        targets = np.concatenate([np.full(n_pad, IGNORE), targets])
    return (inputs[:-1], inputs[1:]) if train else (inputs[:-1], targets[1:])


def fuzzy_in_context_recall(seed: Any, n: int, seq_len: int = 128, vocab_size: int = 16, *, k_motif_size: int = 3,
                            v_motif_size: int = 3, multi_query: bool = True, train: bool = False):
    """MAD fuzzy in-context recall: keys and values are runs of 1..k_motif_size / 1..v_motif_size tokens
    (keys 0..K-1, values K..(V-2), V-1 the left pad); training mixes key sizes, evaluation probes keys of
    k_motif_size tokens; scored: the tokens of every value whose key appeared before. T = seq_len."""
    _check(k_motif_size >= 1 and v_motif_size >= 1, "fuzzy recall: motif sizes must be >= 1")
    non_special = vocab_size - (1 if multi_query else 2)
    _check(non_special // 2 >= k_motif_size and non_special - non_special // 2 >= v_motif_size,
           f"fuzzy recall: vocab_size {vocab_size} is too small for motifs of {k_motif_size}/{v_motif_size}")
    _check(seq_len > 4 * (k_motif_size + v_motif_size), f"fuzzy recall: seq_len {seq_len} is too short")
    rng = _rng(seed)
    return _stack([_fuzzy_instance(rng, vocab_size, seq_len, k_motif_size, v_motif_size, train, multi_query)
                   for _ in range(n)])


def mqar(seed: Any, n: int, seq_len: int = 256, vocab_size: int = 8192, *, num_kv_pairs: int = 16,
         power_a: float = 0.01, random_non_queries: bool = True, train: bool = False):
    """Multi-query associative recall (Zoology, Arora et al. 2023, `multiquery_ar`; the xLSTM paper's MQAR):
    num_kv_pairs distinct keys (1..V/2-1) with distinct values (V/2..V-1), then each key once more as a
    query, at gaps drawn with p(g) ~ g^(power_a - 1), the other positions random tokens (token 0 with
    `random_non_queries=False`, as Zoology's ICLR'24 figure 2 runs; the keys, values and gaps are the same
    either way); scored: every query, target the value stored with its key. T = seq_len."""
    c = num_kv_pairs
    _check(seq_len % 2 == 0 and c >= 1 and 4 * c <= seq_len, f"mqar: needs an even seq_len >= 4 * num_kv_pairs, got "
           f"seq_len {seq_len}, num_kv_pairs {c}")
    _check(vocab_size > seq_len and vocab_size // 2 - 1 >= c, f"mqar: needs vocab_size > seq_len and >= "
           f"2 * (num_kv_pairs + 1), got {vocab_size}")
    rng = _rng(seed)
    half, context, space = vocab_size // 2, 2 * c, (seq_len - 2 * c) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    inputs = np.zeros((n, seq_len), np.int32)
    targets = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), bool)
    for i in range(n):
        keys = rng.choice(np.arange(1, half), size=c, replace=False)
        values = rng.choice(np.arange(half, vocab_size), size=c, replace=False)
        gaps = rng.choice(space, size=c, replace=False, p=p)
        row = np.zeros(seq_len + 1, np.int64)
        row[0:context:2], row[1:context:2] = keys, values
        row[context + 2 * gaps] = keys
        noise = rng.integers(0, vocab_size, seq_len + 1)
        is_query = np.zeros(seq_len + 1, bool)
        is_query[:context] = True
        is_query[context + 2 * gaps] = True
        filler = noise if random_non_queries else 0  # noise drawn either way: the same keys, values and gaps
        inputs[i] = np.where(is_query, row, filler)[:-1]  # the filler where no key, value or query stands
        targets[i, context + 2 * gaps] = values           # predicted at the query: the next position's label
        mask[i, context + 2 * gaps] = True
    return inputs, targets, mask


# ----------------------------------------------------------------------------------------- memorization
KV_MAP_SEED = 12345  # mad-lab MADConfig.seed, which fixes the memorization map for every data seed


def kv_map(vocab_size: int, seed: int = KV_MAP_SEED) -> dict:
    """mad-lab `generate_kv_map(vocab_size - 1, seed)`: the fixed key -> value map of memorization
    (keys 0..(V-1)//2 - 1, values after them; the insert token V-1 excluded)."""
    r = _rng(seed)
    v = vocab_size - 1
    keys = _vocab_permutations(np.arange(v // 2), 1, r)
    values = _vocab_permutations(np.arange(v // 2, v), 1, r)
    return {int(k[0]): int(val[0]) for k, val in zip(keys, values)}


def memorization(seed: Any, n: int, seq_len: int = 32, vocab_size: int = 256, *, kv_map_seed: int = KV_MAP_SEED,
                 train: bool = False):
    """MAD memorization: pairs (key, insert token V-1); scored: each insert position, target the key's value
    in a map fixed across all sequences (seeded by kv_map_seed, not by `seed`), which the weights must
    learn. T = seq_len (even)."""
    _check(seq_len % 2 == 0 and seq_len >= 2, f"memorization: seq_len must be even and >= 2, got {seq_len}")
    _check(vocab_size >= 3, f"memorization: vocab_size must be >= 3, got {vocab_size}")
    mapping = kv_map(vocab_size, kv_map_seed)
    keys = np.array(list(mapping))  # mad-lab's order (the map's)
    insert = vocab_size - 1
    rng = _rng(seed)
    rows = []
    for _ in range(n):
        pairs = seq_len // 2
        rng.choice(pairs)  # mad-lab's not_noise_idx draw (unused without noise), kept for the same stream
        inputs, targets = [], []
        for _ in range(pairs):
            k = int(rng.choice(keys[:, None])[0])
            inputs += [k, insert]
            targets += [IGNORE, mapping[k]]
        rows.append((np.array(inputs), np.array(targets)))
    return _stack(rows)


# ----------------------------------------------------------------------------------------- compression
def compression(seed: Any, n: int, seq_len: int = 32, vocab_size: int = 16, *, train: bool = False):
    """MAD compression, causal form: x_1..x_{seq_len-1} (ids 0..V-2), the compression token V-1, then
    seq_len - 2 more compression tokens; scored: from the first compression token on, target x_1, x_2, ...
    (the whole sequence rebuilt from the state). T = 2 * seq_len - 2."""
    _check(seq_len >= 2 and vocab_size >= 2, "compression: needs seq_len >= 2 and vocab_size >= 2")
    comp = vocab_size - 1
    rng = _rng(seed)
    rows = []
    for _ in range(n):
        x = rng.choice(np.arange(vocab_size - 1), size=(seq_len - 1,), replace=True)
        inputs = np.concatenate([x, np.full(seq_len - 1, comp)])
        targets = np.concatenate([np.full(seq_len - 1, IGNORE), x])
        rows.append((inputs, targets))
    return _stack(rows)


# ----------------------------------------------------------------------------------------- copying
def selective_copying(seed: Any, n: int, seq_len: int = 256, vocab_size: int = 16, *, num_tokens_to_copy: int = 16,
                      train: bool = False):
    """MAD selective copying: num_tokens_to_copy tokens (0..V-3) scattered among blanks (V-2), the copy
    token (V-1), then num_tokens_to_copy blanks; scored: those last positions, target the tokens in order.
    T = seq_len."""
    c = num_tokens_to_copy
    _check(c >= 1 and seq_len > 2 * c + 1, "selective copying: seq_len must be > 2 * num_tokens_to_copy + 1")
    _check(vocab_size >= 3, f"selective copying: vocab_size must be >= 3, got {vocab_size}")
    copy_token, blank = vocab_size - 1, vocab_size - 2
    n_blank = seq_len - 2 * c - 1
    rng = _rng(seed)
    rows = []
    for _ in range(n):
        to_copy = rng.choice(np.arange(vocab_size - 2), size=(c,), replace=True)
        where = rng.integers(0, c, n_blank)  # mad-lab: np.random.randint (unseeded)
        inputs = np.insert(to_copy, where, [blank] * n_blank).tolist() + [copy_token] + [blank] * c
        targets = [IGNORE] * (c + n_blank + 1) + list(to_copy)
        rows.append((np.array(inputs), np.array(targets)))
    return _stack(rows)


# ----------------------------------------------------------------------------------------- formal languages
def _formal(seed: Any, n: int, seq_len: int, min_len: int, max_len: Any, odd: bool,
            label: Callable[[np.ndarray, np.ndarray], np.ndarray], what: str):
    """Bit strings of a length uniform in [min_len, max_len] (odd lengths only if `odd`), each followed by
    QUERY and right-padded with PAD to seq_len; scored: the QUERY position, target label(bits zero-padded
    to seq_len, lengths) per row."""
    max_len = seq_len - 1 if max_len is None else max_len
    _check(isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len <= seq_len - 1,
           f"{what}: needs 1 <= min_len <= max_len <= seq_len - 1, got min_len {min_len}, max_len {max_len}, "
           f"seq_len {seq_len}")
    lengths = np.arange(min_len, max_len + 1)
    if odd:
        lengths = lengths[lengths % 2 == 1]
        _check(len(lengths) > 0, f"{what}: no odd length in [{min_len}, {max_len}]")
    pad, query = 2, 3
    rng = _rng(seed)
    length = rng.choice(lengths, n)
    bits = rng.integers(0, 2, (n, seq_len)).astype(np.int32)
    pos = np.arange(seq_len)
    inputs = np.where(pos < length[:, None], bits, pad).astype(np.int32)
    mask = pos == length[:, None]
    inputs[mask] = query
    targets = np.where(mask, label(np.where(pos < length[:, None], bits, 0), length)[:, None], 0).astype(np.int32)
    return inputs, targets, mask


def parity(seed: Any, n: int, seq_len: int = 41, vocab_size: int = 4, *, min_len: int = 3, max_len: Any = None,
           train: bool = False):
    """Parity (xLSTM / Deletang et al.): bits (tokens 0/1) of a length uniform in [min_len, max_len]
    (default seq_len - 1), then QUERY (3), then PAD (2) to seq_len; scored: the QUERY position, target the
    parity of the bits (0 or 1). T = seq_len."""
    _check(vocab_size == 4, f"parity: vocab_size is 4 (0, 1, PAD, QUERY), got {vocab_size}")
    return _formal(seed, n, seq_len, min_len, max_len, False, lambda b, n: b.sum(axis=1) % 2, "parity")


def majority(seed: Any, n: int, seq_len: int = 41, vocab_size: int = 4, *, min_len: int = 3, max_len: Any = None,
             train: bool = False):
    """Majority (binary; xLSTM / Deletang et al.): like parity, odd lengths; target the more frequent bit."""
    _check(vocab_size == 4, f"majority: vocab_size is 4 (0, 1, PAD, QUERY), got {vocab_size}")
    return _formal(seed, n, seq_len, min_len, max_len, True, lambda b, n: 2 * b.sum(axis=1) > n, "majority")


# ----------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
    default: dict  # the source's settings (mad-lab baseline; xLSTM: train lengths 3..40)
    small: dict = field(default_factory=dict)  # the `small` preset: a 2-core CPU in minutes
    num_train: tuple[int, int] = (12_800, 2_048)  # training sequences (default, small)
    num_test: tuple[int, int] = (1_280, 256)
    test: tuple[dict, dict] = ({}, {})  # held-out settings where they differ from training's (default, small)
    lengths: bool = False  # takes min_len / max_len (bit-string lengths): `mad design --train-len/--test-len`

    def settings(self, preset: str) -> dict:
        return dict(self.default, **(self.small if preset == "small" else {}))

    def test_settings(self, preset: str) -> dict:
        return dict(self.settings(preset), **self.test[preset == "small"])

    def vocab(self, preset: str) -> int:
        return int(self.settings(preset)["vocab_size"])


# xLSTM (Fig. 4, NX-AI experiments/parity_*.yaml): trained on lengths 3..40, tested on 40..256
_FORMAL = {"seq_len": 41, "vocab_size": 4, "min_len": 3}
_FORMAL_TEST = {"seq_len": 257, "min_len": 40}
_FORMAL_SMALL, _FORMAL_SMALL_TEST = {"seq_len": 13}, {"seq_len": 41, "min_len": 13}  # train 3..12, test 13..40
# many strings (NX-AI generates 5.12M): a fixed set small enough to memorise would not test the rule
_FORMAL_SIZES = {"num_train": (131_072, 32_768), "num_test": (1_280, 512), "lengths": True}
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("in-context-recall", in_context_recall, {"seq_len": 128, "vocab_size": 16}, {"seq_len": 64}),
    Task("fuzzy-in-context-recall", fuzzy_in_context_recall,
         {"seq_len": 128, "vocab_size": 16, "k_motif_size": 3, "v_motif_size": 3}, {"seq_len": 64}),
    Task("noisy-in-context-recall", noisy_in_context_recall,
         {"seq_len": 128, "vocab_size": 32, "noise_vocab_size": 16, "frac_noise": 0.2}, {"seq_len": 64}),
    Task("selective-copying", selective_copying, {"seq_len": 256, "vocab_size": 16, "num_tokens_to_copy": 16},
         {"seq_len": 64, "num_tokens_to_copy": 8}),
    Task("compression", compression, {"seq_len": 32, "vocab_size": 16}, {"seq_len": 16}),
    Task("memorization", memorization, {"seq_len": 32, "vocab_size": 256}, {"vocab_size": 64},
         num_train=(256, 256)),
    Task("mqar", mqar, {"seq_len": 256, "vocab_size": 8192, "num_kv_pairs": 16},  # xLSTM MQAR: 256, 16..64 pairs
         {"seq_len": 64, "vocab_size": 128, "num_kv_pairs": 8}, num_train=(100_000, 20_000)),  # Zoology: 100k
    Task("parity", parity, _FORMAL, _FORMAL_SMALL, test=(_FORMAL_TEST, _FORMAL_SMALL_TEST), **_FORMAL_SIZES),
    Task("majority", majority, _FORMAL, _FORMAL_SMALL, test=(_FORMAL_TEST, _FORMAL_SMALL_TEST), **_FORMAL_SIZES),
)}
PRESETS = ("small", "mad")


def task_names(spec: list[str] | str) -> list[str]:
    """`--task` values (names, comma lists, `all`) -> task names in registry order, else a MadError."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for name in (s.strip() for s in str(item).split(",")):
            if not name:
                continue
            if name == "all":
                names.extend(TASKS)
            elif name in TASKS:
                names.append(name)
            else:
                raise MadError(f"--task: unknown task '{name}'; known: all, {', '.join(TASKS)}")
    if not names:
        raise MadError(f"--task: give a task or 'all' (known: {', '.join(TASKS)})")
    return list(dict.fromkeys(names))
