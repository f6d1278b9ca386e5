"""Bad checkpoints: every corruption of a checkpoint folder is one clear MadError naming the file, the
weight, the field or the index entry, before anything is materialised; through the CLI, exit 2 and no
traceback. The corpus is built in tmp_path from the fixtures (copy, then corrupt).

Also here: `--set` on checkpoint folders, the tokenizer rule (a vocabulary larger than bytes needs a
tokenizer or an explicit `bytes`), and the memory check before weights are materialised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

import mad
from mad.errors import MadError
from mad.tokenizers import ByteTokenizer
from mad.loading import load

FIX = Path(__file__).parent / "fixtures"
HF_TINY, NXAI_TINY = FIX / "hf-tiny", FIX / "nxai-tiny"
ROOT = Path(__file__).resolve().parents[1]


def pythonpath(*folders) -> str:
    """PYTHONPATH for a subprocess: these folders first, then what this process was given (where MLX may be)."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def copy(tmp_path: Path, src: Path = HF_TINY, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    shutil.copytree(src, folder)
    (folder / "golden.safetensors").unlink(missing_ok=True)
    return folder


def weights_of(folder: Path) -> dict:
    return dict(mx.load(str(folder / "model.safetensors")))


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            config.pop(k, None)
        else:
            config[k] = v
    (folder / "config.json").write_text(json.dumps(config))


DELETE = object()


def shard(folder: Path, index: dict | str | list, shards: dict[str, dict] | None = None) -> None:
    """Replace model.safetensors by shards (name -> tensors) and an index (dict, or raw text)."""
    (folder / "model.safetensors").unlink()
    for name, tensors in (shards or {}).items():
        mx.save_safetensors(str(folder / name), tensors)
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)


def two_shards(folder: Path) -> tuple[dict, dict, dict]:
    weights = weights_of(folder)
    names = sorted(weights)
    a = {k: weights[k] for k in names[: len(names) // 2]}
    b = {k: weights[k] for k in names[len(names) // 2:]}
    return weights, a, b


# ----------------------------------------------------------------------------------------- the corpus
def case_index_parent(folder, tmp_path):
    weights, a, b = two_shards(folder)
    mx.save_safetensors(str(tmp_path / "outside.safetensors"), b)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "../outside.safetensors" for k in b}}},
          {"a.safetensors": a})
    return "'../outside.safetensors': the shard is outside the checkpoint folder"


def case_index_absolute(folder, tmp_path):
    weights, a, b = two_shards(folder)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "/etc/passwd" for k in b}}},
          {"a.safetensors": a})
    return "'/etc/passwd': the shard is outside the checkpoint folder"


def case_index_symlink_escapes(folder, tmp_path):
    weights, a, b = two_shards(folder)
    mx.save_safetensors(str(tmp_path / "elsewhere.safetensors"), b)
    (folder / "b.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}}},
          {"a.safetensors": a})
    return "'b.safetensors': the shard is outside the checkpoint folder"


def test_hub_cache_snapshot_links_are_inside(tmp_path):
    """A Hugging Face hub cache links a snapshot's files to the repo's blobs/: those shards are fine."""
    repo = tmp_path / "models--x--tiny"
    folder = copy(repo / "snapshots", name="abc123")
    weights, a, b = two_shards(folder)
    (repo / "blobs").mkdir()
    for name, part in (("a.safetensors", a), ("b.safetensors", b)):
        mx.save_safetensors(str(repo / "blobs" / f"sha-{name}"), part)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}}})
    for name in ("a.safetensors", "b.safetensors"):
        (folder / name).symlink_to(Path("../../blobs") / f"sha-{name}")
    model, _ = load(folder)
    assert set(model.program.parameters()) == set(weights)
    (folder / "b.safetensors").unlink()
    (folder / "b.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    mx.save_safetensors(str(tmp_path / "elsewhere.safetensors"), b)
    with pytest.raises(MadError, match="outside the checkpoint folder"):
        load(folder)


def case_index_names_the_folder(folder, tmp_path):
    weights, a, b = two_shards(folder)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "." for k in b}}}, {"a.safetensors": a})
    return "the shard is outside the checkpoint folder"


