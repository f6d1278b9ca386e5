"""How many graph nodes does a GPU decode step have, and how long does the host take to build one? On any
machine, without a GPU.

The decode step is built as on a CUDA GPU: the CUDA variants of MAD's kernels are chosen, and each launch
is replaced by a stand-in that makes outputs of the launch's shapes and dtypes (evaluated zeros, tied to
the launch's inputs by one `mx.depends` node). MLX's `fast.rms_norm` and `fast.layer_norm`, which the CPU
would expand into several nodes, become one view node each (`as_strided`; its Flatten is not counted). So
the graph has one node per kernel launch and per MLX operation, as on the GPU.

Printed: the nodes of one step (kernel launches, MLX's fast norms, the other nodes by primitive; the
launches traced, by kernel name, include those of nodes a fold replaced, which MLX drops), and the host
time of one call of the model (the compiled program's graph rebuilt for new inputs, nothing evaluated):
what `gpu_decode_probe.py` reports as `mad-call`, here on this machine's CPU. Evaluating the graph costs
the host time too, a node at a time; only a GPU run shows that.

Counted as this machine builds them, not replaced: what MLX builds differently per device otherwise (a
quantized embedding's lookup, `mx.dequantize`: about 25 elementwise and view nodes a step here), and MAD's
own CPU branches where no kernel takes a call (a quantized product of more rows than the decode kernel
takes, `--bits` with `--batch` above 8, runs per part in float32 on the CPU).

    python benchmarks/probes/host_graph.py [--topology topologies/xlstm-7b.yaml] [--set dims.D=512 ...]
        [--bits 4] [--batch 1] [--calls 200] [--setting MODULE.NAME=VALUE] [--json PATH]

The weights' shapes do not change the graph, so the default shrinks the 7B shape's widths (`dims.D=512`,
`dims.V=1024`: the same 32 blocks, the same nodes) to build quickly; `--set` overrides them.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

import mad  # before mlx.core: the CPU BLAS
import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py, one level up
from common import add_setting_option, apply_settings  # noqa: E402

LAUNCH, NORM = "Depends", "AsStrided"  # the primitives of the stand-ins for a launch and for a fast norm


class StandIns:
    """Replaces kernel launches and MLX's fast norms by one-node stand-ins, and counts the launches."""

    def __init__(self):
        self.launches: collections.Counter = collections.Counter()
        self._zeros: dict = {}

    def outputs(self, shapes, dtypes, inputs) -> list:
        outs = []
        for shape, dtype in zip(shapes, dtypes):
            key = (tuple(shape), dtype)
            if key not in self._zeros:
                self._zeros[key] = mx.zeros(key[0], dtype)
                mx.eval(self._zeros[key])  # a leaf: no node of its own in the step's graph
            outs.append(self._zeros[key])
        return mx.depends(outs, [a for a in inputs if isinstance(a, mx.array)])

    def make_kernel(self, name, input_names, output_names, source, header, row_contiguous=True):
        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            self.launches[name] += 1
            return self.outputs(output_shapes, output_dtypes, inputs)
        return launch

    def norm(self, x, *args, **kwargs):
        return mx.as_strided(x)  # AsStrided (with a Flatten in front): primitives a decode step has not otherwise


def install(stand_ins: StandIns) -> None:
    """Choose the CUDA variants on this machine, with stand-ins for what only a GPU runs."""
    from mad.backends import cuda
    from mad.kernels import registry

    registry.backend = lambda: "cuda"
    cuda.make_kernel = stand_ins.make_kernel
    mx.fast.rms_norm = stand_ins.norm
    mx.fast.layer_norm = stand_ins.norm


def node_counts(outputs: list) -> collections.Counter:
    """Nodes of the graph that computes `outputs`, by primitive (from MLX's DOT export)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return collections.Counter(re.findall(r'label ="([A-Za-z_]+)', buf.getvalue()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="topologies/xlstm-7b.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=None,
                    help="dims overrides (default dims.D=512 dims.V=1024)")
    ap.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 5, 6, 8),
                    help="quantize the projections and head (affine, group 64)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    add_setting_option(ap)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.batch < 1 or args.calls < 1:
        ap.error("--batch and --calls must be 1 or more")
    settings = apply_settings(args.setting)
    overrides = args.overrides if args.overrides is not None else ["dims.D=512", "dims.V=1024"]

    stand_ins = StandIns()
    install(stand_ins)
    try:
        model, _ = mad.load(args.topology, dtype="bfloat16", overrides=overrides)
    except mad.MadError as e:  # a bad topology or --set: MAD's own message, as `mad` prints it
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    if args.bits:
        from mad.quantize import quantize_model

        quantize_model(model, bits=args.bits, group_size=64)
        mx.eval(model.program.parameters())
    with mad.inference():
        state = model.program.init_state(args.batch)
        token = mx.zeros((args.batch, 1), mx.int32)
        mx.eval(state, token)  # as a decode step's inputs are: no nodes of their own
        stand_ins.launches.clear()
        logits, new_state = model(token, state, check_tokens=False)  # traced here: the launches counted once
        if not stand_ins.launches:
            raise SystemExit("the decode step was traced before the count began")
        nodes = node_counts([logits, *[a for d in new_state.values() for a in d.values()]])
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            model(token, state, check_tokens=False)
            times.append(time.perf_counter() - start)
    launches, norms = nodes.pop(LAUNCH, 0), nodes.pop(NORM, 0)
    nodes["Flatten"] -= norms  # as_strided's own
    nodes = +nodes  # without zero counts
    result = {"topology": args.topology, "overrides": overrides, "bits": args.bits, "batch": args.batch,
              "settings": settings,
              "nodes": sum(nodes.values()) + launches + norms, "kernel launches": launches, "MLX fast norms": norms,
              "other nodes": dict(nodes.most_common()),
              # traced, so with the launches of nodes a fold replaced (dead code MLX drops)
              "launches traced, by kernel": dict(stand_ins.launches.most_common()),
              "call ms (median)": 1e3 * statistics.median(times)}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
