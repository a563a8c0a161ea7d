// CPU kernels of the Keras optimizers' update steps: each one pass over memory, in place.
//
// Compiled on first use by hvd_largebatch/tf/fused_kernels.py (tf.load_op_library) and cached;
// that module's docstring says why they exist and which rule each implements. Four ops, each over
// the list of all N tensors of a step (one dispatch per step, not per tensor):
//
//   HvdLargebatchTensorStats   per tensor: sum(g), sum(g*g), sum(w*w)        reads g, w
//   HvdLargebatchApplyMomentum d = g + beta_l*w; m = s*m - r_l*d; w += m      reads g, m, w; writes m, w
//                              (Nesterov: w += mu*m - r_l*d)
//   HvdLargebatchLambStats     per tensor: sum(g), sum(w*w), sum(q*q) with q the LAMB direction over
//                              the moments this step would write             reads g, mu, nu, w
//   HvdLargebatchLambApply     mu, nu as LAMB; w -= a_l*q                    reads g, mu, nu, w; writes mu, nu, w
//
// Reproducibility: sums are taken over fixed blocks of kBlock elements with kLanes partial sums
// each, added in block order, and the file is compiled with -ffp-contract=off, so the results do
// not depend on the number of threads nor on the vector width the compiler picks.
//
// Speed: one core reads memory faster from four streams at once than from one or two, so
// HvdLargebatchTensorStats reads the first half of its blocks in lockstep with the second half
// (each block summed exactly as on its own); the other ops read four or more streams already.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/training_op_helpers.h"

namespace hvd_largebatch {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::Var;
using ::tensorflow::core::RefCountPtr;
using CPUDevice = Eigen::ThreadPoolDevice;

constexpr int64_t kBlock = 8192;  // elements per parallel work item (a multiple of kLanes)
constexpr int kLanes = 16;        // partial sums per block

int64_t NumBlocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Runs fn(begin_block, end_block) over the blocks of n elements on the op's thread pool.
template <typename Fn>
void ForBlocks(OpKernelContext* ctx, int64_t n, double bytes_per_element, Fn fn) {
  const Eigen::TensorOpCost cost(bytes_per_element * kBlock, 0, 4.0 * kBlock);
  ctx->eigen_device<CPUDevice>().parallelFor(NumBlocks(n), cost, [&fn](Eigen::Index b, Eigen::Index e) { fn(b, e); });
}

// The loops. Plain functions of __restrict__ pointers and scalars taken by value, so that the
// compiler vectorises them. Sums are kept in kLanes independent partial sums, held in GCC vector
// types of 32 bytes (one AVX register, or two SSE ones): the order of additions is fixed.

template <typename T>
struct Lanes {
  typedef T Vec __attribute__((vector_size(32)));
  typedef T UnalignedVec __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
  static constexpr int kWidth = 32 / sizeof(T);
  static constexpr int kVecs = kLanes / kWidth;
  Vec acc[kVecs] = {};

  static Vec Load(const T* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
  // Adds kLanes consecutive values (one row of the block) lane by lane.
  void AddRow(const Vec* row) {
    for (int k = 0; k < kVecs; ++k) acc[k] += row[k];
  }
  void AddOne(int lane, T value) { acc[lane / kWidth][lane % kWidth] += value; }
  double Total() const {
    double total = 0;
    for (int k = 0; k < kVecs; ++k)
      for (int l = 0; l < kWidth; ++l) total += static_cast<double>(acc[k][l]);
    return total;
  }
};

// sum(g), sum(g*g) and, if w, sum(w*w) over [lo, hi).
template <typename T>
void TensorStatsLoop(const T* __restrict__ g, const T* __restrict__ w, int64_t lo, int64_t hi, double* out) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  L sum_g, sq_g, sq_w;
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    Vec gv[L::kVecs], g2[L::kVecs];
    for (int k = 0; k < L::kVecs; ++k) {
      gv[k] = L::Load(g + j + k * L::kWidth);
      g2[k] = gv[k] * gv[k];
    }
    sum_g.AddRow(gv);
    sq_g.AddRow(g2);
    if (w) {
      Vec w2[L::kVecs];
      for (int k = 0; k < L::kVecs; ++k) {
        const Vec wv = L::Load(w + j + k * L::kWidth);
        w2[k] = wv * wv;
      }
      sq_w.AddRow(w2);
    }
  }
  for (int l = 0; j < hi; ++j, ++l) {
    sum_g.AddOne(l, g[j]);
    sq_g.AddOne(l, g[j] * g[j]);
    if (w) sq_w.AddOne(l, w[j] * w[j]);
  }
  out[0] = sum_g.Total();
  out[1] = sq_g.Total();
  out[2] = sq_w.Total();
}

