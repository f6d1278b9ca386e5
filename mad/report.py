"""Views derived from the graph: summary table, graph.json / .mmd / .dot, plan.json, atomic build dirs."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import networkx as nx
from rich.console import Console
from rich.table import Table

from .dims import DimVal, shape_str
from .errors import MadError
from .graph import Graph, summary_rows
from .program import Program


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def totals(graph: Graph) -> str:
    return (f"Parameters: {graph.param_count():,}    "
            f"Recurrent state: {human_bytes(graph.state_bytes())} per sequence (float32, {graph.state_bytes():,} bytes)")


def summary_table(graph: Graph) -> Table:
    table = Table(title=f"{graph.name}", show_lines=False)
    for col, just in (("node", "left"), ("type", "left"), ("shape", "left"), ("concrete", "left"),
                      ("params", "right"), ("state", "right")):
        table.add_column(col, justify=just)
    for r in summary_rows(graph):
        table.add_row(r["node"], r["type"], r["shape"], r["concrete"], f"{r['params']:,}" if r["params"] else "",
                      human_bytes(r["state_bytes"]) if r["state_bytes"] else "")
    table.caption = totals(graph)
    return table


def summary_text(graph: Graph) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=False)
    console.print(summary_table(graph))
    return console.file.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, DimVal):
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def graph_json(graph: Graph) -> dict:
    """networkx node-link data with JSON-safe attributes."""
    h = nx.DiGraph()
    for n, d in graph.g.nodes(data=True):
        attrs = {"kind": d.get("kind", "block"), "source": str(d["source"]), "shape": shape_str(d["type"].shape),
                 "dtype": d["type"].dtype}
        if d.get("kind") == "block":
            attrs.update(block_type=d["block_type"], stage=d["stage"],
                         spec=_plain(d["spec"].model_dump(by_alias=True, exclude_none=True)),
                         params={k: list(v) for k, v in d["params"].items()},
                         state={k: {"shape": shape_str(t.shape), "dtype": t.dtype} for k, t in d["state"].items()})
        h.add_node(n, **attrs)
    for u, v, d in graph.g.edges(data=True):
        h.add_edge(u, v, ports=d["ports"], shape=shape_str(d["type"].shape), dtype=d["type"].dtype)
    data = nx.node_link_data(h, edges="edges")
    data["graph"] = {"name": graph.name, "outputs": graph.outputs}
    return data


def _ids(graph: Graph) -> dict[str, str]:
    return {n: f"n{i}" for i, n in enumerate(graph.g.nodes)}


_MERMAID_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ._-:,=+*/()[]{}")


def mermaid_text(text: str) -> str:
    """`text` for inside a quoted Mermaid label: every character but plain ones as an entity code
    (`#34;`), so quotes, `<`, `|`, `#`, backslashes and newlines show as written and break nothing."""
    return "".join(c if c in _MERMAID_SAFE else f"#{ord(c)};" for c in str(text))


def mermaid(graph: Graph) -> str:
    ids = _ids(graph)
    lines = ["flowchart TD"]
    for n, d in graph.g.nodes(data=True):
        kind = d.get("block_type", "input")
        lines.append(f'  {ids[n]}["{mermaid_text(n)}<br/><i>{mermaid_text(kind)}</i>"]')
    for u, v, d in graph.g.edges(data=True):
        lines.append(f'  {ids[u]} -->|"{mermaid_text(shape_str(d["type"].shape))}"| {ids[v]}')
    for i, (name, node) in enumerate(graph.outputs.items()):
        lines.append(f'  out{i}(["{mermaid_text(name)}"])')
        lines.append(f"  {ids[node]} --> out{i}")
    return "\n".join(lines) + "\n"


def dot_string(text: str) -> str:
    """`text` as a Graphviz double-quoted string (an ID or an escString label): backslashes doubled,
    quotes escaped, line breaks as \\n; other control characters (which Graphviz reads badly) as \\xNN
    text, written with a doubled backslash so that distinct names stay distinct."""
    out = []
    for c in str(text):
        if c == "\\":
            out.append("\\\\")
        elif c == '"':
            out.append('\\"')
        elif c == "\n":
            out.append("\\n")
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\\\x{ord(c):02x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def dot(graph: Graph) -> str:
    lines = [f"digraph {dot_string(graph.name)} {{", "  rankdir=TB; node [shape=box, fontname=Helvetica];"]
    for n, d in graph.g.nodes(data=True):
        label = dot_string(f"{n}\n{d.get('block_type', 'input')}")
        lines.append(f"  {dot_string(n)} [label={label}];")
    for u, v, d in graph.g.edges(data=True):
        lines.append(f"  {dot_string(u)} -> {dot_string(v)} [label={dot_string(shape_str(d['type'].shape))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- atomic output
MARKER = ".mad-build"
MARKER_TAG = "mad build output, format 1"
MARKER_TEXT = MARKER_TAG + ("\nThis folder was written by MAD (`mad build -o`, `mad train` or `mad.save`); MAD "
                            "replaces it when asked to write here again.\n")
_TMP_TAG = ".mad-tmp."  # temp names: .<name>.mad-tmp.<pid>.<random>[suffix], beside the output


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_build_dir(path: Path, follow_links: bool = False) -> bool:
    """A folder that `mad build` wrote (it holds the marker). A linked marker counts only with `follow_links`
    (for reading, e.g. the Hugging Face cache, where every file is a link): never when deciding what may be
    replaced."""
    marker = path / MARKER
    try:
        if (marker.is_symlink() and not follow_links) or not marker.is_file():
            return False
        with open(marker, "rb") as f:
            return f.read(len(MARKER_TAG)) == MARKER_TAG.encode()
    except OSError:
        return False


def _tmp_prefix(name: str) -> str:
    return f".{name}{_TMP_TAG}{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or unknown: leave it alone
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove the temp folders and files that a killed MAD process left beside `parent/name`: only MAD's
    own temp names (`.<name>.mad-tmp.<pid>.*`) of processes that no longer run, and of folders only
    those holding the build marker (or nothing)."""
    pattern = re.compile(rf"^\.{re.escape(name)}{re.escape(_TMP_TAG)}(\d+)\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                inner = [p for p in path.iterdir()]
                if not inner or _is_build_dir(path) or (len(inner) == 1 and _is_build_dir(inner[0])):
                    shutil.rmtree(path, ignore_errors=True)
            elif entry.is_file():
                path.unlink()
        except OSError:
            pass


def _out_error(flag: str, out: Path, why: str) -> MadError:
    return MadError(f"{flag} {out}: {why}")


def check_build_target(out: str | Path, flag: str = "-o", checkpoint: bool = False) -> Path:
    """Check that a build may write `out`: it is absent, an empty folder or a folder `mad build` wrote.
    Anything else (a file, a folder of the user's, `.`, a path under a file) is a MadError naming
    `flag`; nothing is touched. A MAD folder holding weights (`mad train`, `mad.save`) is replaced only
    by a checkpoint (`checkpoint=True`), never by a build: trained weights are the user's. Returns `out`."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise _out_error(flag, out, "give a folder name for the build (not '.' or '..')")
    try:
        resolved = out.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as e:
        raise _out_error(flag, out, f"cannot resolve the path: {e}") from None
    if resolved == cwd or resolved in cwd.parents:
        raise _out_error(flag, out, "is the current folder or a folder above it; give a new folder")
    if out.is_symlink():
        raise _out_error(flag, out, "is a symbolic link; give the build folder itself")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise _out_error(flag, out, f"'{parent}' is not a folder")
            break
    if not out.exists():
        return out
    if not out.is_dir():
        raise _out_error(flag, out, "exists and is not a folder; MAD replaces only folders that `mad build` "
                                    "wrote (give another path, or remove it first)")
    try:
        with os.scandir(out) as entries:
            empty = next(entries, None) is None
    except FileNotFoundError:  # gone meanwhile (another build moving it aside)
        return out
    except OSError as e:
        raise _out_error(flag, out, f"cannot read the folder: {e.strerror}") from None
    if not empty and not _is_build_dir(out):
        raise _out_error(flag, out, f"is a folder that `mad build` did not write (no {MARKER} marker in it); "
                                    "MAD replaces only its own build folders: give a new or empty folder, "
                                    "or remove this one first")
    if not empty and not checkpoint and (out / "model.safetensors").exists():
        raise _out_error(flag, out, "is a MAD checkpoint (it holds model.safetensors); a build does not replace "
                                    "weights: give a new or empty folder")
    return out


def write_atomic_dir(out: str | Path, files: dict[str, str], flag: str = "-o") -> None:
    """Write a build's text files into a temp folder beside `out`, then swap it in: never a half-written
    build. The rules for `out` are `write_mad_folder`'s, for a build."""

    def write(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    write_mad_folder(out, write, flag)


def write_mad_folder(out: str | Path, write, flag: str = "-o", checkpoint: bool = False) -> Path:
    """Write a MAD folder: `write(tmp)` fills a temp folder beside `out` (the marker is written first), which
    then replaces `out`.

    `out` may be replaced only if it is absent, an empty folder or a folder MAD wrote (it holds the
    `.mad-build` marker); a folder holding weights only by a checkpoint (`checkpoint=True`). Anything
    else is a MadError naming `flag` and nothing is touched. Concurrent writers into one folder each
    either succeed or fail cleanly; temp folders a killed writer left beside `out` are removed by the
    next one. Where the system can exchange two folders atomically (Linux), a replaced `out` is never
    absent, even for a moment.
    """
    out = check_build_target(out, flag, checkpoint=checkpoint)
    what = "checkpoint" if checkpoint else "build"
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _out_error(flag, out, f"cannot create the folder '{parent}': {e.strerror}") from None
    _clean_stale(parent, out.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name), dir=parent))
    except OSError as e:
        raise _out_error(flag, out, f"cannot write in '{parent}': {e.strerror}") from None
    try:
        (tmp / MARKER).write_text(MARKER_TEXT)
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a MAD folder is like one mkdir makes
        if out.is_dir() and _is_build_dir(out) and _rename_exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
        else:
            _swap_in(tmp, out, flag)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _out_error(flag, out, f"cannot write the {what}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _swap_in(tmp: Path, out: Path, flag: str) -> None:
    """Rename `tmp` onto `out`. An absent or empty `out` is replaced in one rename (which never
    replaces a non-empty folder); a build folder is first moved aside into a temp folder, then
    deleted. Another build may get in between: then try again (its result is a build folder too)."""
    for _ in range(100):
        try:
            os.replace(tmp, out)  # atomic; fails if out is a non-empty folder
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        check_build_target(out, flag)  # still MAD's own (another build may have written it meanwhile)
        if not out.is_dir():
            continue
        old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name), dir=out.parent))
        try:
            os.replace(out, old / out.name)
        except FileNotFoundError:  # another build moved it aside first
            pass
        try:
            os.replace(tmp, out)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise _out_error(flag, out, "other processes keep writing this folder; try again")


