// The sLSTM recurrence on MLX's CPU device as one primitive: the whole loop over time of
// kernels/slstm.py (`_loop_fn`), with the same inputs and outputs, in one scheduler task.
//
// Each step is the product R y of every head (a dot product per gate unit, R's rows read once for all
// batch rows) and the cell's elementwise part in `_cell`'s order of operations, a loop the compiler
// vectorises (its transcendentals below are arithmetic). The products' sums run in a fixed order of
// their own (16 partial sums, then a pairwise sum), not the BLAS's. R is block-diagonal, so each head's
// recurrence reads only its own state, and the heads run on threads of their own for a whole sequence.
// The results agree with the pure-MLX loop to float32 rounding (tests/test_native.py).
//
// Built and loaded by kernels/native.py; Python calls `slstm_loop(wx, R, bh, y, c, n, m, threads)`.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

constexpr int LANES = 16;

// sum_j w[j] x[j] over DH values: LANES partial sums (vectorised), then summed pairwise.
inline float dot(const float* w, const float* x, int n) {
  float acc[LANES] = {0};
  int j = 0;
  for (; j + LANES <= n; j += LANES) {
    for (int l = 0; l < LANES; ++l) {
      acc[l] += w[j + l] * x[j + l];
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    acc[l] += w[j] * x[j];
  }
  for (int width = LANES / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc[l] += acc[l + width];
    }
  }
  return acc[0];
}

// float32 transcendentals in arithmetic only (Cephes' polynomials), so that the compiler vectorises the
// cell's loop: MLX's own CPU operators call the C library per value (tanhf, log1pf, fmaf) in its Linux
// build. Within 3 ulp of the exact values on the ranges the cell uses (tests/test_native.py).
#define INLINE inline __attribute__((always_inline))

INLINE float bits_to_float(int32_t i) {
  return std::bit_cast<float>(i);
}

// exp(x) for x <= 0 (the cell's arguments are never positive): 0 below -87.3, where 2^n leaves the normal
// floats (MLX: 0 below -88).
INLINE float exp_nonpositive(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float e = (p * (r * r) + r) + 1.0f;
  e = e * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : e;
}

// log(1 + u) for u in [0, 1]: 2 atanh(s), s = u / (2 + u) in [0, 1/3], its series to s^15.
INLINE float log1p_unit(float u) {
  float s = u / (2.0f + u), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  return 2.0f * s + (2.0f * s) * (p * s2);
}

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)).
INLINE float log_sigmoid(float x) {
  return (x < 0.0f ? x : 0.0f) - log1p_unit(exp_nonpositive(-std::fabs(x)));
}

INLINE float sigmoid(float x) {
  float e = exp_nonpositive(-std::fabs(x)), s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}

// tanh: Cephes' odd polynomial below |x| = 0.625, (1 - e) / (1 + e) with e = exp(-2|x|) above.
INLINE float tanh_(float x) {
  float a = std::fabs(x), z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  float small = (p * z) * x + x;
  float e = exp_nonpositive(-2.0f * a), large = (1.0f - e) / (1.0f + e);
  return a < 0.625f ? small : std::copysign(large, x);
}

// MLX's maximum and minimum: NaN in the first argument propagates.
INLINE float maximum(float a, float b) {
  return std::isnan(a) ? a : (a > b ? a : b);
}
INLINE float minimum(float a, float b) {
  return std::isnan(a) ? a : (a < b ? a : b);
}