// The same sums over two full blocks at once, starting at lo_a and lo_b: each block's sums are
// those TensorStatsLoop gives it (same lanes, same order), but one core reads twice as many
// streams at a time. A read-only pass over one or two streams runs well below the memory's
// bandwidth on one core; four streams come close to it.
template <typename T, bool kWeights>
void TensorStatsPairLoop(const T* __restrict__ g, const T* __restrict__ w, int64_t lo_a, int64_t lo_b, double* out_a,
                         double* out_b) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  L sum_g[2], sq_g[2], sq_w[2];
  const int64_t lo[2] = {lo_a, lo_b};
  for (int64_t j = 0; j < kBlock; j += kLanes) {
    for (int s = 0; s < 2; ++s) {
      Vec gv[L::kVecs], g2[L::kVecs];
      for (int k = 0; k < L::kVecs; ++k) {
        gv[k] = L::Load(g + lo[s] + j + k * L::kWidth);
        g2[k] = gv[k] * gv[k];
      }
      sum_g[s].AddRow(gv);
      sq_g[s].AddRow(g2);
      if (kWeights) {
        Vec w2[L::kVecs];
        for (int k = 0; k < L::kVecs; ++k) {
          const Vec wv = L::Load(w + lo[s] + j + k * L::kWidth);
          w2[k] = wv * wv;
        }
        sq_w[s].AddRow(w2);
      }
    }
  }
  double* out[2] = {out_a, out_b};
  for (int s = 0; s < 2; ++s) {
    out[s][0] = sum_g[s].Total();
    out[s][1] = sq_g[s].Total();
    out[s][2] = sq_w[s].Total();
  }
}

// d = g + beta*w (kDecay); m = scale*m - rate*d; w += m (Nesterov: w += momentum*m - rate*d).
template <typename T, bool kDecay, bool kNesterov>
void MomentumLoop(T* __restrict__ w, T* __restrict__ m, const T* __restrict__ g, int64_t lo, int64_t hi, T rate,
                  T beta, T scale, T momentum) {
  for (int64_t j = lo; j < hi; ++j) {
    const T d = kDecay ? g[j] + beta * w[j] : g[j];
    const T new_m = scale * m[j] - rate * d;
    m[j] = new_m;
    w[j] += kNesterov ? momentum * new_m - rate * d : new_m;
  }
}

// LAMB's new moments and its direction q = mu/(sqrt(nu) + e) (+ decay*w), the same in both ops.
template <typename T>
struct LambRule {
  T beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, scaled_eps;

  LambRule(T b1, T b2, T eps)
      : beta_1(b1), one_minus_beta_1(T(1) - b1), beta_2(b2), one_minus_beta_2(T(1) - b2), scaled_eps(eps) {}
};

template <typename T>
inline T LambFirst(const LambRule<T>& r, T mu, T g) { return r.beta_1 * mu + r.one_minus_beta_1 * g; }
template <typename T>
inline T LambSecond(const LambRule<T>& r, T nu, T g) { return r.beta_2 * nu + r.one_minus_beta_2 * (g * g); }
template <typename T, bool kDecay>
inline T LambDirection(const LambRule<T>& r, T mu, T nu, T w, T decay) {
  const T q = mu / (std::sqrt(nu) + r.scaled_eps);
  return kDecay ? q + decay * w : q;
}

