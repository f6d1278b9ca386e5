"""Clients for the server tests (`mad serve`, one process or tensor parallel)."""

from __future__ import annotations

import threading


def concurrent_completions(client, model: str, prompts: list[str], max_tokens: int, timeout: float) -> list:
    """Stream a completion of each prompt at temperature 0 from one thread per prompt, all started together;
    the texts, in the prompts' order (None for a client that did not finish within `timeout` seconds)."""
    texts: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        stream = client.completions.create(model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0,
                                           stream=True)
        texts[i] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return texts
