"""README.md's block-type table is generated from the block registry (mad/docs.py), so it cannot drift."""

from __future__ import annotations

from pathlib import Path

from mad import docs

README = Path(__file__).resolve().parents[1] / "README.md"


def test_block_table_is_current():
    assert docs.readme_table(README) == docs.block_table(), (
        "README.md's block-type table is out of date: run `python -m mad.docs` to regenerate it")


def test_block_table_lists_every_builtin_block_with_its_fields():
    from mad.block import block_types

    table = docs.block_table()
    for name, cls in block_types().items():
        if cls.__module__.startswith("mad.blocks."):
            assert f"| `{name}` |" in table, name
    assert "`kernel_size: dim = 4`" in table and "`heads: dim`" in table and "`factor: float = None`" in table


def test_write_readme_replaces_only_the_section(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\nbefore\n{docs.START}\nold table\n{docs.END}\nafter\n", encoding="utf-8")
    assert docs.write_readme(path)
    text = path.read_text(encoding="utf-8")
    assert text == f"# title\n\nbefore\n{docs.START}\n{docs.block_table()}{docs.END}\nafter\n"
    assert not docs.write_readme(path)  # a second run changes nothing
    assert docs.main([str(path), "--check"]) == 0
