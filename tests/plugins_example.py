"""An example plugin: a user's own block type, registered the documented way.

Use it from a topology with `plugins: [plugins_example]` (the module must be importable, e.g. next to the
topology file), which is imported only when the caller trusts the file (`--trust-plugins`,
`load_topology(..., trust_plugins=True)`), or import it before building. Its node is `{type: scaled_tanh, scale: 2.0}`; its weight is `<node>.weight` [D].
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

import mad


class ScaledTanhModule(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self._scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        return self.weight * mx.tanh(self._scale * x)


@mad.register("scaled_tanh")
class ScaledTanh(mad.Block):
    """weight * tanh(scale * x) over the last dim: (..., D) -> (..., D)."""

    scale: float = 1.0
    dim: mad.OptDim = None  # checked against the input when given

    def infer(self, x: mad.TensorType) -> mad.TensorType:
        if x.dtype == "int32":
            raise mad.ShapeError(f"scaled_tanh needs a float input, got {x}")
        if self.dim is not None and (not x.shape or x.shape[-1] != self.dim):
            raise mad.ShapeError(f"scaled_tanh: expected last dim {int(self.dim)}, got {x}")
        return x

    def build(self, x: mad.TensorType) -> nn.Module:
        return ScaledTanhModule(int(x.shape[-1]), self.scale)


@mad.register("running_sum")
class RunningSum(mad.Block):
    """A recurrent example: y_t = s_0 + x_1 + ... + x_t; its state `s` (B, D) float32 is the running sum.

    A recurrent block declares its state with `state()` and its function takes `state=` and `mode=`
    and returns `(y, new_state)`.
    """

    def infer(self, x: mad.TensorType) -> mad.TensorType:
        if x.dtype == "int32":
            raise mad.ShapeError(f"running_sum needs a float input, got {x}")
        return x

    def state(self, x: mad.TensorType) -> dict[str, mad.TensorType]:
        return {"s": mad.TensorType((x.shape[0], x.shape[-1]), "float32")}

    def build(self, x: mad.TensorType):
        def run(x, state=None, mode="auto"):
            y = mx.cumsum(x.astype(mx.float32), axis=1)
            if state is not None:
                y = y + state["s"][:, None, :]
            return y.astype(x.dtype), {"s": y[:, -1, :]}

        return run
