"""Batch generation: each sequence of a batch gives the tokens it gives alone (greedy and seeded sampling,
rows joining and leaving), bit-identical batched decoding on the CPU, logprobs against a full forward, the
prompt cache (exact reuse, LRU by bytes), and `mad run --prompts` / `--prompt-cache` with their bad input."""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.generate import PREFILL_BLOCK, BatchGenerator, SamplingParams, batch_generate, stream_generate
from mad.kernels.registry import Unsupported
from mad.loading import save_state_file
from mad.prompt_cache import PromptCache, state_nbytes

from yaml_files import cli

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
NXAI_TINY = ROOT / "tests" / "fixtures" / "nxai-tiny"
LONG = "The quick brown fox jumps over the lazy dog. " * 16  # about 720 ids: three prompt blocks


@pytest.fixture(scope="module")
def loaded():
    return mad.load(HF_TINY)


def alone(model, tok, prompt, max_tokens=12, seed=None, **kw):
    """The tokens `stream_generate` gives for one prompt (after mx.random.seed(seed) when sampling)."""
    if seed is not None:
        mx.random.seed(seed)
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw)]


PROMPTS = ["Hello", "The xLSTM is a", LONG, LONG[:300] + "!", "a"]


def test_batch_equals_each_alone_greedy(loaded):
    model, tok = loaded
    assert len(tok.encode(LONG)) > 2 * PREFILL_BLOCK
    out = batch_generate(model, tok, PROMPTS, max_tokens=12)
    for prompt, tokens, text in zip(PROMPTS, out.tokens, out.texts):
        expected = alone(model, tok, prompt)
        assert tokens == expected
        assert text == tok.decode([t for t in expected if t not in tok.eos_token_ids])
    assert out.prompt_tokens == sum(len(tok.encode(p)) for p in PROMPTS)
    assert out.generation_tokens == sum(map(len, out.tokens))


@pytest.mark.parametrize("kw", [dict(temp=0.9), dict(temp=1.2, top_p=0.8), dict(temp=1.0, top_k=5, min_p=0.05)])
def test_batch_equals_each_alone_seeded(loaded, kw):
    model, tok = loaded
    out = batch_generate(model, tok, PROMPTS, max_tokens=12, seed=7, **kw)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == alone(model, tok, prompt, seed=7, **kw)


def test_batched_decode_is_bit_identical_to_solo(loaded, on_cpu):
    """One decode step of 5 concatenated states gives each row's logits and state exactly as batch 1 does
    (tests run MLX's own CPU BLAS, see conftest.py; MKL's sgemm rounds rows of M <= 3 and M >= 4 differently)."""
    model, _ = loaded
    rng = np.random.default_rng(0)
    solo = []
    for n in (3, 7, 12, 1, 30):
        logits, state = model.prefill(mx.array([rng.integers(0, model.vocab_size, n).tolist()], dtype=mx.int32))
        solo.append((mx.argmax(logits, axis=-1), state))
    batch_state = {node: {k: mx.concatenate([s[node][k] for _, s in solo]) for k in e} for node, e in solo[0][1].items()}
    batch_logits, batch_state = model(mx.concatenate([t for t, _ in solo])[:, None], batch_state)
    for i, (token, state) in enumerate(solo):
        logits, state = model(token[:, None], state)
        assert mx.array_equal(batch_logits[i:i + 1], logits).item()
        for node, entries in state.items():
            for k, a in entries.items():
                assert mx.array_equal(batch_state[node][k][i:i + 1], a).item(), (node, k)


def test_rows_join_and_leave(loaded):
    """Sequences joining a running batch, finishing early, and removed midway: the others are unaffected."""
    model, tok = loaded
    gen = BatchGenerator(model, prefill_budget=8)  # a long prompt is read over several steps
    ids = {name: tok.encode(p) for name, p in (("a", "Hello"), ("b", LONG), ("c", "xyz"), ("d", "Once"))}
    seeded = SamplingParams(temp=1.0, seed=3)
    uids = {"a": gen.insert(ids["a"], max_tokens=30)[0], "d": gen.insert(ids["d"], [seeded], max_tokens=30)[0]}
    got: dict[int, list[int]] = {}
    for step in range(200):
        if step == 3:
            uids["b"] = gen.insert(ids["b"], max_tokens=10)[0]
        if step == 5:
            uids["c"] = gen.insert(ids["c"], max_tokens=4)[0]
        if step == 8:
            gen.remove(uids["d"])
        for r in gen.step():
            got.setdefault(r.uid, []).append(r.token)
        if not gen.busy:
            break
    assert not gen.busy and gen.max_batch_seen >= 3
    assert got[uids["a"]] == alone(model, tok, ids["a"], 30)
    assert got[uids["b"]] == alone(model, tok, ids["b"], 10)
    assert got[uids["c"]] == alone(model, tok, ids["c"], 4)
    d = alone(model, tok, ids["d"], 30, seed=3, temp=1.0)
    assert 0 < len(got[uids["d"]]) < 30 and got[uids["d"]] == d[:len(got[uids["d"]])]