// sum(g), sum(w*w), sum(q*q) over [lo, hi), q from the moments this step would write.
template <typename T, bool kDecay>
void LambStatsLoop(const T* __restrict__ g, const T* __restrict__ mu, const T* __restrict__ nu,
                   const T* __restrict__ w, int64_t lo, int64_t hi, const LambRule<T> rule, T decay, double* out) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  L sum_g, sq_w, sq_q;
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    T q[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = j + l;
      q[l] = LambDirection<T, kDecay>(rule, LambFirst(rule, mu[i], g[i]), LambSecond(rule, nu[i], g[i]), w[i], decay);
    }
    Vec gv[L::kVecs], w2[L::kVecs], q2[L::kVecs];
    for (int k = 0; k < L::kVecs; ++k) {
      gv[k] = L::Load(g + j + k * L::kWidth);
      const Vec wv = L::Load(w + j + k * L::kWidth), qv = L::Load(q + k * L::kWidth);
      w2[k] = wv * wv;
      q2[k] = qv * qv;
    }
    sum_g.AddRow(gv);
    sq_w.AddRow(w2);
    sq_q.AddRow(q2);
  }
  for (int l = 0; j < hi; ++j, ++l) {
    const T q = LambDirection<T, kDecay>(rule, LambFirst(rule, mu[j], g[j]), LambSecond(rule, nu[j], g[j]), w[j],
                                         decay);
    sum_g.AddOne(l, g[j]);
    sq_w.AddOne(l, w[j] * w[j]);
    sq_q.AddOne(l, q * q);
  }
  out[0] = sum_g.Total();
  out[1] = sq_w.Total();
  out[2] = sq_q.Total();
}

// mu, nu as LAMB; w -= step * q.
template <typename T, bool kDecay>
void LambApplyLoop(T* __restrict__ w, T* __restrict__ mu, T* __restrict__ nu, const T* __restrict__ g, int64_t lo,
                   int64_t hi, const LambRule<T> rule, T decay, T step) {
  for (int64_t j = lo; j < hi; ++j) {
    const T new_mu = LambFirst(rule, mu[j], g[j]), new_nu = LambSecond(rule, nu[j], g[j]);
    mu[j] = new_mu;
    nu[j] = new_nu;
    w[j] -= step * LambDirection<T, kDecay>(rule, new_mu, new_nu, w[j], decay);
  }
}

// The pair argument of SumOverBlocks for loops that take one block at a time.
struct NoPair {
  void operator()(int64_t, int64_t, double*, double*) const {}
};

// Per-block sums of three quantities over n elements (blocks in parallel), added in block order.
// loop(lo, hi, out) writes the three sums of [lo, hi) into out; pair(lo_a, lo_b, out_a, out_b), if
// given, the sums of the two full blocks starting at lo_a and lo_b, the same values loop would give.
// A range of blocks is taken as its first half in lockstep with its second half.
template <typename T, typename Loop, typename Pair>
void SumOverBlocks(OpKernelContext* ctx, int64_t n, double bytes_per_element, const Loop& loop, const Pair* pair,
                   T* out) {
  const int64_t full_blocks = n / kBlock;
  std::vector<double> partial(3 * NumBlocks(n), 0.0);
  ForBlocks(ctx, n, bytes_per_element, [&](int64_t begin, int64_t end) {
    int64_t b = begin;
    if (pair != nullptr) {
      const int64_t half = (std::min(end, full_blocks) - begin) / 2;
      for (; b < begin + half; ++b) {
        (*pair)(b * kBlock, (b + half) * kBlock, &partial[3 * b], &partial[3 * (b + half)]);
      }
      b += half;
    }
    for (; b < end; ++b) loop(b * kBlock, std::min(n, (b + 1) * kBlock), &partial[3 * b]);
  });
  for (int k = 0; k < 3; ++k) {
    double total = 0;
    for (int64_t b = 0; b < NumBlocks(n); ++b) total += partial[3 * b + k];
    out[k] = static_cast<T>(total);
  }
}