def case_duplicate_key_across_shards(folder, tmp_path):
    weights, a, b = two_shards(folder)
    key = next(iter(a))
    b = {**b, key: a[key]}
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}}},
          {"a.safetensors": a, "b.safetensors": b})
    return f"tensor '{key}' is in two shards: 'a.safetensors' and 'b.safetensors'"


def case_index_not_json(folder, tmp_path):
    weights, a, b = two_shards(folder)
    shard(folder, "{weight_map: nope", {"a.safetensors": a})
    return "cannot parse model.safetensors.index.json"


def case_index_not_a_mapping(folder, tmp_path):
    shard(folder, ["a.safetensors"])
    return "expected a mapping with a 'weight_map' mapping"


def case_weight_map_not_a_mapping(folder, tmp_path):
    shard(folder, {"weight_map": ["a.safetensors"]})
    return "expected a mapping with a 'weight_map' mapping"


def case_weight_map_values_not_str(folder, tmp_path):
    weights, a, b = two_shards(folder)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: 7 for k in b}}}, {"a.safetensors": a})
    return "-> 7: the shard must be a file name"


def case_weight_map_empty(folder, tmp_path):
    shard(folder, {"weight_map": {}})
    return "'weight_map' is empty"


def case_index_key_not_in_shard(folder, tmp_path):
    weights, a, b = two_shards(folder)
    index = {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}, "ghost.weight": "a.safetensors"}
    shard(folder, {"weight_map": index}, {"a.safetensors": a, "b.safetensors": b})
    return "'ghost.weight' -> 'a.safetensors', but the shard has no tensor 'ghost.weight'"


def case_shard_tensor_not_in_index(folder, tmp_path):
    weights, a, b = two_shards(folder)
    key = next(iter(b))
    index = {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b if k != key}}
    shard(folder, {"weight_map": index}, {"a.safetensors": a, "b.safetensors": b})
    return f"shard 'b.safetensors' holds tensor '{key}', which the index does not map to it"


def case_shard_missing(folder, tmp_path):
    weights, a, b = two_shards(folder)
    shard(folder, {"weight_map": {**{k: "a.safetensors" for k in a}, **{k: "b.safetensors" for k in b}}},
          {"a.safetensors": a})
    return "shard 'b.safetensors' named in the index is missing"


def case_int_weight(folder, tmp_path):
    weights = weights_of(folder)
    w = weights["lm_head.weight"]
    weights["lm_head.weight"] = mx.zeros(w.shape, dtype=mx.int32)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return "weight 'lm_head.weight' has dtype mlx.core.int32, the model expects floating-point weights"


def case_bool_weight(folder, tmp_path):
    weights = weights_of(folder)
    key = "backbone.out_norm.weight"
    weights[key] = mx.ones(weights[key].shape, dtype=mx.bool_)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return f"weight '{key}' has dtype mlx.core.bool, the model expects floating-point weights"


def case_truncated_safetensors(folder, tmp_path):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    return "cannot read safetensors file"


def case_safetensors_garbage(folder, tmp_path):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return "cannot read safetensors file"


