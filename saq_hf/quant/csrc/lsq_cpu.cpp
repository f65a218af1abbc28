// LSQ fake quantization on the CPU: the forward and the backward each one pass over the tensor, one C++ call each.
//
// The same elementwise arithmetic as saq_hf/quant/lsq.py's ``_fake_quantize`` and ``_fake_quantize_grads``, written
// with ATen's vector types (the ones ATen's own eager kernels use), so every element gets the same bits as the
// unfused torch ops: IEEE division, NaN-propagating clamp, round half to even, no fused multiply-add. Built on first
// use by torch.utils.cpp_extension (saq_hf/quant/native.py) for float32 and float64 tensors.
//
// Layouts: per tensor (``step`` has one element), the pass runs over storage order of x contiguous or channels-last;
// per channel (``step`` has ``x.size(0)`` elements), row by row of x contiguous. Tensors in another layout (a
// slice, a transposed view) are copied into that one first.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // elements per task, as ATen's elementwise kernels split their work

// body(row, begin, end) over [0, rows * cols) in flat order, split into tasks that never cross a row.
template <typename F>
void over_rows(int64_t rows, int64_t cols, const F& body) {
  at::parallel_for(0, rows * cols, kGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / cols;
      const int64_t stop = std::min(end, (row + 1) * cols);
      body(row, begin, stop);
      begin = stop;
    }
  });
}

template <typename T>
void forward_range(const T* x, T s, T qn, T qp, T* out, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const V vs(s), vqn(qn), vqp(qp);
  auto one = [&](int64_t i, int64_t count) {
    V v = V::loadu(x + i, count) / vs;
    v = at::vec::clamp(v, vqn, vqp);
    (v.round() * vs).store(out + i, count);
  };
  int64_t i = begin;
  for (; i + V::size() <= end; i += V::size()) one(i, V::size());
  if (i < end) one(i, end - i);
}

// grad_x = g * inside; grad_s (per element, when wanted) = (round(clipped) - scaled * inside) * g.
template <typename T>
void backward_range(const T* g, const T* x, T s, T qn, T qp, T* gx, T* gs, int64_t begin, int64_t end) {
  using V = Vectorized<T>;
  const V vs(s), vqn(qn), vqp(qp);
  auto one = [&](int64_t i, int64_t count) {
    const V vg = V::loadu(g + i, count);
    const V scaled = V::loadu(x + i, count) / vs;
    const V clipped = at::vec::clamp(scaled, vqn, vqp);
    const V inside = clipped.eq(scaled);  // 1 or 0 in T
    (vg * inside).store(gx + i, count);
    if (gs != nullptr) ((clipped.round() - scaled * inside) * vg).store(gs + i, count);
  };
  int64_t i = begin;
  for (; i + V::size() <= end; i += V::size()) one(i, V::size());
  if (i < end) one(i, end - i);
}

// The memory format x's pass runs in: channels-last where x is in it and the step size is per tensor (a
// convolution's input after a permute), else contiguous. Tensors in another layout are copied into it.
at::MemoryFormat format_of(const at::Tensor& x, const at::Tensor& step) {
  TORCH_CHECK(x.device().is_cpu() && step.device().is_cpu(), "saq_hf native LSQ: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == step.scalar_type(), "saq_hf native LSQ: x and step size of different dtypes");
  if (step.numel() != 1) {
    TORCH_CHECK(x.dim() > 0 && step.numel() == x.size(0),
                "saq_hf native LSQ: a per-channel step size needs one step per row (dim 0) of x");
    return at::MemoryFormat::Contiguous;
  }
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

int64_t rows_of(const at::Tensor& x, const at::Tensor& step) {
  return step.numel() == 1 ? 1 : x.size(0);
}

at::Tensor forward(const at::Tensor& input, const at::Tensor& step, int64_t qn, int64_t qp) {
  const at::Tensor x = input.contiguous(format_of(input, step));
  at::Tensor out = at::empty_like(x);
  const at::Tensor steps = step.contiguous();
  const int64_t rows = rows_of(x, step), numel = x.numel();
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saq_hf_lsq_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = steps.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    over_rows(rows, numel / rows, [&](int64_t row, int64_t begin, int64_t end) {
      forward_range<scalar_t>(xp, sp[row], static_cast<scalar_t>(qn), static_cast<scalar_t>(qp), op, begin, end);
    });
  });
  return out;
}