// Locks the variables' mutexes in address order (as TensorFlow's training ops do, so that no two
// ops wait on each other), exclusively or shared, until destroyed.
template <typename Lock>
class OrderedLocks {
 public:
  explicit OrderedLocks(std::vector<Var*> vars) {
    std::vector<::tsl::mutex*> mutexes;
    for (Var* var : vars) mutexes.push_back(var->mu());
    std::sort(mutexes.begin(), mutexes.end());
    mutexes.erase(std::unique(mutexes.begin(), mutexes.end()), mutexes.end());
    for (::tsl::mutex* mu : mutexes) locks_.push_back(std::make_unique<Lock>(*mu));
  }

 private:
  std::vector<std::unique_ptr<Lock>> locks_;
};

// The variable behind a resource handle (locked by the caller).
absl::Status LookupVar(OpKernelContext* ctx, const Tensor& handle, RefCountPtr<Var>* var) {
  return ::tensorflow::LookupResource(ctx, handle.scalar<::tensorflow::ResourceHandle>()(), var);
}

// The tensor of `var` ready to be written in place (copied first only if a reader still holds it).
template <typename T>
absl::Status WritableTensor(OpKernelContext* ctx, Var* var, const TensorShape& shape, T** data) {
  TF_RETURN_IF_ERROR(
      ::tensorflow::PrepareToUpdateVariable<CPUDevice, T>(ctx, var->tensor(), var->copy_on_read_mode.load()));
  if (var->tensor()->shape() != shape) {
    return absl::InvalidArgumentError("variable shape " + var->tensor()->shape().DebugString() +
                                      " differs from its gradient's " + shape.DebugString());
  }
  *data = var->tensor()->template flat<T>().data();
  return absl::OkStatus();
}

template <typename T>
absl::Status ReadableTensor(Var* var, const TensorShape& shape, const T** data) {
  if (var->tensor()->shape() != shape) {
    return absl::InvalidArgumentError("variable shape " + var->tensor()->shape().DebugString() +
                                      " differs from its gradient's " + shape.DebugString());
  }
  *data = var->tensor()->template flat<T>().data();
  return absl::OkStatus();
}

template <typename T>
T ScalarInput(OpKernelContext* ctx, int index) {
  return ctx->input(index).scalar<T>()();
}

// ---------------------------------------------------------------------------------------------
// HvdLargebatchTensorStats: inputs grads (N * T), weights (M * resource, M = N or 0).
template <typename T>
class TensorStatsOp : public OpKernel {
 public:
  explicit TensorStatsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OpInputList grads, weights;
    OP_REQUIRES_OK(ctx, ctx->input_list("grads", &grads));
    OP_REQUIRES_OK(ctx, ctx->input_list("weights", &weights));
    const int n = grads.size();
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, 3}), &out));
    auto stats = out->matrix<T>();
    for (int i = 0; i < n; ++i) {
      const T* g = grads[i].flat<T>().data();
      const int64_t size = grads[i].NumElements();
      RefCountPtr<Var> var;
      const T* w = nullptr;
      std::unique_ptr<OrderedLocks<::tsl::tf_shared_lock>> lock;
      if (weights.size() > 0) {
        OP_REQUIRES_OK(ctx, LookupVar(ctx, weights[i], &var));
        lock = std::make_unique<OrderedLocks<::tsl::tf_shared_lock>>(std::vector<Var*>{var.get()});
        OP_REQUIRES_OK(ctx, ReadableTensor<T>(var.get(), grads[i].shape(), &w));
      }
      T result[3];
      const auto loop = [g, w](int64_t lo, int64_t hi, double* out) { TensorStatsLoop<T>(g, w, lo, hi, out); };
      if (w) {
        const auto pair = [g, w](int64_t a, int64_t b, double* out_a, double* out_b) {
          TensorStatsPairLoop<T, true>(g, w, a, b, out_a, out_b);
        };
        SumOverBlocks<T>(ctx, size, 2 * sizeof(T), loop, &pair, result);
      } else {
        const auto pair = [g](int64_t a, int64_t b, double* out_a, double* out_b) {
          TensorStatsPairLoop<T, false>(g, nullptr, a, b, out_a, out_b);
        };
        SumOverBlocks<T>(ctx, size, sizeof(T), loop, &pair, result);
      }
      for (int k = 0; k < 3; ++k) stats(i, k) = result[k];
    }
  }
};

