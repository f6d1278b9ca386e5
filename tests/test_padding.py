"""Inert padding (`Program`'s `valid`): a call of W tokens whose positions from r on are padding gives the
outputs and the state of the first r tokens read alone, so a prompt's rest after its whole blocks is read in
one padded call (`mad.generate.next_prompt_end(pad=True)`) instead of power-of-two pieces; models with a
stateful block that cannot pad (sLSTM) say so and keep the pieces."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mad
from mad.errors import MadError
from mad.generate import PREFILL_BLOCK, BatchGenerator, next_prompt_end, padded_width
from mad.kernels.mlstm import PAD_INPUT_GATE, inert_gates, mlstm_sequence
from mad.prompt_cache import PromptCache

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
NXAI_TINY = ROOT / "tests" / "fixtures" / "nxai-tiny"
CUDA = mx.cuda.is_available()

# (r real tokens, W tokens in the call): whole chunks of padding (chunk 16 in the conv model), one pad, r = W - 1
CASES = [(5, 8), (37, 64), (3, 64), (20, 32), (63, 64), (2, 4)]


def close(a: mx.array, b: mx.array, what: str) -> None:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert np.all(np.isfinite(a)), what
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())), err_msg=what)


@pytest.fixture(scope="module", params=["hf-tiny", "conv"])
def model(request):
    if request.param == "hf-tiny":
        return mad.load(HF_TINY)[0]
    return mad.load(ROOT / "topologies" / "examples" / "design-recall-mlstm.yaml", overrides=["dims.V=64"])[0]


def random_tokens(model, n: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, model.vocab_size, (1, n)), dtype=mx.int32)


@pytest.mark.parametrize("r,width", CASES)
def test_a_padded_call_equals_its_real_tokens_alone(model, r, width, on_cpu):
    """Outputs at the real positions, the last real position's logits (`last_only`), the state, and the
    next decode step: those of the r tokens read alone, from a state that has read a prefix."""
    assert model.pads_exactly
    _, state = model(random_tokens(model, 40, 0))
    tokens = random_tokens(model, width, r)
    ref_logits, ref_state = model(tokens[:, :r], state)
    logits, new_state = model(tokens, state, valid=r)
    last, last_state = model(tokens, state, valid=r, last_only=True)
    close(logits[:, :r], ref_logits, "outputs at the real positions")
    assert last.shape == (1, 1, model.vocab_size)
    close(last[:, 0], ref_logits[:, -1], "last_only reads position r - 1")
    for st in (new_state, last_state):
        for node, entries in ref_state.items():
            for name, a in entries.items():
                close(st[node][name], a, f"state {node}/{name}")
    step = random_tokens(model, 1, 99)
    close(model(step, new_state)[0], model(step, ref_state)[0], "the decode step after it")


def test_one_trace_per_padded_width(on_cpu):
    """`valid` reaches the compiled program as an array: every r of one width runs the same trace."""
    model = mad.load(HF_TINY)[0]
    model.program.clear_compiled()
    model.program.traces.clear()
    tokens = random_tokens(model, 16, 1)
    for r in (3, 9, 15):
        mx.eval(model(tokens, valid=r, last_only=True))
    assert model.program.traces == [((1, 16), True)]


def test_inert_gates_on_a_chunk_of_padding_alone(on_cpu):
    """The cell itself, chunkwise with chunk 4 over 12 positions of which 3 are real (two chunks of padding
    only): the state of the 3 positions read alone, finite outputs everywhere."""
    rng = np.random.default_rng(3)
    q, k = (mx.array(rng.normal(size=(1, 2, 12, 8)), dtype=mx.float32) for _ in range(2))
    v = mx.array(rng.normal(size=(1, 2, 12, 8)), dtype=mx.float32)
    i, f = (mx.array(rng.normal(size=(1, 2, 12)) * 3, dtype=mx.float32) for _ in range(2))
    gi, gf = inert_gates(i, f, mx.array([3], dtype=mx.int32))
    assert gi[0, 0, 3].item() == np.float32(PAD_INPUT_GATE) and float(gi[0, 0, 2]) == float(i[0, 0, 2])
    h, st = mlstm_sequence(q, k, v, gi, gf, chunk_size=4)
    h_ref, st_ref = mlstm_sequence(q[:, :, :3], k[:, :, :3], v[:, :, :3], i[:, :, :3], f[:, :, :3], chunk_size=4)
    assert bool(mx.all(mx.isfinite(h)).item())
    close(h[:, :, :3], h_ref, "outputs")
    for a, b, name in zip(st, st_ref, "Cnm"):
        close(a, b, name)


def test_models_that_cannot_pad_say_so(on_cpu):
    """The original stack (sLSTM keeps state without inert padding): `pads_exactly` False, a padded call is a
    MadError naming the node, and the generator reads power-of-two pieces (or refuses `pad_prompts=True`)."""
    model = mad.load(NXAI_TINY)[0]
    assert not model.pads_exactly
    with pytest.raises(MadError, match="slstm|sLSTM|without inert padding"):
        model(random_tokens(model, 8, 0), valid=5)
    assert BatchGenerator(model).pad is False
    with pytest.raises(MadError, match="pad_prompts"):
        BatchGenerator(model, pad_prompts=True)
    staged = mad.load(HF_TINY, compile="stage")[0]
    assert not staged.pads_exactly
    with pytest.raises(MadError, match="stage by stage"):
        staged(random_tokens(staged, 8, 0), valid=5)


@pytest.mark.parametrize("bad", [0, 9, -1, True, 2.5, "3"])
def test_bad_valid_values(bad, on_cpu):
    model = mad.load(HF_TINY)[0]
    with pytest.raises(MadError, match="valid must be an integer from 1 to the sequence length 8"):
        model(random_tokens(model, 8, 0), valid=bad)


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_bad_pad_prompts(bad, on_cpu):
    with pytest.raises(MadError, match="pad_prompts must be True, False or None"):
        BatchGenerator(mad.load(HF_TINY)[0], pad_prompts=bad)


def test_prompt_calls_with_padding():
    """Whole blocks from the start of each segment, then its rest in one call of a power-of-two width."""
    ends, pos = [], 0
    while pos < 1000:
        pos = next_prompt_end(pos, 1000, cuts=(300, 700), pad=True)
        ends.append(pos)
    assert ends == [256, 300, 556, 700, 956, 1000]
    assert [padded_width(n) for n in (1, 2, 3, 37, 44, 64, 65, 255)] == [1, 2, 4, 64, 64, 64, 128, 256]
    assert next_prompt_end(0, 37, pad=True) == 37 and next_prompt_end(0, 37) == 32


def test_generator_pads_and_the_cache_stays_exact(on_cpu):
    """A padding generator reads a 4-block system part + question in whole blocks and one padded call per
    rest; a question after a cached cut is one call; tokens equal those of the unpadded generator (greedy)
    and of the same generator without the cache."""
    model, tok = mad.load(HF_TINY)
    system = [3 + i % 290 for i in range(4 * PREFILL_BLOCK + 10)]
    cut = (len(system),)

    def run(prompt, pad, cache=None):
        gen = BatchGenerator(model, prefill_budget=None, prompt_cache=cache, pad_prompts=pad)
        uid = gen.insert(prompt, max_tokens=6, cuts=cut)[0]
        out = []
        while gen.busy:
            out += [r.token for r in gen.step() if r.uid == uid]
        return out, gen.call_shapes

    cache = PromptCache(1 << 30)
    for question in ([5, 6, 7], list(range(10, 47))):
        prompt = system + question
        plain, plain_shapes = run(prompt, False)
        padded, shapes = run(prompt, True)
        cached, cached_shapes = run(prompt, True, cache)
        assert padded == plain == cached
        prompt_shapes = {s for s, last in shapes if last}
        assert prompt_shapes == {(1, PREFILL_BLOCK), (1, 16), (1, padded_width(len(question)))}
        assert len({s for s, last in plain_shapes if last}) > len(prompt_shapes)
    # the second question continued from the cut: one prompt call
    assert {s for s, last in cached_shapes if last} <= {(1, PREFILL_BLOCK), (1, 16), (1, 64)}


@pytest.mark.skipif(not CUDA, reason="needs MLX with CUDA (the chunkwise device kernels)")
def test_padding_through_the_device_kernels():
    """The GPU's chunkwise kernels (bf16 weights, float32 state) with inert positions: the state and the last
    real position's logits of the real tokens read alone, to bf16 rounding."""
    model = mad.load(ROOT / "topologies" / "xlstm-7b.yaml", dtype="bfloat16",
                     overrides=["dims.D=512", "dims.L=2", "dims.NH=4", "dims.V=512"])[0]
    _, state = model(random_tokens(model, 70, 0))
    for r, width in ((37, 64), (100, 128), (5, 256)):
        tokens = random_tokens(model, width, r)
        ref_logits, ref_state = model(tokens[:, :r], state, last_only=True)
        logits, new_state = model(tokens, state, valid=r, last_only=True)
        a, b = np.array(logits.astype(mx.float32)), np.array(ref_logits.astype(mx.float32))
        assert np.all(np.isfinite(a)) and np.abs(a - b).max() <= 3e-2 * np.abs(b).max()
        for node, entries in ref_state.items():
            for name, ref in entries.items():
                got = np.array(new_state[node][name])
                assert np.all(np.isfinite(got))
                assert np.abs(got - np.array(ref)).max() <= 3e-2 * max(1.0, np.abs(np.array(ref)).max()), (node, name)
