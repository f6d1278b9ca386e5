"""One decode-sized product of each kind, twice, for Nsight Compute: MAD's 4-bit `quantized_linear` kernel
at three launch settings (features per warp : steps loading while one is computed : warps per block = 4:0:4,
4:1:4, 4:2:4) and MAD's bf16 `linear` kernel, on the q|k|v|o shape of xLSTM-7B (12288 x 4096), one row of bf16.

    ncu -k regex:mad_ --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section MemoryWorkloadAnalysis python benchmarks/probes/gpu_qmv_ncu.py
"""

from __future__ import annotations

import mad  # noqa: F401
import mlx.core as mx

from mad.kernels.linear_device import linear_device
from mad.kernels.qlinear import QuantizedMatrix
from mad.kernels.qlinear_device import quantized_linear_device

N, K = 12288, 4096
SETTINGS = [(4, 0, 4), (4, 1, 4), (4, 2, 4)]


def main() -> None:
    w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
    m = QuantizedMatrix(*mx.quantize(w, 64, 4), 64, 4)
    x = mx.random.normal((1, K)).astype(mx.bfloat16)
    mx.eval(w, m.weight, m.scales, m.biases, x)
    for features, ahead, warps in SETTINGS:
        for _ in range(2):
            mx.eval(quantized_linear_device(x, m, features=features, steps_ahead=ahead, warps=warps)[0])
    for _ in range(2):
        mx.eval(linear_device(x, w)[0])


if __name__ == "__main__":
    main()