// ---------------------------------------------------------------------------------------------
// HvdLargebatchApplyMomentum: inputs var, accum (N * resource), grad (N * T), rate (N), weight_decay
// (N; 0 where decay does not apply), velocity_scale, momentum (scalars); attr nesterov.
template <typename T>
class ApplyMomentumOp : public OpKernel {
 public:
  explicit ApplyMomentumOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
  }

  void Compute(OpKernelContext* ctx) override {
    OpInputList vars, accums, grads;
    OP_REQUIRES_OK(ctx, ctx->input_list("var", &vars));
    OP_REQUIRES_OK(ctx, ctx->input_list("accum", &accums));
    OP_REQUIRES_OK(ctx, ctx->input_list("grad", &grads));
    const int n = grads.size();
    const auto rates = ctx->input(3 * n).flat<T>();
    const auto decays = ctx->input(3 * n + 1).flat<T>();
    const T scale = ScalarInput<T>(ctx, 3 * n + 2);
    const T momentum = ScalarInput<T>(ctx, 3 * n + 3);
    OP_REQUIRES(ctx, rates.size() == n && decays.size() == n,
                absl::InvalidArgumentError("rate and weight_decay must have one entry per tensor"));
    for (int i = 0; i < n; ++i) {
      RefCountPtr<Var> var, accum;
      OP_REQUIRES_OK(ctx, LookupVar(ctx, vars[i], &var));
      OP_REQUIRES_OK(ctx, LookupVar(ctx, accums[i], &accum));
      OrderedLocks<::tsl::mutex_lock> lock({var.get(), accum.get()});
      T *w = nullptr, *m = nullptr;
      OP_REQUIRES_OK(ctx, WritableTensor<T>(ctx, var.get(), grads[i].shape(), &w));
      OP_REQUIRES_OK(ctx, WritableTensor<T>(ctx, accum.get(), grads[i].shape(), &m));
      const T* g = grads[i].flat<T>().data();
      const T rate = rates(i), beta = decays(i);
      const bool nesterov = nesterov_, decay = beta != T(0);
      const int64_t size = grads[i].NumElements();
      ForBlocks(ctx, size, 5 * sizeof(T), [=](int64_t begin, int64_t end) {
        const int64_t lo = begin * kBlock, hi = std::min(size, end * kBlock);
        if (nesterov) {
          decay ? MomentumLoop<T, true, true>(w, m, g, lo, hi, rate, beta, scale, momentum)
                : MomentumLoop<T, false, true>(w, m, g, lo, hi, rate, beta, scale, momentum);
        } else {
          decay ? MomentumLoop<T, true, false>(w, m, g, lo, hi, rate, beta, scale, momentum)
                : MomentumLoop<T, false, false>(w, m, g, lo, hi, rate, beta, scale, momentum);
        }
      });
    }
  }

 private:
  bool nesterov_;
};

template <typename T>
LambRule<T> LambRuleFromInputs(OpKernelContext* ctx, int first_scalar) {
  return LambRule<T>(ScalarInput<T>(ctx, first_scalar), ScalarInput<T>(ctx, first_scalar + 1),
                     ScalarInput<T>(ctx, first_scalar + 2));
}