def build_files(program: Program) -> dict[str, str]:
    graph = program.graph
    return {
        "resolved.yaml": graph.resolved.to_yaml(),
        "graph.json": json.dumps(graph_json(graph), indent=1),
        "graph.mmd": mermaid(graph),
        "graph.dot": dot(graph),
        "plan.json": json.dumps(program.plan(), indent=1),
        "summary.txt": summary_text(graph),
    }


def check_output_file(path: str | Path, flag: str = "output") -> Path:
    """Check, before any work, that a file can be written at `path`: it is not a folder, no folder
    on the way is a file, and the nearest existing folder is writable. A MadError naming `flag`."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise MadError(f"{flag} {path}: give a file name")
    if path.is_dir():
        raise MadError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise MadError(f"{flag} {path}: exists and is not a regular file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MadError(f"{flag} {path}: '{parent}' is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise MadError(f"{flag} {path}: the folder '{parent}' is not writable")
            break
    return path


def write_atomic_file(path: str | Path, write, suffix: str | None = None, flag: str = "output") -> None:
    """Call `write(tmp_path)` then rename onto `path`: the file is complete or absent, never half-written.

    The temp file lies beside `path` and ends with `suffix` (default: `path`'s own), for writers that
    pick the format by the name (`mx.save_safetensors` appends `.safetensors` to any other name). The
    result has the mode a plain `open()` gives (the umask; or the replaced file's mode).
    """
    path = check_output_file(path, flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MadError(f"{flag} {path}: cannot create the folder '{path.parent}': {e.strerror}") from None
    _clean_stale(path.parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=path.suffix if suffix is None else suffix,
                                   dir=path.parent)
    except OSError as e:
        raise MadError(f"{flag} {path}: cannot write in '{path.parent}': {e.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise MadError(f"{flag} {path}: cannot write the file: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