// (grad_x, per-element step-size gradient, or an undefined tensor without ``step_grad``)
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& step,
                                            int64_t qn, int64_t qp, bool step_grad) {
  // The gradient in x's memory format (a copy where it is not: a Linear weight's gradient is a transposed view).
  const at::MemoryFormat format = format_of(input, step);
  const at::Tensor x = input.contiguous(format);
  const at::Tensor g = grad.contiguous(format);
  TORCH_CHECK(g.scalar_type() == x.scalar_type() && g.sizes() == x.sizes(),
              "saq_hf native LSQ: the gradient must have x's dtype and shape");
  at::Tensor gx = at::empty_like(x);
  at::Tensor gs = step_grad ? at::empty_like(x) : at::Tensor();
  const at::Tensor steps = step.contiguous();
  const int64_t rows = rows_of(x, step), numel = x.numel();
  if (numel == 0) return {gx, gs};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "saq_hf_lsq_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sp = steps.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    scalar_t* gsp = step_grad ? gs.mutable_data_ptr<scalar_t>() : nullptr;
    over_rows(rows, numel / rows, [&](int64_t row, int64_t begin, int64_t end) {
      backward_range<scalar_t>(gp, xp, sp[row], static_cast<scalar_t>(qn), static_cast<scalar_t>(qp), gxp, gsp,
                               begin, end);
    });
  });
  return {gx, gs};
}

// The whole single-tensor op, as saq_hf/quant/lsq.py's _LSQFakeQuantize computes it with torch ops (the same ATen
// calls, so the same bits): forward from the step-size parameter (log(s) with ``log_step``), returning the output and
// the step size to save; backward to the gradients w.r.t. x and that parameter.
std::tuple<at::Tensor, at::Tensor> op_forward(const at::Tensor& x, const at::Tensor& param, int64_t qn, int64_t qp,
                                              bool log_step) {
  at::Tensor step = log_step ? param.exp() : param;
  return {forward(x, step, qn, qp), step};
}

std::tuple<at::Tensor, at::Tensor> op_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& step,
                                               int64_t qn, int64_t qp, double grad_scale, bool step_grad,
                                               bool log_step) {
  auto [grad_x, per_element] = backward(grad, x, step, qn, qp, step_grad);
  at::Tensor grad_s;
  if (!step_grad) {
    grad_s = at::zeros_like(step);
  } else {
    at::Tensor sum;
    if (step.dim() == 0) {
      sum = per_element.sum();
    } else {
      std::vector<int64_t> dims;
      for (int64_t d = 0; d < per_element.dim(); ++d)
        if (step.size(d) == 1) dims.push_back(d);
      sum = per_element.sum(dims, /*keepdim=*/true);
    }
    grad_s = (sum * grad_scale).to(step.scalar_type());
  }
  if (log_step) grad_s = grad_s * step;
  return {grad_x, grad_s};
}

// op_forward / op_backward of each tensor of a list (a model's weights: one call for all of them).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> op_forward_many(
    const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& params, const std::vector<int64_t>& qns,
    const std::vector<int64_t>& qps, const std::vector<bool>& log_steps) {
  std::vector<at::Tensor> out, steps;
  out.reserve(xs.size());
  steps.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    auto [q, step] = op_forward(xs[i], params[i], qns[i], qps[i], log_steps[i]);
    out.push_back(q);
    steps.push_back(step);
  }
  return {out, steps};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> op_backward_many(
    const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& steps,
    const std::vector<int64_t>& qns, const std::vector<int64_t>& qps, const std::vector<double>& grad_scales,
    const std::vector<bool>& step_grads, const std::vector<bool>& log_steps) {
  std::vector<at::Tensor> grad_x, grad_s;
  grad_x.reserve(xs.size());
  grad_s.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    auto [gx, gs] = op_backward(grads[i], xs[i], steps[i], qns[i], qps[i], grad_scales[i], step_grads[i],
                                log_steps[i]);
    grad_x.push_back(gx);
    grad_s.push_back(gs);
  }
  return {grad_x, grad_s};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "LSQ fake quantization: round(clamp(x / s, qn, qp)) * s");
  m.def("backward", &backward, "LSQ gradients: x's, and the step size's per element");
  m.def("op_forward", &op_forward, "the op's forward from its step-size parameter: (output, step size)");
  m.def("op_backward", &op_backward, "the op's backward: gradients w.r.t. x and the step-size parameter");
  m.def("op_forward_many", &op_forward_many, "op_forward of each tensor of a list");
  m.def("op_backward_many", &op_backward_many, "op_backward of each tensor of a list");
}