def test_n_rows_share_one_prompt(loaded):
    model, tok = loaded
    gen = BatchGenerator(model)
    params = [SamplingParams(temp=1.0, seed=s) for s in (1, 2, 3)] + [SamplingParams()]
    uids = gen.insert(tok.encode("The xLSTM"), params, max_tokens=8)
    got = {u: [] for u in uids}
    while gen.busy:
        for r in gen.step():
            got[r.uid].append(r.token)
    for uid, p in zip(uids, params):
        assert got[uid] == alone(model, tok, "The xLSTM", 8, seed=p.seed, temp=p.temp)


def test_logprobs_against_a_full_forward(loaded):
    model, tok = loaded
    ids = tok.encode("The xLSTM is")
    gen = BatchGenerator(model)
    uid = gen.insert(ids, [SamplingParams(logprobs=3)], max_tokens=6)[0]
    gen.insert(tok.encode("Hello"), max_tokens=6)  # a neighbour that asks for none
    results = []
    while gen.busy:
        results += [r for r in gen.step() if r.uid == uid]
    tokens = [r.token for r in results]
    logits, _ = model(mx.array([ids + tokens], dtype=mx.int32))
    ref = np.array(logits[0, len(ids) - 1:-1] - mx.logsumexp(logits[0, len(ids) - 1:-1], axis=-1, keepdims=True))
    for i, r in enumerate(results):
        assert abs(r.logprob - ref[i, r.token]) < 1e-4
        assert [t for t, _ in r.top_logprobs] == list(np.argsort(-ref[i])[:3])
        assert np.allclose([v for _, v in r.top_logprobs], np.sort(ref[i])[::-1][:3], atol=1e-4)