// HvdLargebatchLambStats: inputs grads (N * T), first, second, weights (N * resource), beta_1, beta_2,
// scaled_eps (scalars), decay_over_scale (N; 0 where decay does not apply). Writes nothing.
template <typename T>
class LambStatsOp : public OpKernel {
 public:
  explicit LambStatsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OpInputList grads, firsts, seconds, weights;
    OP_REQUIRES_OK(ctx, ctx->input_list("grads", &grads));
    OP_REQUIRES_OK(ctx, ctx->input_list("first", &firsts));
    OP_REQUIRES_OK(ctx, ctx->input_list("second", &seconds));
    OP_REQUIRES_OK(ctx, ctx->input_list("weights", &weights));
    const int n = grads.size();
    const LambRule<T> rule = LambRuleFromInputs<T>(ctx, 4 * n);
    const auto decays = ctx->input(4 * n + 3).flat<T>();
    OP_REQUIRES(ctx, decays.size() == n,
                absl::InvalidArgumentError("decay_over_scale must have one entry per tensor"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, 3}), &out));
    auto stats = out->matrix<T>();
    for (int i = 0; i < n; ++i) {
      RefCountPtr<Var> first, second, var;
      OP_REQUIRES_OK(ctx, LookupVar(ctx, firsts[i], &first));
      OP_REQUIRES_OK(ctx, LookupVar(ctx, seconds[i], &second));
      OP_REQUIRES_OK(ctx, LookupVar(ctx, weights[i], &var));
      OrderedLocks<::tsl::tf_shared_lock> lock({first.get(), second.get(), var.get()});
      const T *mu = nullptr, *nu = nullptr, *w = nullptr;
      const TensorShape& shape = grads[i].shape();
      OP_REQUIRES_OK(ctx, ReadableTensor<T>(first.get(), shape, &mu));
      OP_REQUIRES_OK(ctx, ReadableTensor<T>(second.get(), shape, &nu));
      OP_REQUIRES_OK(ctx, ReadableTensor<T>(var.get(), shape, &w));
      const T* g = grads[i].flat<T>().data();
      const T decay = decays(i);
      const int64_t size = grads[i].NumElements();
      T result[3];
      const auto loop = [=](int64_t lo, int64_t hi, double* out) {
        decay != T(0) ? LambStatsLoop<T, true>(g, mu, nu, w, lo, hi, rule, decay, out)
                      : LambStatsLoop<T, false>(g, mu, nu, w, lo, hi, rule, decay, out);
      };
      // Four streams already: no pairing (eight measured no faster).
      SumOverBlocks<T>(ctx, size, 4 * sizeof(T), loop, static_cast<const NoPair*>(nullptr), result);
      for (int k = 0; k < 3; ++k) stats(i, k) = result[k];
    }
  }
};

// HvdLargebatchLambApply: inputs var, first, second (N * resource), grad (N * T), beta_1, beta_2,
// scaled_eps (scalars), decay_over_scale (N), step_size (N).
template <typename T>
class LambApplyOp : public OpKernel {
 public:
  explicit LambApplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OpInputList vars, firsts, seconds, grads;
    OP_REQUIRES_OK(ctx, ctx->input_list("var", &vars));
    OP_REQUIRES_OK(ctx, ctx->input_list("first", &firsts));
    OP_REQUIRES_OK(ctx, ctx->input_list("second", &seconds));
    OP_REQUIRES_OK(ctx, ctx->input_list("grad", &grads));
    const int n = grads.size();
    const LambRule<T> rule = LambRuleFromInputs<T>(ctx, 4 * n);
    const auto decays = ctx->input(4 * n + 3).flat<T>();
    const auto steps = ctx->input(4 * n + 4).flat<T>();
    OP_REQUIRES(ctx, decays.size() == n && steps.size() == n,
                absl::InvalidArgumentError("decay_over_scale and step_size must have one entry per tensor"));
    for (int i = 0; i < n; ++i) {
      RefCountPtr<Var> var, first, second;
      OP_REQUIRES_OK(ctx, LookupVar(ctx, vars[i], &var));
      OP_REQUIRES_OK(ctx, LookupVar(ctx, firsts[i], &first));
      OP_REQUIRES_OK(ctx, LookupVar(ctx, seconds[i], &second));
      OrderedLocks<::tsl::mutex_lock> lock({var.get(), first.get(), second.get()});
      T *w = nullptr, *mu = nullptr, *nu = nullptr;
      const TensorShape& shape = grads[i].shape();
      OP_REQUIRES_OK(ctx, WritableTensor<T>(ctx, var.get(), shape, &w));
      OP_REQUIRES_OK(ctx, WritableTensor<T>(ctx, first.get(), shape, &mu));
      OP_REQUIRES_OK(ctx, WritableTensor<T>(ctx, second.get(), shape, &nu));
      const T* g = grads[i].flat<T>().data();
      const T decay = decays(i), step = steps(i);
      const int64_t size = grads[i].NumElements();
      ForBlocks(ctx, size, 7 * sizeof(T), [=](int64_t begin, int64_t end) {
        const int64_t lo = begin * kBlock, hi = std::min(size, end * kBlock);
        decay != T(0) ? LambApplyLoop<T, true>(w, mu, nu, g, lo, hi, rule, decay, step)
                      : LambApplyLoop<T, false>(w, mu, nu, g, lo, hi, rule, decay, step);
      });
    }
  }
};

}  // namespace
}  // namespace hvd_largebatch