// kernels/slstm.py `_cell`, one unit: raw gates W x + R y + b, then the state update, in its order of
// operations.
INLINE void cell(float wi, float wf, float wz, float wo, float ri, float rf, float rz, float ro, float bi,
                 float bf, float bz, float bo, float c, float n, float m, float& y_new, float& c_new,
                 float& n_new, float& m_new) {
  float i_raw = (wi + ri) + bi, f_raw = (wf + rf) + bf, z_raw = (wz + rz) + bz, o_raw = (wo + ro) + bo;
  float lfm = m + log_sigmoid(f_raw);
  bool fresh = n == 0.0f;
  m_new = fresh ? i_raw : maximum(i_raw, lfm);
  bool i_wins = fresh | (i_raw >= lfm);
  float d = lfm - i_raw;
  // exp(i_raw - m_new) and exp(lfm - m_new): one of them is exp(0) = 1, the other exp(-|d|) (the fresh
  // state's f may be exp of a positive d: its min(., 1) is 1).
  float e = exp_nonpositive(-std::fabs(d));
  float f_pos = (fresh & (d > 0.0f)) ? 1.0f : e;
  float i_act = i_wins ? 1.0f : e, f_act = i_wins ? f_pos : 1.0f;
  c_new = f_act * c + i_act * tanh_(z_raw);
  n_new = f_act * n + i_act;
  y_new = (sigmoid(o_raw) * c_new) / n_new;
}

// Inputs: wx (T, 4, NH, B, DH), R (NH, 4 DH, DH), bh (4, NH, 1, DH), y c n m (1, NH, B, DH), all float32
// and row-contiguous. Outputs: Y C N M (T, NH, B, DH) and RY (T, NH, B, 4 DH).
struct Loop {
  const float *wx, *R, *bh, *y0, *c0, *n0, *m0;
  float *Y, *C, *N, *M, *RY;
  int T, NH, B, DH;

  // Heads h0 <= h < h1 over all steps. R is block-diagonal, so a head's recurrence reads only its own
  // state: heads run on separate threads with nothing shared between steps.
  void heads(int h0, int h1) const {
    const size_t S = size_t(NH) * B * DH;  // one step's state
    for (int t = 0; t < T; ++t) {
      const float* y = t ? Y + (t - 1) * S : y0;
      const float* c = t ? C + (t - 1) * S : c0;
      const float* n = t ? N + (t - 1) * S : n0;
      const float* m = t ? M + (t - 1) * S : m0;
      float* ry = RY + size_t(t) * 4 * S;
      const float* w = wx + size_t(t) * 4 * S;
      for (int h = h0; h < h1; ++h) {
        for (int k = 0; k < 4 * DH; ++k) {
          const float* row = R + (size_t(h) * 4 * DH + k) * DH;
          for (int b = 0; b < B; ++b) {
            ry[(size_t(h) * B + b) * 4 * DH + k] = dot(row, y + (size_t(h) * B + b) * DH, DH);
          }
        }
        for (int b = 0; b < B; ++b) {
          const size_t s = (size_t(h) * B + b) * DH;  // this row's offset in a state
          const float* r = ry + s * 4;
#pragma GCC ivdep
          for (int o = 0; o < DH; ++o) {
            const size_t u = s + o, bo = size_t(h) * DH + o;
            cell(w[u], w[S + u], w[2 * S + u], w[3 * S + u], r[o], r[DH + o], r[2 * DH + o], r[3 * DH + o],
                 bh[bo], bh[NH * DH + bo], bh[2 * NH * DH + bo], bh[3 * NH * DH + bo], c[u], n[u], m[u],
                 Y[t * S + u], C[t * S + u], N[t * S + u], M[t * S + u]);
          }
        }
      }
    }
  }

  // Starting a thread costs about as much as a few steps of a head: short sequences (decoding) run on one.
  static constexpr int THREADED_STEPS = 16;

  void run(int threads) const {
    threads = T < THREADED_STEPS ? 1 : std::max(1, std::min(threads, NH));
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) {
      pool.emplace_back([this, i, threads] { heads(NH * i / threads, NH * (i + 1) / threads); });
    }
    heads(0, NH / threads);
    for (auto& th : pool) {
      th.join();
    }
  }
};