def test_prompt_cache_gives_the_same_tokens(loaded):
    model, tok = loaded
    cache = PromptCache(1 << 30)
    family = [LONG + "What?", LONG + "Who is it?", LONG + "What?", LONG[:200] + "x", LONG + "Who is it? Me."]
    cached = []
    for prompt in family:
        out = batch_generate(model, tok, [prompt], max_tokens=10, prompt_cache=cache)
        assert out.tokens[0] == alone(model, tok, prompt, 10)
        cached.append(out.cached_tokens[0])
    n = len(tok.encode(family[0]))
    assert cached[0] == 0 and cached[1] == (n // PREFILL_BLOCK) * PREFILL_BLOCK and cached[2] == n
    assert cached[3] == 0 and cached[4] > 0
    # a snapshot is the state of the prefix read from the start with the generator's calls (block by block,
    # with `valid` where the generator pads: a different traced program from `model.prefill`'s, whose
    # numbers may differ in the last place on a GPU)
    k, state, logits = cache.lookup(tok.encode(family[0])[:2 * PREFILL_BLOCK + 1])
    assert k == 2 * PREFILL_BLOCK and logits is None
    ids, ref = mx.array([tok.encode(family[0])[:k]], dtype=mx.int32), None
    valid = PREFILL_BLOCK if BatchGenerator(model).pad else None
    for start in range(0, k, PREFILL_BLOCK):
        _, ref = model(ids[:, start:start + PREFILL_BLOCK], ref, last_only=True, valid=valid)
    for node, entries in ref.items():
        for name, a in entries.items():
            assert mx.array_equal(state[node][name], a).item()


def test_prompt_cache_branch_points_and_cuts(loaded):
    """A prompt that leaves a prefix seen before leaves a snapshot where it branched off, for the next one;
    a cut is kept where it falls, and serves only prompts read with the same cut."""
    model, tok = loaded
    cache = PromptCache(1 << 30)
    a = [3 + i % 290 for i in range(700)]
    batch_generate(model, tok, [a], max_tokens=1, prompt_cache=cache)  # keeps 512 (its last block) and 700
    b = a[:400] + [5] * 300
    assert batch_generate(model, tok, [b], max_tokens=1, prompt_cache=cache).cached_tokens == [0]
    c = a[:400] + [7] * 100
    assert batch_generate(model, tok, [c], max_tokens=1, prompt_cache=cache).cached_tokens == [256]
    d = [9] * 300 + [4] * 300
    for cuts, expected in (((), 0), ((300,), 300)):
        cache = PromptCache(1 << 30)
        batch_generate(model, tok, [d], max_tokens=1, prompt_cache=cache, cuts=cuts)
        assert cache.lookup([9] * 300 + [1], cuts)[0] == expected
        assert cache.lookup([9] * 300 + [1])[0] == 0  # read without the cut: other calls, no snapshot fits


def test_a_cut_keeps_the_state_at_the_end_of_a_system_part(loaded):
    """A cut (the end of a chat's system part) ends a forward call wherever it falls: the cache keeps the
    state there, a new question after the same part reads only itself, and its tokens equal those of a run
    without the cache with the same cut. The state at the cut is that of the part read as a whole prompt."""
    model, tok = loaded
    system = [3 + i % 290 for i in range(300)]
    cache = PromptCache(1 << 30)
    for i, question in enumerate([[5, 6, 7], [8, 9, 10, 11, 12], [13]]):
        out = batch_generate(model, tok, [system + question], max_tokens=8, prompt_cache=cache, cuts=(300,))
        assert out.tokens == batch_generate(model, tok, [system + question], max_tokens=8, cuts=(300,)).tokens
        assert out.cached_tokens == [0 if i == 0 else 300]
    k, state, logits = cache.lookup(system + [1], cuts=(300,))
    assert k == 300 and logits is None
    whole = PromptCache(1 << 30)
    batch_generate(model, tok, [system], max_tokens=1, prompt_cache=whole)
    _, ref, _ = whole.lookup(system)
    for node, entries in ref.items():
        for name, a in entries.items():
            assert mx.array_equal(state[node][name], a).item()
    # the same tokens without the cut are read in other calls: the snapshot at 300 does not serve them
    assert batch_generate(model, tok, [system + [14]], max_tokens=1, prompt_cache=cache).cached_tokens == [0]


def test_prompt_cache_is_bounded_by_bytes(loaded):
    model, tok = loaded
    one = state_nbytes(model.init_state(1))
    cache = PromptCache(3 * one)
    prompts = [[i + 3] * 300 for i in range(4)]
    for p in prompts:
        batch_generate(model, tok, [p], max_tokens=1, prompt_cache=cache)
        assert cache.nbytes <= cache.max_bytes
    assert cache.lookup(prompts[0])[0] == 0  # the oldest left first
    assert cache.lookup(prompts[-1])[0] == len(prompts[-1])
    tiny = PromptCache(10)
    batch_generate(model, tok, [prompts[0]], max_tokens=1, prompt_cache=tiny)
    assert len(tiny) == 0 and tiny.nbytes == 0


@pytest.mark.parametrize("call, message", [
    (lambda m, t: batch_generate(m, t, [], max_tokens=2), "empty"),
    (lambda m, t: batch_generate(m, t, "Hello", max_tokens=2), "list of prompts"),
    (lambda m, t: batch_generate(m, t, ["a", [1, 999]], max_tokens=2), "prompt 2: token id 999"),
    (lambda m, t: batch_generate(m, t, ["a"], max_tokens=-1), "max_tokens"),
    (lambda m, t: batch_generate(m, t, ["a"], temp=-1.0), "temp"),
    (lambda m, t: batch_generate(m, t, ["a"], seed=-3), "seed"),
    (lambda m, t: batch_generate(m, t, ["a"], repetition_penalty=1.1), "unknown argument 'repetition_penalty'"),
    (lambda m, t: BatchGenerator(m).insert([1, 2], [SamplingParams(logprobs=99)]), "logprobs"),
    (lambda m, t: BatchGenerator(m).insert([1, 2, 3], cuts=[1.5]), "cuts: expected positions"),
    (lambda m, t: batch_generate(m, t, ["abc"], max_tokens=1, cuts="12"), "cuts: expected positions"),
    (lambda m, t: BatchGenerator(m).insert("text"), "token ids"),
    (lambda m, t: BatchGenerator(m).insert([1, True]), "integers"),
    (lambda m, t: BatchGenerator(m).insert([1], max_tokens=0), "at least 1"),
    (lambda m, t: BatchGenerator(m).insert([1], state={"x": {}}), "state"),
    (lambda m, t: BatchGenerator(m, prefill_block=0), "prefill_block"),
    (lambda m, t: BatchGenerator(m, prompt_cache=PromptCache(10, block=64)), "must agree"),
])
def test_bad_batch_arguments(loaded, call, message):
    with pytest.raises(mad.MadError, match=message):
        call(*loaded)


# --------------------------------------------------------------------------------------------- the CLI
def run_text(out: str) -> str:
    """What `mad run` printed before its figures."""
    return out[:out.index("\n==========\n")]


def test_run_prompts_file_gives_each_prompt_alone(monkeypatch, capsys, tmp_path):
    prompts = ["Hello", "The xLSTM", "Once upon a time"]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    code, out, err = cli(monkeypatch, capsys, "run", HF_TINY, "--prompts", file, "-m", "8")
    assert code == 0, err
    texts = re.split(r"(?:^|\n)\[\d\] ", run_text(out))[1:]
    for prompt, text in zip(prompts, texts, strict=True):
        code, single, err = cli(monkeypatch, capsys, "run", HF_TINY, "-p", prompt, "-m", "8")
        assert code == 0, err
        assert text == run_text(single)


def test_prompt_cache_round_trip(monkeypatch, capsys, tmp_path):
    system = tmp_path / "system.txt"
    system.write_text(LONG)
    longer = tmp_path / "longer.txt"
    longer.write_text(LONG + "And then?")
    cache = tmp_path / "sub" / "system.cache"
    saved = (len(mad.load(HF_TINY)[1].encode(LONG)) - 1) // PREFILL_BLOCK * PREFILL_BLOCK
    plain = {}
    for name, file in (("system", system), ("longer", longer)):
        code, out, err = cli(monkeypatch, capsys, "run", HF_TINY, "--prompt-file", file, "-m", "10")
        assert code == 0, err
        plain[name] = run_text(out)
    code, out, err = cli(monkeypatch, capsys, "run", HF_TINY, "--prompt-file", system, "-m", "10", "--prompt-cache", cache)
    assert code == 0, err
    assert run_text(out) == plain["system"] and f"Prompt cache: 0 tokens reused, {saved} saved" in out and cache.is_file()
    for name, file in (("system", system), ("longer", longer)):
        code, out, err = cli(monkeypatch, capsys, "run", HF_TINY, "--prompt-file", file, "-m", "10", "--prompt-cache", cache)
        assert code == 0, err
        assert run_text(out) == plain[name] and f"Prompt cache: {saved} tokens reused" in out
    # --load-state reads a prompt cache file too: it is a MAD state file
    code, out, err = cli(monkeypatch, capsys, "run", HF_TINY, "-p", "x", "-m", "2", "--load-state", cache)
    assert code == 0, err


def test_prompt_cache_refuses_what_it_did_not_write(monkeypatch, capsys, tmp_path):
    cache = tmp_path / "c.cache"
    code, _, err = cli(monkeypatch, capsys, "run", HF_TINY, "-p", LONG, "-m", "1", "--prompt-cache", cache)
    assert code == 0, err
    before = cache.read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", NXAI_TINY, "-p", "abc", "-m", "1", "--prompt-cache", cache)
    assert code == 2 and "Traceback" not in err and "made by another model" in err and cache.read_bytes() == before
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    code, _, err = cli(monkeypatch, capsys, "run", HF_TINY, "-p", "abc", "-m", "1", "--prompt-cache", mine)
    assert code == 2 and "not a MAD state file" in err and mine.read_text() == "my notes"
    model, _ = mad.load(HF_TINY)
    state_file = tmp_path / "conversation.state"
    save_state_file(state_file, model.init_state(1))
    code, _, err = cli(monkeypatch, capsys, "run", HF_TINY, "-p", "abc", "-m", "1", "--prompt-cache", state_file)
    assert code == 2 and "without a recorded prompt" in err


@pytest.mark.parametrize("args, message", [
    (["--prompts", "P", "-p", "x"], "give only one of --prompts"),
    (["--prompts", "P", "--save-state", "s.st"], "--save-state"),
    (["--prompts", "P", "--repetition-penalty", "1.2"], "--repetition-penalty"),
    (["-p", "x", "--prompt-cache", "c.st", "--load-state", "c.st"], "--prompt-cache and --load-state"),
    (["--prompts", "missing.txt"], "cannot read --prompts"),
    (["--prompts", "EMPTY"], "no prompt in the file"),
])
def test_bad_batch_flags(monkeypatch, capsys, tmp_path, args, message):
    (tmp_path / "P").write_text("a\nb\n")
    (tmp_path / "EMPTY").write_text("\n \n")
    (tmp_path / "c.st").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "run", HF_TINY, *args)
    assert code == 2 and "Traceback" not in err and message in err, err


