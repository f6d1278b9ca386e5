"""`mad chat` with a checkpoint's chat template: each turn is the template's rendering of the new message
(the first with the system prompt), read on top of the conversation's state, as the Python API gives it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mad
from mad.chat_template import ChatTemplate
from mad.generate import stream_generate

ROOT = Path(__file__).resolve().parents[1]
HF_TINY = ROOT / "tests" / "fixtures" / "hf-tiny"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

pytest.importorskip("jinja2")


def chat_cli(folder: Path, *flags: str, stdin: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mad.cli", "chat", str(folder), *flags], capture_output=True,
                          env=env, input=stdin.encode(), timeout=120, cwd=ROOT)


@pytest.fixture()
def templated(tmp_path) -> Path:
    folder = tmp_path / "chat-model"
    shutil.copytree(HF_TINY, folder)
    (folder / "golden.safetensors").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return folder


def replies(folder: Path, turns: list[list[dict]], max_tokens: int) -> list[str]:
    """Each turn's reply through the Python API: the rendered turn read on top of the state so far."""
    model, tok = mad.load(folder)
    template, state, out = ChatTemplate(CHATML), None, []
    for messages in turns:
        text = ""
        for r in stream_generate(model, tok, template.render(messages), max_tokens=max_tokens, state=state):
            text += r.text
        out.append(text)
        state = r.state
    return out


def test_each_turn_is_the_templates_rendering_of_the_new_message(templated):
    proc = chat_cli(templated, "-m", "6", "--system-prompt", "Be brief.", stdin="Hello there\nAnd again\n")
    assert proc.returncode == 0, proc.stderr.decode()
    want = replies(templated, [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                               [{"role": "user", "content": "And again"}]], 6)
    assert proc.stdout.decode() == "".join(t + "\n" for t in want)
    # the same conversation with the lines as typed (no template) reads other tokens
    plain = chat_cli(templated, "-m", "6", "--no-chat-template", stdin="Hello there\nAnd again\n")
    assert plain.returncode == 0 and plain.stdout.decode() != proc.stdout.decode()


def test_chat_flags_that_do_not_go_together(templated, tmp_path):
    state = tmp_path / "c.state"
    assert chat_cli(templated, "-m", "1", "--save-state", str(state), stdin="Hi\n").returncode == 0
    proc = chat_cli(templated, "--load-state", str(state), "--system-prompt", "x", stdin="Hi\n")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--system-prompt" in err and "Traceback" not in err


def test_a_template_that_fails_costs_one_turn(templated):
    """A template that refuses a message (raise_exception) is this turn's error; the chat goes on."""
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[-1]['content'] == 'bad' %}{{ raise_exception('no bad words') }}"
                               "{% endif %}" + CHATML)
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    proc = chat_cli(templated, "-m", "2", stdin="bad\ngood\n")
    err = proc.stderr.decode()
    assert proc.returncode == 0 and "no bad words" in err and "Traceback" not in err
    assert len(proc.stdout.decode().splitlines()) == 1