class SLSTMLoop : public mx::Primitive {
 public:
  SLSTMLoop(mx::Stream stream, int threads) : mx::Primitive(stream), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& out : outputs) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) {
      encoder.set_input_array(in);
    }
    for (auto& out : outputs) {
      encoder.set_output_array(out);
    }
    const auto& wx = inputs[0];
    int T = wx.shape(0), NH = wx.shape(2), B = wx.shape(3), DH = wx.shape(4);
    Loop loop{inputs[0].data<float>(),  inputs[1].data<float>(),  inputs[2].data<float>(),
              inputs[3].data<float>(),  inputs[4].data<float>(),  inputs[5].data<float>(),
              inputs[6].data<float>(),  outputs[0].data<float>(), outputs[1].data<float>(),
              outputs[2].data<float>(), outputs[3].data<float>(), outputs[4].data<float>(),
              T, NH, B, DH};
    encoder.dispatch([loop, threads = threads_]() { loop.run(threads); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("SLSTMLoop runs on the CPU only");
  }

  const char* name() const override {
    return "SLSTMLoop";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const SLSTMLoop&>(other).threads_;
  }

 private:
  int threads_;
};

std::vector<mx::array> slstm_loop(const mx::array& wx, const mx::array& R, const mx::array& bh,
                                  const mx::array& y, const mx::array& c, const mx::array& n,
                                  const mx::array& m, int threads) {
  if (wx.ndim() != 5 || wx.shape(1) != 4) {
    throw std::invalid_argument("slstm_loop: wx must be (T, 4, NH, B, DH)");
  }
  int T = wx.shape(0), NH = wx.shape(2), B = wx.shape(3), DH = wx.shape(4);
  if (T < 1 || NH < 1 || B < 1 || DH < 1) {
    throw std::invalid_argument("slstm_loop: every dimension of wx must be at least 1");
  }
  if (R.shape() != mx::Shape{NH, 4 * DH, DH} || bh.shape() != mx::Shape{4, NH, 1, DH}) {
    throw std::invalid_argument("slstm_loop: R must be (NH, 4 DH, DH) and bh (4, NH, 1, DH)");
  }
  for (const auto* s : {&y, &c, &n, &m}) {
    if (s->shape() != mx::Shape{1, NH, B, DH}) {
      throw std::invalid_argument("slstm_loop: the state arrays must be (1, NH, B, DH)");
    }
  }
  mx::Shape state{T, NH, B, DH};
  auto stream = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs;
  for (const auto& a : {wx, R, bh, y, c, n, m}) {
    inputs.push_back(mx::contiguous(mx::astype(a, mx::float32, stream), false, stream));
  }
  return mx::array::make_arrays({state, state, state, state, mx::Shape{T, NH, B, 4 * DH}},
                                {mx::float32, mx::float32, mx::float32, mx::float32, mx::float32},
                                std::make_shared<SLSTMLoop>(stream, threads), inputs);
}

// The cell's transcendentals on a list of values, for the tests.
std::vector<float> math(const std::string& name, const std::vector<float>& xs) {
  float (*fn)(float) = nullptr;
  if (name == "exp_nonpositive") fn = [](float x) { return exp_nonpositive(x); };
  if (name == "log1p_unit") fn = [](float x) { return log1p_unit(x); };
  if (name == "log_sigmoid") fn = [](float x) { return log_sigmoid(x); };
  if (name == "sigmoid") fn = [](float x) { return sigmoid(x); };
  if (name == "tanh") fn = [](float x) { return tanh_(x); };
  if (fn == nullptr) {
    throw std::invalid_argument("unknown function " + name);
  }
  std::vector<float> out(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    out[i] = fn(xs[i]);
  }
  return out;
}

}  // namespace

NB_MODULE(_mad_native, module) {
  module.def("slstm_loop", &slstm_loop, nb::arg("wx"), nb::arg("R"), nb::arg("bh"), nb::arg("y"),
             nb::arg("c"), nb::arg("n"), nb::arg("m"), nb::arg("threads"));
  module.def("math", &math, nb::arg("name"), nb::arg("xs"));
}
