"""HF transformers' xLSTM on the GPU, xLSTM-7B shape, bf16, random weights: the speed reference.

Measures what `mad bench` measures, on the same machine: prefill tokens/s (batch B, P tokens, one
forward with the cache) and decode tokens/s (G greedy single-token steps with the cache), median of
`--trials`, after a warm-up; `torch.cuda.synchronize()` before every clock read. transformers runs
its own native PyTorch kernels (eager).

    python benchmarks/gpu_hf_reference.py [-p 8192] [-g 32] [-b 1] [-n 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-p", "--prompt-tokens", type=int, default=8192)
    ap.add_argument("-g", "--generation-tokens", type=int, default=32)
    ap.add_argument("-b", "--batch-size", type=int, default=1)
    ap.add_argument("-n", "--trials", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers
    from transformers import xLSTMConfig, xLSTMForCausalLM

    torch.manual_seed(0)
    config = xLSTMConfig()  # the defaults are xLSTM-7B's shape
    with torch.device("cuda"):
        model = xLSTMForCausalLM(config).to(torch.bfloat16).eval()
        for name, p in model.named_parameters():  # HF's init zeroes the gate weights: re-draw them
            if p.ndim == 2 and "embeddings" not in name:
                p.data.normal_(0.0, p.shape[-1] ** -0.5)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_tokens), device="cuda")

    def trial(gen: int) -> tuple[float, float]:
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - start
            cache = out.cache_params
            start = time.perf_counter()
            for _ in range(gen):
                out = model(input_ids=token, cache_params=cache, use_cache=True)
                cache, token = out.cache_params, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            decode = time.perf_counter() - start
        return args.batch_size * args.prompt_tokens / prefill, args.batch_size * gen / decode if gen else 0.0

    trial(2)
    results = [trial(args.generation_tokens) for _ in range(args.trials)]
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "params": params,
           "gpu": torch.cuda.get_device_name(), "prompt_tokens": args.prompt_tokens,
           "generation_tokens": args.generation_tokens, "batch_size": args.batch_size,
           "prompt_tps": statistics.median(r[0] for r in results),
           "generation_tps": statistics.median(r[1] for r in results),
           "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9, "trials": results}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
