"""Where a quantized model's peak memory goes: weights, prompt reading and decoding, bf16 against 4-bit.

For the bf16 model and then the same model quantized in place (`mad.quantize.quantize_model`), in one
process: the bytes of the parameters, then MLX's peak memory (each from a reset) over reading a
`--prompt`-token prompt (`model.prefill`, as `mad bench` reads it) and over `--generate` decode steps
(double-buffered, as `mad bench` runs them). Each peak is printed as weights + the rest, so the rest (the
state, activations, temporaries of the products) can be compared between the two. Then one quantized
product alone, `--prompt` rows times the largest quantized matrix (the head), with `mx.quantized_matmul`:
its peak above its inputs and output shows whether the product materialises a dequantized copy of the
matrix (about rows x columns x 2 bytes).

    python benchmarks/probes/gpu_quant_memory.py [--topology topologies/xlstm-7b.yaml] [--bits 4]
                                                 [--prompt 128] [--generate 16]
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import mad
import mlx.core as mx

from mad.quantize import quantize_model

ROOT = Path(__file__).resolve().parents[2]


def peaks(model, prompt: mx.array, steps: int) -> dict:
    """Weight bytes and the peaks (bytes) of prefill and of decoding, each from a reset."""
    weights = sum(a.nbytes for a in model.program.parameters().values())
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    logits, state = model.prefill(prompt, check_tokens=False)
    token = mx.argmax(logits, axis=-1)
    mx.eval(token, state)
    prefill = mx.get_peak_memory()
    mx.reset_peak_memory()
    for _ in range(steps):
        logits, state = model(token[:, None], state, check_tokens=False)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.async_eval(token, state)
    mx.eval(token, state)
    decode = mx.get_peak_memory()
    state_bytes = sum(a.nbytes for e in state.values() for a in e.values())
    return {"weights": weights, "active_before": base, "state": state_bytes, "prefill_peak": prefill,
            "decode_peak": decode}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default=str(ROOT / "topologies" / "xlstm-7b.yaml"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    model, _ = mad.load(a.topology, dtype="bfloat16")
    mx.eval(model.program.parameters())
    prompt = mx.random.randint(0, model.vocab_size, (1, a.prompt)).astype(mx.int32)
    out = {"bfloat16": peaks(model, prompt, a.generate)}
    quantize_model(model, bits=a.bits, group_size=a.group_size)
    for w in model.program.parameters().values():  # one at a time: each float matrix is freed once quantized
        mx.eval(w)
    gc.collect()
    mx.clear_cache()
    out[f"{a.bits}-bit"] = peaks(model, prompt, a.generate)
    for name, r in out.items():
        gb = {k: v / 1e9 for k, v in r.items()}
        print(f"{name}: weights {gb['weights']:.3f} GB (active {gb['active_before']:.3f}), state {gb['state']:.3f}; "
              f"prefill peak {gb['prefill_peak']:.3f} (+{gb['prefill_peak'] - gb['active_before']:.3f}), "
              f"decode peak {gb['decode_peak']:.3f} (+{gb['decode_peak'] - gb['active_before']:.3f})", flush=True)
    for kind in ("prefill_peak", "decode_peak"):
        print(f"{kind}: {a.bits}-bit / bf16 = {out[f'{a.bits}-bit'][kind] / out['bfloat16'][kind]:.3f}")

    # one quantized product alone: the head's matrix times `--prompt` rows
    del model
    gc.collect()
    mx.clear_cache()
    N, K = 50304, 4096
    w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
    q = mx.quantize(w, group_size=a.group_size, bits=a.bits)
    del w
    x = mx.random.normal((a.prompt, K)).astype(mx.bfloat16)
    mx.eval(q, x)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    y = mx.quantized_matmul(x, *q, transpose=True, group_size=a.group_size, bits=a.bits)
    mx.eval(y)
    extra = mx.get_peak_memory() - base - y.nbytes
    out["product"] = {"rows": a.prompt, "N": N, "K": K, "peak_above_inputs_and_output": extra,
                      "dequantized_matrix_bytes": N * K * 2}
    print(f"quantized_matmul ({a.prompt} x {K}) x ({N} x {K})^T: {extra / 1e6:.1f} MB above inputs and output "
          f"(a dequantized bf16 copy would be {N * K * 2 / 1e6:.1f} MB)")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