def case_no_weights(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    return "no model.safetensors or model.safetensors.index.json"


def _config_case(message, **changes):
    def case(folder, tmp_path):
        set_config(folder, **changes)
        return message
    return case


CONFIG_CASES = {
    "hidden_size_str": _config_case("'hidden_size' must be an integer >= 1, got 'big'", hidden_size="big"),
    "hidden_size_null": _config_case("'hidden_size' is missing", hidden_size=None, embedding_dim=None),
    "hidden_size_list": _config_case("'hidden_size' must be an integer >= 1, got [64]", hidden_size=[64]),
    "hidden_size_negative": _config_case("'hidden_size' must be an integer >= 1, got -64", hidden_size=-64),
    "hidden_size_zero": _config_case("'hidden_size' must be an integer >= 1, got 0", hidden_size=0),
    "hidden_size_float": _config_case("'hidden_size' must be an integer >= 1, got 64.0", hidden_size=64.0),
    "vocab_missing": _config_case("'vocab_size' is missing", vocab_size=DELETE),
    "vocab_bool": _config_case("'vocab_size' must be an integer >= 1, got True", vocab_size=True),
    "layers_str": _config_case("'num_hidden_layers' must be an integer >= 1, got '2'", num_hidden_layers="2"),
    "heads_zero": _config_case("'num_heads' must be an integer >= 1, got 0", num_heads=0),
    "chunk_dict": _config_case("'chunk_size' must be an integer >= 1, got {}", chunk_size={}),
    "qk_factor_nan": _config_case("'qk_dim_factor' must be a number > 0, got nan", qk_dim_factor=float("nan")),
    "qk_factor_tiny": _config_case("'qk_dim_factor' makes the QK dim 0", qk_dim_factor=0.001),
    "ffn_factor_inf": _config_case("'ffn_proj_factor' must be a number > 0, got inf", ffn_proj_factor=float("inf")),
    "round_zero": _config_case("'ffn_round_up_to_multiple_of' must be an integer >= 1, got 0",
                               ffn_round_up_to_multiple_of=0),
    "eps_str": _config_case("'eps' must be a number > 0, got 'tiny'", eps="tiny"),
    "gate_cap_str": _config_case("'gate_soft_cap' must be a number > 0 or null, got 'x'", gate_soft_cap="x"),
    "tie_str": _config_case("'tie_word_embeddings' must be true or false, got 'yes'", tie_word_embeddings="yes"),
    "architectures_int": _config_case("unsupported model", model_type=DELETE, architectures=5),
    "eos_str": _config_case("'eos_token_id' must be a token id or a list of them", eos_token_id="</s>"),
    "divisibility": _config_case("constraint", num_heads=3),
}


def case_config_not_json(folder, tmp_path):
    (folder / "config.json").write_text("{not json")
    return "cannot parse config.json"


def case_config_a_list(folder, tmp_path):
    (folder / "config.json").write_text("[1, 2]")
    return "config.json must hold a mapping"


def case_config_not_utf8(folder, tmp_path):
    (folder / "config.json").write_bytes(b'{"model_type": "xlstm\xff"}')
    return "cannot parse config.json: not UTF-8 text (byte 0xff"


def case_config_deeply_nested(folder, tmp_path):
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    return "cannot parse config.json: nested too deeply"


def case_config_a_folder(folder, tmp_path):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    return "no config.json"


def case_tokenizer_corrupt(folder, tmp_path):
    (folder / "tokenizer.json").write_text("{broken")
    return "cannot read tokenizer"


def case_fused_weight_scalar(folder, tmp_path):
    shutil.rmtree(folder)
    shutil.copytree(FIX / "hf-tiny-fused", folder)
    weights = weights_of(folder)
    key = next(k for k in weights if k.endswith(".qkv_opreact.weight"))
    weights[key] = mx.array(1.0)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return f"fused weight '{key}' has shape ()"


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
CASES.update(CONFIG_CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_checkpoint_api(tmp_path, name):
    folder = copy(tmp_path)
    expected = CASES[name](folder, tmp_path)
    with pytest.raises(MadError) as info:
        load(folder)
    text = info.value.render()
    assert expected in text, text
    assert "Traceback" not in text


# the CLI: a sample of the corpus in a subprocess (each one starts Python and MLX)
CLI_SAMPLE = ["index_parent", "duplicate_key_across_shards", "int_weight", "hidden_size_str", "vocab_missing",
              "config_deeply_nested", "shard_tensor_not_in_index", "truncated_safetensors"]


def mad_cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=pythonpath(ROOT))
    return subprocess.run([sys.executable, "-m", "mad.cli", *map(str, args)], capture_output=True, env=env,
                          input=stdin, timeout=120, cwd=cwd or ROOT, **kw)


@pytest.mark.parametrize("name", CLI_SAMPLE)
def test_bad_checkpoint_cli(tmp_path, name):
    folder = copy(tmp_path)
    expected = CASES[name](folder, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    proc = mad_cli("run", folder, "--prompt-ids", "1,2", "-m", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err and expected in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing written


def test_nxai_config_cases(tmp_path):
    base = yaml.safe_load((NXAI_TINY / "config.yaml").read_text())
    cases = [
        ({"mlstm_block": {"mlstm": {**base["mlstm_block"]["mlstm"], "round_proj_up_to_multiple_of": 0}}},
         "mlstm_block.mlstm.round_proj_up_to_multiple_of: must be >= 1, got 0"),
        ({"mlstm_block": {"mlstm": {**base["mlstm_block"]["mlstm"], "proj_factor": float("nan")}}},
         "mlstm_block.mlstm.proj_factor: expected float, got nan"),
        ({"slstm_block": {**base["slstm_block"], "feedforward": {"proj_factor": float("inf")}}},
         "slstm_block.feedforward.proj_factor: expected float, got inf"),
        ({"mlstm_block": {"mlstm": {**base["mlstm_block"]["mlstm"], "num_heads": 0}}},
         "mlstm_block.mlstm.num_heads: 0 does not divide"),
        ({"embedding_dim": None}, "embedding_dim: expected int, got None"),
    ]
    for i, (changes, message) in enumerate(cases):
        folder = copy(tmp_path, NXAI_TINY, f"nxai{i}")
        (folder / "config.yaml").write_text(yaml.safe_dump({**base, **changes}))
        with pytest.raises(MadError) as info:
            load(folder)
        assert message in info.value.render(), info.value.render()
        assert str(folder / "config.yaml") in info.value.render()


def test_nxai_config_yaml_bomb_is_bounded(tmp_path):
    folder = copy(tmp_path, NXAI_TINY)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    (folder / "config.yaml").write_text(bomb)
    start = time.perf_counter()
    with pytest.raises(MadError) as info:
        load(folder)
    assert time.perf_counter() - start < 10
    assert str(folder / "config.yaml") in info.value.render()


def test_huge_layer_count_fails_before_weights_are_read(tmp_path, monkeypatch):
    folder = copy(tmp_path)
    set_config(folder, num_hidden_layers=1_000_000, num_blocks=1_000_000)
    read = []
    import mad.loading as loading

    real = loading.read_safetensors
    monkeypatch.setattr(loading, "read_safetensors", lambda f: read.append(f) or real(f))
    start = time.perf_counter()
    with pytest.raises(MadError):
        load(folder)
    assert time.perf_counter() - start < 30
    assert not read  # the graph (or its size) failed first


# ----------------------------------------------------------------------------------------- --set on checkpoints
def test_set_applies_to_checkpoints(tmp_path):
    tokens = mx.array([[1, 5, 7, 9]])
    base, _ = load(HF_TINY)
    capped, _ = load(HF_TINY, overrides=["nodes.lm_head.softcap=2"])
    a, b = np.array(base(tokens)[0]), np.array(capped(tokens)[0])
    assert np.abs(b).max() <= 2.0 + 1e-5 and np.abs(a).max() > 2.0  # the override was applied
    with pytest.raises(MadError) as info:
        load(HF_TINY, overrides=["dims.D=32"])
    assert "has shape" in info.value.render() and "the model expects" in info.value.render()
    with pytest.raises(MadError) as info:
        load(HF_TINY, overrides=["garbage"])
    assert "--set" in info.value.render()


def test_cli_set_applies_to_checkpoints():
    proc = mad_cli("run", HF_TINY, "--set", "garbage", "--prompt-ids", "1", "-m", "1")
    assert proc.returncode == 2 and "--set" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    proc = mad_cli("run", HF_TINY, "--set", "dims.D=32", "--prompt-ids", "1", "-m", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "has shape" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- tokenizers
def test_missing_tokenizer_with_a_large_vocabulary(tmp_path):
    folder = copy(tmp_path)
    (folder / "tokenizer.json").unlink()
    model, tok = load(folder)
    assert tok is None and model.vocab_size == 300
    with pytest.raises(MadError, match="no tokenizer for a model with a vocabulary of 300 ids"):
        list(mad.stream_generate(model, None, "Hello", max_tokens=2))
    out = list(mad.stream_generate(model, ByteTokenizer(), "Hello", max_tokens=2))  # asked for bytes
    assert len(out) == 2
    model, tok = load(folder, tokenizer="bytes")
    assert isinstance(tok, ByteTokenizer)
    model, tok = load(folder, tokenizer=HF_TINY / "tokenizer.json")
    assert tok.encode("Hello") == load(HF_TINY)[1].encode("Hello") and tok.eos_token_ids == (2,)
    with pytest.raises(MadError, match="no such tokenizer file"):
        load(folder, tokenizer=folder / "nope.json")

    proc = mad_cli("run", folder, "--prompt", "Hi", "-m", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    assert str(folder) in err and "--tokenizer FILE" in err and "--tokenizer bytes" in err
    proc = mad_cli("run", folder, "--prompt", "Hi", "-m", "1", "--tokenizer", "bytes")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = mad_cli("run", folder, "--prompt", "Hi", "-m", "1", "--tokenizer", HF_TINY / "tokenizer.json")
    assert proc.returncode == 0, proc.stderr.decode()


# ----------------------------------------------------------------------------------------- memory
def test_memory_check_before_materialising(tmp_path, monkeypatch):
    import mad.loading as loading

    monkeypatch.setattr(loading, "available_memory", lambda: (1000, "a test"))
    materialised = []
    monkeypatch.setattr(loading, "_materialise", lambda p: materialised.append(p))
    with pytest.raises(MadError) as info:
        load(HF_TINY)
    text = info.value.render()
    assert "the model needs about" in text and "0.0 GB are available (a test)" in text
    assert "--no-memory-check" in text and "memory_check=False" in text
    with pytest.raises(MadError, match="the model needs about"):
        load(ROOT / "topologies" / "examples" / "tiny.yaml")
    assert not materialised
    load(HF_TINY, memory_check=False)
    assert materialised


def test_available_memory_is_known_here():
    from mad.loading import available_memory

    avail, where = available_memory()
    assert avail is None or avail > 0, where


def test_cli_memory_check_and_flag(monkeypatch, capsys):
    import mad.loading as loading
    from yaml_files import cli

    monkeypatch.setattr(loading, "available_memory", lambda: (1000, "a test"))
    for command, extra in (("run", ["--prompt-ids", "1", "-m", "1"]), ("bench", ["-p", "2", "-g", "1", "-n", "1"])):
        code, out, err = cli(monkeypatch, capsys, command, HF_TINY, *extra)
        assert code == 2 and "the model needs about" in err and "--no-memory-check" in err and "Traceback" not in err
        code, out, err = cli(monkeypatch, capsys, command, HF_TINY, *extra, "--no-memory-check")
        assert code == 0, err


# ----------------------------------------------------------------------------------------- formats by convention
def test_formats_are_found_by_convention():
    """`model_type: X` -> mad.formats.X; a config without one -> the module whose detect agrees; a model_type
    that names no module (or a path) imports nothing and is reported with the formats MAD reads."""
    from mad import formats

    assert {"xlstm", "nxai_xlstm"} <= set(formats.module_names())
    assert formats.find_format({"model_type": "xlstm"}) is formats.format_named("xlstm")
    assert formats.find_format({"architectures": ["xLSTMForCausalLM"]}) is formats.format_named("xlstm")
    assert formats.find_format({"mlstm_block": {}}) is formats.format_named("nxai_xlstm")
    assert formats.find_format({"model": {"slstm_block": {}}}) is formats.format_named("nxai_xlstm")
    for model_type in ("llama", "../xlstm", "os", "__init__", 5):
        assert formats.find_format({"model_type": model_type}) is None
    assert formats.config_files() == ["config.json", "config.yaml", "config.yml"]
    for name in formats.module_names():  # every module offers the whole interface
        fmt = formats.format_named(name)
        assert fmt.name and callable(fmt.detect) and callable(fmt.topology) and callable(fmt.sanitize)
        assert callable(fmt.tokenizer) and callable(fmt.eos_token_ids)


def test_unknown_model_type_lists_the_formats(tmp_path):
    folder = copy(tmp_path)
    set_config(folder, model_type="llama")
    with pytest.raises(MadError) as info:
        load(folder)
    text = info.value.render()
    assert "unsupported model: model_type 'llama'" in text and "xLSTM-7B family" in text and "NX-AI" in text