# ------------------------------------------------------------------------------------- bounded tracing
def count_traces(model) -> list:
    """The program's trace log (`Program.traces`), emptied, with the compiled functions dropped so that earlier
    traces do not hide new ones: it grows by one per trace from here on."""
    model.program.clear_compiled()
    model.program.traces.clear()
    return model.program.traces


def test_prompt_calls_and_decode_buckets():
    """Whole blocks from the start, then decreasing powers of two; batch sizes rounded up to a power of two."""
    from mad.generate import decode_bucket, next_prompt_end, resume_points

    for total in (1, 5, 255, 256, 257, 700, 1000):
        for start in range(0, total, PREFILL_BLOCK):
            ends, pos = [], start
            while pos < total:
                pos = next_prompt_end(pos, total)
                ends.append(pos)
            sizes = np.diff([start] + ends)
            tail = total % PREFILL_BLOCK
            assert ends[-1] == total and list(sizes[sizes == PREFILL_BLOCK].cumsum() + start)[-1:] in ([], [total - tail])
            assert sorted((int(s) for s in sizes if s < PREFILL_BLOCK), reverse=True) == [1 << b for b in range(8, -1, -1)
                                                                                         if tail & (1 << b)]
    ends, pos = [], 0
    while pos < 1000:  # with cuts: each segment read in blocks from its start, then powers of two
        pos = next_prompt_end(pos, 1000, cuts=(300, 700))
        ends.append(pos)
    assert ends == [256, 288, 296, 300, 556, 684, 700, 956, 988, 996, 1000]
    assert resume_points(1000, (300, 700)) == [256, 300, 556, 700, 956]
    assert resume_points(1000) == [256, 512, 768]
    assert [decode_bucket(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert [decode_bucket(n, 6) for n in (3, 5, 6, 7)] == [4, 6, 6, 7]


def test_traces_stay_bounded_over_many_clients(loaded, on_cpu):
    """Clients of 24 prompt lengths joining and leaving at different steps (batch sizes 1..7): the program is
    traced at most once per decode bucket and prompt piece, and every client gets its solo tokens."""
    model, tok = loaded
    traces = count_traces(model)
    rng = np.random.default_rng(1)
    lengths = [int(n) for n in rng.choice(np.arange(1, 300), 24, replace=False)]
    prompts = [rng.integers(3, model.vocab_size, n).tolist() for n in lengths]
    budgets = [int(m) for m in rng.integers(1, 6, len(prompts))]
    gen = BatchGenerator(model, prefill_budget=64, max_batch=8)
    got: dict[int, list[int]] = {}
    uids, pending, sizes = [], list(zip(prompts, budgets)), set()
    while pending or gen.busy:
        if pending and (gen.running + gen.waiting < 7):
            prompt, m = pending.pop()
            uids.append((gen.insert(prompt, max_tokens=m)[0], prompt, m))
        for r in gen.step():
            got.setdefault(r.uid, []).append(r.token)
        sizes.add(gen.running)
    assert len(sizes) >= 5  # the batch size did change often
    decode = {s for s, last in traces if not last}
    prompt = {s for s, last in traces if last}
    assert decode <= {(b, 1) for b in (1, 2, 4, 8)}
    assert prompt <= {(1, 1 << k) for k in range(9)}
    assert len(traces) == len(set(traces)) == len(gen.call_shapes)  # one trace per shape, and no other
    for uid, prompt, m in uids:
        assert got[uid] == alone(model, tok, prompt, m)


def test_a_row_never_affects_another(loaded, on_cpu):
    """A decode step whose other rows hold NaN states and tokens of their own gives row 0 its solo numbers:
    padding rows (and any other row) cannot leak into a sequence."""
    model, _ = loaded
    logits, state = model.prefill(mx.array([[5, 6, 7]], dtype=mx.int32))
    token = mx.argmax(logits, axis=-1)
    ref_logits, ref_state = model(token[:, None], state)
    axes = {n: {k: e[2][0] for k, e in names.items()} for n, names in model._state_spec.items()}
    poisoned = {n: {k: mx.concatenate([a, mx.full(a.shape, float("nan"))] * 2, axis=axes[n][k])[:4]
                    if axes[n][k] == 0 else None for k, a in e.items()} for n, e in state.items()}
    assert all(v is not None for e in poisoned.values() for v in e.values())
    tokens = mx.concatenate([token, mx.array([0, 1, 2], dtype=token.dtype)])
    logits, new = model(tokens[:, None].astype(mx.int32), poisoned)
    assert mx.array_equal(logits[:1], ref_logits).item()
    for n, e in ref_state.items():
        for k, a in e.items():
            assert mx.array_equal(new[n][k][:1], a).item(), (n, k)


def test_batch_invariant_switch():
    """The serving switch of the linear kernel: checked, and off by default (`mad bench` keeps MLX's matmul)."""
    from mad.kernels import linear_device as ld

    assert ld.row_limit() == ld.MAX_ROWS
    for bad in (0, ld.MAX_INVARIANT_ROWS + 1, 2.5, True):
        with pytest.raises(ValueError, match="rows"):
            ld.batch_invariant(bad)
    try:
        ld.batch_invariant(16)
        assert ld.row_limit() == 16
        # a prompt piece (one sequence, 16 positions) keeps MLX's matmul: the kernel declines it before launching
        x, w = mx.zeros((1, 16, 64)), mx.zeros((32, 64))
        with pytest.raises(Unsupported, match="linear"):
            ld.linear_device(x, w)
    finally:
        ld.batch_invariant(None)
    assert ld.row_limit() == ld.MAX_ROWS


GPU = mx.cuda.is_available() if hasattr(mx, "cuda") else False


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_linear_kernel_rows_are_batch_invariant_on_the_gpu(dtype):
    """With the serving switch, every row of a linear of M = 1..32 rows has exactly the bits it has alone."""
    from mad.kernels import linear_device as ld

    rng = np.random.default_rng(0)
    K, N = 512, 200
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) / 20).astype(dtype)
    b = mx.array(rng.standard_normal(N).astype(np.float32)).astype(dtype)
    x = mx.array(rng.standard_normal((32, K)).astype(np.float32)).astype(dtype)
    try:
        ld.batch_invariant(32)
        alone_rows = [ld.linear_device(x[i:i + 1], w, b, (), (30.0,))[0] for i in range(32)]
        for M in (2, 4, 8, 16, 32):
            (y,) = ld.linear_device(x[:M], w, b, (), (30.0,))
            for i in range(M):
                assert mx.array_equal(y[i:i + 1], alone_rows[i]).item(), (M, i)
    finally:
        ld.batch_invariant(None)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_decode_rows_are_batch_invariant_on_the_gpu():
    """bfloat16 on the GPU, with the serving switch: each row of a decode step of 8 (and 32) gets exactly
    the logits and state of its batch-1 step."""
    from mad.kernels import linear_device as ld

    model, _ = mad.load(ROOT / "topologies" / "xlstm-tiny.yaml", dtype="bfloat16")
    rng = np.random.default_rng(0)
    try:
        ld.batch_invariant(32)
        model.program.clear_compiled()
        solo = []
        for n in rng.integers(1, 40, 32):
            logits, state = model.prefill(mx.array([rng.integers(0, model.vocab_size, int(n)).tolist()], dtype=mx.int32))
            solo.append((mx.argmax(logits, axis=-1).astype(mx.int32), state))
        for B in (8, 32):
            state = {n: {k: mx.concatenate([s[n][k] for _, s in solo[:B]]) for k in e} for n, e in solo[0][1].items()}
            logits, new = model(mx.concatenate([t for t, _ in solo[:B]])[:, None], state)
            for i, (token, one) in enumerate(solo[:B]):
                ref_logits, ref_state = model(token[:, None], one)
                assert mx.array_equal(logits[i:i + 1], ref_logits).item(), (B, i)
                for n, e in ref_state.items():
                    for k, a in e.items():
                        assert mx.array_equal(new[n][k][i:i + 1], a).item(), (B, i, n, k)
    finally:
        ld.batch_invariant(None)
        model.program.clear_compiled()