namespace tensorflow {

REGISTER_OP("HvdLargebatchTensorStats")
    .Input("grads: N * T")
    .Input("weights: M * resource")
    .Output("stats: T")
    .Attr("T: {float, double}")
    .Attr("N: int >= 1")
    .Attr("M: int >= 0")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int n;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      c->set_output(0, c->Matrix(n, 3));
      return absl::OkStatus();
    });

REGISTER_OP("HvdLargebatchApplyMomentum")
    .Input("var: N * resource")
    .Input("accum: N * resource")
    .Input("grad: N * T")
    .Input("rate: T")
    .Input("weight_decay: T")
    .Input("velocity_scale: T")
    .Input("momentum: T")
    .Attr("T: {float, double}")
    .Attr("N: int >= 1")
    .Attr("nesterov: bool")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext*) { return absl::OkStatus(); });

REGISTER_OP("HvdLargebatchLambStats")
    .Input("grads: N * T")
    .Input("first: N * resource")
    .Input("second: N * resource")
    .Input("weights: N * resource")
    .Input("beta_1: T")
    .Input("beta_2: T")
    .Input("scaled_eps: T")
    .Input("decay_over_scale: T")
    .Output("stats: T")
    .Attr("T: {float, double}")
    .Attr("N: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int n;
      TF_RETURN_IF_ERROR(c->GetAttr("N", &n));
      c->set_output(0, c->Matrix(n, 3));
      return absl::OkStatus();
    });

REGISTER_OP("HvdLargebatchLambApply")
    .Input("var: N * resource")
    .Input("first: N * resource")
    .Input("second: N * resource")
    .Input("grad: N * T")
    .Input("beta_1: T")
    .Input("beta_2: T")
    .Input("scaled_eps: T")
    .Input("decay_over_scale: T")
    .Input("step_size: T")
    .Attr("T: {float, double}")
    .Attr("N: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext*) { return absl::OkStatus(); });

#define HVD_LARGEBATCH_REGISTER(T)                                                                              \
  REGISTER_KERNEL_BUILDER(                                                                                      \
      Name("HvdLargebatchTensorStats").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),                 \
      hvd_largebatch::TensorStatsOp<T>);                                                                                        \
  REGISTER_KERNEL_BUILDER(                                                                                      \
      Name("HvdLargebatchApplyMomentum").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),               \
      hvd_largebatch::ApplyMomentumOp<T>);                                                                                      \
  REGISTER_KERNEL_BUILDER(Name("HvdLargebatchLambStats").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
                          hvd_largebatch::LambStatsOp<T>);                                                                      \
  REGISTER_KERNEL_BUILDER(Name("HvdLargebatchLambApply").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
                          hvd_largebatch::LambApplyOp<T>);

HVD_LARGEBATCH_REGISTER(float)
HVD_LARGEBATCH_REGISTER(double)

}  // namespace tensorflow
