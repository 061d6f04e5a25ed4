// The native CPU engine of wmss: the fused mixed-logit cross-entropy, its gradients and one
// model's logit statistics, block by block, without the [tokens, vocab] logits.
//
// The algorithm is wmss/loss/engines/torch_engine.py's (docs/design.md section 2): the vocabulary
// is cut into `vocab_block` columns (outer loop, so each weight block is converted once) and the
// tokens into `token_block` rows. For each block the library's BLAS (ATen's matrix product: MKL
// here) writes the raw logits a = h W^T; then ONE pass per row adds the bias, applies the
// soft-cap, forms the mixture and folds all three distributions into their online (m, s, t)
// statistics -- or, in the backward, turns the recomputed logits into the logit gradients in
// place (softmax, one-hot, gap-masking term, cap slope), which two more products turn into dh and
// dW.
//
// Threads: OpenMP (at::parallel_for) shares out the token blocks of each vocabulary block, each
// thread running its blocks' products (single-threaded BLAS inside the parallel region) and row
// passes. One parallel region per vocabulary block, not per operation: on a busy machine a
// descheduled thread then stalls the others once per vocabulary block, not at every product and
// pass (measured on 2 shared cores: fine-grained threading was 3x slower than this). The
// backward's dW and db for a vocabulary block are summed per thread and the threads' partial
// sums added in thread order: deterministic for a given thread count.
//
// Precision: logits, statistics and accumulators are float32, or float64 when either model is
// float64 (both models then in float64), as on the torch engine. The logits of a bf16 model come
// from csrc/bf16_gemm.h where the CPU has AVX512-BF16 (bf16 operands, float32 accumulation;
// ATen offers no such product at bf16 speed); other half-precision operands are converted to
// the compute dtype block by block (a [token_block, d] or [vocab_block, d] copy).
//
// Memory besides the inputs, the O(N) statistics and the gradients: per thread two
// [token_block, vocab_block] blocks in the compute dtype and, in the backward, a
// [vocab_block, d] weight-gradient partial sum per trained model; one converted weight block per
// model (for the bf16 kernel a packed one, and in the backward a converted one too when the
// hidden-state gradient is requested).
//
// A training step's forward (::mixed_forward_grads, "forward with the gradients" below) instead
// chunks the tokens and keeps a chunk's logits over the whole vocabulary, so that it can form the
// gradients at once: 6 products per step instead of 8.
//
// Registered as the torch custom ops wmss_native::mixed_forward, ::mixed_forward_grads,
// ::mixed_backward and ::single_stats (and, for tests, ::bf16_logits and
// ::bf16_kernel_available); their fake (meta) implementations are in
// wmss/loss/engines/native_engine.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "elementwise.h"

namespace wmss_native {

using at::Tensor;

// Token blocks per task of the OpenMP loop: each is a few matrix products' worth of work.
constexpr int64_t BLOCK_GRAIN = 1;

// at::parallel_for over token blocks with the caller's thread-local state (grad mode, the
// dispatcher's excluded keys) in every worker: ATen ops run there, and worker threads do not
// inherit it.
template <typename F>
void for_token_blocks(int64_t num_tokens, int64_t token_block, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, (num_tokens + token_block - 1) / token_block, BLOCK_GRAIN,
                   [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard guard(state);
    f(first, last);
  });
}

// One scratch tensor per thread that at::parallel_for may run (indexed by at::get_thread_num()).
std::vector<Tensor> per_thread(at::IntArrayRef shape, const at::TensorOptions& options) {
  std::vector<Tensor> buffers;
  for (int i = 0; i < at::get_num_threads(); ++i) buffers.push_back(at::empty(shape, options));
  return buffers;
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

at::ScalarType compute_type(const Tensor& a, const Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                             : at::kFloat;
}

// Whether bf16 models' logits go through csrc/bf16_gemm.h: built for this CPU (AVX512-BF16) and
// not turned off by WMSS_NATIVE_BF16=0 (read at every call; the tests run both paths).
bool bf16_kernel_enabled() {
  if (!bf16_gemm::available()) return false;
  const char* setting = std::getenv("WMSS_NATIVE_BF16");
  return setting == nullptr || std::string(setting) != "0";
}

// One model's lm head as the loops read it: the tensors in their own dtypes and strides (each
// block is made contiguous when taken, so a strided input costs block-sized copies, not a copy of
// the whole input).
struct Head {
  Tensor hidden;  // [N, d]
  Tensor weight;  // [V, d]
  Tensor bias;    // [V], or undefined
  at::ScalarType compute;
  // The logits come from csrc/bf16_gemm.h on the bf16 values themselves (a bf16 model on a CPU
  // with AVX512-BF16; float32 logits at bf16 speed, no float32 copy of the weight), else from
  // ATen's product on compute-dtype blocks.
  bool bf16_kernel;

  // Detached: the products run in worker threads, whose autograd state is their own.
  Head(const Tensor& h, const Tensor& w, const std::optional<Tensor>& b, at::ScalarType c)
      : hidden(h.detach()), weight(w.detach()), compute(c),
        bf16_kernel(bf16_kernel_enabled() && c == at::kFloat &&
                    h.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {
    if (b.has_value() && b->defined()) bias = b->detach();
  }

  // The weight rows [v0, v0 + count) in the compute dtype ([count, d], contiguous; no copy when
  // the weight is in the compute dtype already).
  Tensor weight_block(int64_t v0, int64_t count) const {
    return weight.narrow(0, v0, count).to(compute).contiguous();
  }

  // The bias of those rows in the compute dtype, zeros without a bias (adding 0 is exact, so
  // one loop serves both cases).
  Tensor bias_block(int64_t v0, int64_t count) const {
    if (!bias.defined()) return at::zeros({count}, weight.options().dtype(compute));
    return bias.narrow(0, v0, count).to(compute).contiguous();
  }

  Tensor hidden_block(int64_t n0, int64_t count) const {
    return hidden.narrow(0, n0, count).to(compute).contiguous();
  }

  // The weight rows [v0, v0 + count) as logits_into reads them: the bf16 kernel's packed
  // panels (the block's own bytes), or weight_block.
  Tensor logit_weights(int64_t v0, int64_t count) const {
    return bf16_kernel ? bf16_gemm::pack_panels(weight.narrow(0, v0, count))
                       : weight_block(v0, count);
  }

  // The hidden rows [n0, n0 + count) as logits_into reads them: the bf16 rows as pairs (in
  // place where they can be, see bf16_gemm::as_pairs), or hidden_block.
  Tensor logit_hidden(int64_t n0, int64_t count) const {
    return bf16_kernel ? bf16_gemm::as_pairs(hidden.narrow(0, n0, count))
                       : hidden_block(n0, count);
  }

  // The raw logits a = h W^T of one block into `out` ([rows, cols] compute dtype, contiguous),
  // from logit_hidden and logit_weights.
  void logits_into(Tensor& out, const Tensor& hidden_rows, const Tensor& weight_rows) const {
    if (bf16_kernel) {
      bf16_gemm::logits(hidden_rows, weight_rows, out.size(1), out.data_ptr<float>(),
                        out.stride(0));
    } else {
      at::mm_out(out, hidden_rows, weight_rows.t());
    }
  }
};

// A contiguous [rows, cols] view at the start of a block buffer (the last blocks are smaller).
Tensor block_view(const Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

// Column of a label inside the vocabulary block [v0, v0 + count), or -1.
inline int64_t local_column(int64_t label, int64_t v0, int64_t count) {
  return (label >= v0 && label < v0 + count) ? label - v0 : -1;
}

// ---- forward: both models and the mixture --------------------------------------------------

template <typename T>
struct PairState {
  std::vector<Online<T>> strong, weak, mix;
  std::vector<T> target_strong, target_weak, target_mix;  // z[y] of each distribution

  explicit PairState(int64_t n)
      : strong(n), weak(n), mix(n), target_strong(n, T(0)), target_weak(n, T(0)),
        target_mix(n, T(0)) {}
};

// One token's statistics of one vocabulary block (or, merged, of the whole vocabulary): the
// three distributions' online statistics and z[y] of each (set by the block holding the label).
template <typename T>
struct PairRow {
  Online<T>& strong;
  Online<T>& weak;
  Online<T>& mix;
  T& target_strong;
  T& target_weak;
  T& target_mix;
};

// One row of a block: a_s, a_w (raw logits); folds the row into the token's statistics. The
// mixture is formed twice (for its maximum, then for its exps) rather than stored: the same
// arithmetic on the same values, so the same logits. KEEP = false overwrites a_s, a_w with the
// capped logits (the second loop then reads them); KEEP = true leaves the raw logits in place
// (the gradient pass after it needs them for the cap's slope) and caps twice.
template <typename T, bool CAP, bool KEEP>
void fold_pair_row(T* zs, T* zw, const T* bs, const T* bw, int64_t count, T cap, T lam,
                   T one_minus_lam, int64_t column, PairRow<T> row) {
  T max_s = T(MASKED_LOGIT), max_w = T(MASKED_LOGIT), max_m = T(MASKED_LOGIT);
#pragma omp simd reduction(max : max_s, max_w, max_m)
  for (int64_t v = 0; v < count; ++v) {
    const T a_s = zs[v] + bs[v];
    const T a_w = zw[v] + bw[v];
    const T z_s = CAP ? soft_cap(a_s, cap) : a_s;
    const T z_w = CAP ? soft_cap(a_w, cap) : a_w;
    const T z_m = mix(z_s, z_w, lam, one_minus_lam);
    if (!KEEP) {
      zs[v] = z_s;
      zw[v] = z_w;
    }
    max_s = z_s > max_s ? z_s : max_s;
    max_w = z_w > max_w ? z_w : max_w;
    max_m = z_m > max_m ? z_m : max_m;
  }
  // The capped logit of column v: stored by the first loop, or formed again from the raw one.
  auto capped = [&](const T* z, const T* b, int64_t v) {
    if (!KEEP) return z[v];
    const T a = z[v] + b[v];
    return CAP ? soft_cap(a, cap) : a;
  };
  T sum_s = 0, t_s = 0, sum_w = 0, t_w = 0, sum_m = 0;
#pragma omp simd reduction(+ : sum_s, t_s, sum_w, t_w, sum_m)
  for (int64_t v = 0; v < count; ++v) {
    const T z_s = capped(zs, bs, v);
    const T z_w = capped(zw, bw, v);
    const T x_s = z_s - max_s;
    const T x_w = z_w - max_w;
    const T e_s = exp_(x_s);
    const T e_w = exp_(x_w);
    sum_s += e_s;
    t_s += e_s * x_s;
    sum_w += e_w;
    t_w += e_w * x_w;
    sum_m += exp_(mix(z_s, z_w, lam, one_minus_lam) - max_m);
  }
  row.strong.merge(max_s, sum_s, t_s);
  row.weak.merge(max_w, sum_w, t_w);
  row.mix.merge(max_m, sum_m, T(0));
  if (column >= 0) {
    const T z_s = capped(zs, bs, column), z_w = capped(zw, bw, column);
    row.target_strong = z_s;
    row.target_weak = z_w;
    row.target_mix = mix(z_s, z_w, lam, one_minus_lam);
  }
}

// The forward's per-token outputs: loss, the (max, logsum) pairs, entropies, log-probs ([N]
// each, compute dtype) and the mixed mask ([N] bool), in the ops' order.
template <typename T>
struct PairOutputs {
  std::vector<Tensor> tensors;
  T *loss, *max_s, *logsum_s, *max_m, *logsum_m, *ent_s, *ent_w, *lp_s, *lp_w, *lp_m;
  bool* is_mixed;

  PairOutputs(int64_t num_tokens, const at::TensorOptions& options) {
    for (int i = 0; i < 10; ++i) tensors.push_back(at::empty({num_tokens}, options));
    tensors.push_back(at::empty({num_tokens}, options.dtype(at::kBool)));
    T* p[10];
    for (int i = 0; i < 10; ++i) p[i] = tensors[i].data_ptr<T>();
    loss = p[0], max_s = p[1], logsum_s = p[2], max_m = p[3], logsum_m = p[4];
    ent_s = p[5], ent_w = p[6], lp_s = p[7], lp_w = p[8], lp_m = p[9];
    is_mixed = tensors[10].data_ptr<bool>();
  }

  // Token n's outputs from its whole-vocabulary statistics; returns whether it mixes.
  bool finish(int64_t n, const Online<T>& s, const Online<T>& w, const Online<T>& m,
              T target_s, T target_w, T target_m, bool supervised,
              std::optional<double> gap_threshold) {
    const T log_s = std::log(s.s), log_w = std::log(w.s), log_m = std::log(m.s);
    const T h_s = log_s - s.t / s.s, h_w = log_w - w.t / w.s;
    // (z[y] - m) is exact near the maximum; log s is kept apart (docs/design.md 2.1).
    const T logp_s = (target_s - s.m) - log_s;
    const T logp_w = (target_w - w.m) - log_w;
    const T logp_m = (target_m - m.m) - log_m;
    bool mixes = supervised;
    if (gap_threshold.has_value()) mixes = mixes && (h_w - h_s) >= T(*gap_threshold);
    loss[n] = mixes ? -logp_m : (supervised ? -logp_s : T(0));
    max_s[n] = s.m;
    logsum_s[n] = log_s;
    max_m[n] = m.m;
    logsum_m[n] = log_m;
    ent_s[n] = supervised ? h_s : T(0);
    ent_w[n] = supervised ? h_w : T(0);
    lp_s[n] = supervised ? logp_s : T(0);
    lp_w[n] = supervised ? logp_w : T(0);
    lp_m[n] = supervised ? logp_m : T(0);
    is_mixed[n] = mixes;
    return mixes;
  }
};

template <typename T>
std::vector<Tensor> mixed_forward_impl(const Head& strong, const Head& weak, const Tensor& labels,
                                       double lam_, std::optional<double> softcap,
                                       std::optional<double> gap_threshold, int64_t ignore_index,
                                       int64_t token_block, int64_t vocab_block) {
  const int64_t num_tokens = labels.size(0), vocab = strong.weight.size(0);
  const auto options = labels.options().dtype(strong.compute);
  const T lam = T(lam_), one_minus_lam = T(1.0 - lam_);
  const T cap = softcap.has_value() ? T(*softcap) : T(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  PairState<T> state(num_tokens);

  const int64_t rows_max = std::min(token_block, std::max<int64_t>(num_tokens, 1));
  const int64_t cols_max = std::min(vocab_block, vocab);
  const std::vector<Tensor> bufs_s = per_thread({rows_max, cols_max}, options);
  const std::vector<Tensor> bufs_w = per_thread({rows_max, cols_max}, options);

  for (int64_t v0 = 0; v0 < vocab && num_tokens > 0; v0 += vocab_block) {
    const int64_t cols = std::min(vocab_block, vocab - v0);
    const Tensor w_s = strong.logit_weights(v0, cols), w_w = weak.logit_weights(v0, cols);
    const Tensor b_s = strong.bias_block(v0, cols), b_w = weak.bias_block(v0, cols);
    const T* bs = b_s.data_ptr<T>();
    const T* bw = b_w.data_ptr<T>();
    for_token_blocks(num_tokens, token_block, [&](int64_t first, int64_t last) {
      const int tid = at::get_thread_num();
      for (int64_t block = first; block < last; ++block) {
        const int64_t n0 = block * token_block, rows = std::min(token_block, num_tokens - n0);
        Tensor z_s = block_view(bufs_s[tid], rows, cols), z_w = block_view(bufs_w[tid], rows, cols);
        strong.logits_into(z_s, strong.logit_hidden(n0, rows), w_s);
        weak.logits_into(z_w, weak.logit_hidden(n0, rows), w_w);
        T* zs = z_s.data_ptr<T>();
        T* zw = z_w.data_ptr<T>();
        dispatch_bool(softcap.has_value(), [&](auto capped) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            fold_pair_row<T, decltype(capped)::value, false>(
                zs + r * cols, zw + r * cols, bs, bw, cols, cap, lam, one_minus_lam,
                local_column(y[n], v0, cols),
                PairRow<T>{state.strong[n], state.weak[n], state.mix[n], state.target_strong[n],
                           state.target_weak[n], state.target_mix[n]});
          }
        });
      }
    });
  }

  PairOutputs<T> out(num_tokens, options);
  for (int64_t n = 0; n < num_tokens; ++n) {
    out.finish(n, state.strong[n], state.weak[n], state.mix[n], state.target_strong[n],
               state.target_weak[n], state.target_mix[n], y[n] != ignore_index, gap_threshold);
  }
  return out.tensors;
}

// ---- one model's statistics (token_entropy) --------------------------------------------------

template <typename T, bool CAP>
void fold_single_row(T* z, const T* b, int64_t count, T cap, int64_t column, Online<T>& state,
                     T& target) {
  T top = T(MASKED_LOGIT);
#pragma omp simd reduction(max : top)
  for (int64_t v = 0; v < count; ++v) {
    const T a = z[v] + b[v];
    const T capped = CAP ? soft_cap(a, cap) : a;
    z[v] = capped;
    top = capped > top ? capped : top;
  }
  T sum = 0, t = 0;
#pragma omp simd reduction(+ : sum, t)
  for (int64_t v = 0; v < count; ++v) {
    const T x = z[v] - top;
    const T e = exp_(x);
    sum += e;
    t += e * x;
  }
  state.merge(top, sum, t);
  if (column >= 0) target = z[column];
}

template <typename T>
std::vector<Tensor> single_stats_impl(const Head& head, const Tensor& labels,
                                      std::optional<double> softcap, int64_t ignore_index,
                                      int64_t token_block, int64_t vocab_block) {
  const int64_t num_tokens = labels.size(0), vocab = head.weight.size(0);
  const auto options = labels.options().dtype(head.compute);
  const T cap = softcap.has_value() ? T(*softcap) : T(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  std::vector<Online<T>> state(num_tokens);
  std::vector<T> target(num_tokens, T(0));
  const int64_t rows_max = std::min(token_block, std::max<int64_t>(num_tokens, 1));
  const std::vector<Tensor> buffers =
      per_thread({rows_max, std::min(vocab_block, vocab)}, options);
  for (int64_t v0 = 0; v0 < vocab && num_tokens > 0; v0 += vocab_block) {
    const int64_t cols = std::min(vocab_block, vocab - v0);
    const Tensor w = head.logit_weights(v0, cols), b = head.bias_block(v0, cols);
    const T* bp = b.data_ptr<T>();
    for_token_blocks(num_tokens, token_block, [&](int64_t first, int64_t last) {
      const int tid = at::get_thread_num();
      for (int64_t block = first; block < last; ++block) {
        const int64_t n0 = block * token_block, rows = std::min(token_block, num_tokens - n0);
        Tensor z = block_view(buffers[tid], rows, cols);
        head.logits_into(z, head.logit_hidden(n0, rows), w);
        T* zp = z.data_ptr<T>();
        dispatch_bool(softcap.has_value(), [&](auto capped) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t n = n0 + r;
            fold_single_row<T, decltype(capped)::value>(zp + r * cols, bp, cols, cap,
                                                        local_column(y[n], v0, cols), state[n],
                                                        target[n]);
          }
        });
      }
    });
  }
  Tensor entropy = at::empty({num_tokens}, options), lse = at::empty({num_tokens}, options);
  Tensor logprob = at::empty({num_tokens}, options);
  T *ent = entropy.data_ptr<T>(), *l = lse.data_ptr<T>(), *lp = logprob.data_ptr<T>();
  for (int64_t n = 0; n < num_tokens; ++n) {
    const Online<T>& s = state[n];
    const T log_s = std::log(s.s);
    const bool supervised = y[n] != ignore_index;
    ent[n] = supervised ? log_s - s.t / s.s : T(0);
    l[n] = s.m + log_s;
    lp[n] = supervised ? (target[n] - s.m) - log_s : T(0);
  }
  return {entropy, lse, logprob};
}

// ---- backward ------------------------------------------------------------------------------

// One row's logit gradients dL/da of both models, written over the raw logits a_s, a_w:
//   g = c_mix (softmax(z_m) - onehot),  dz_s = lam g + c_strong (softmax(z_s) - onehot),
//   dz_w = (1 - lam) g,  dL/da = dz * sech^2(a / cap) with a cap (docs/design.md 1.1).
// MIX / STRONG: whether the row has a mixed-loss / plain-strong coefficient (a token has one
// or the other, or none when ignored), so each row computes only the exps it needs.
template <typename T, bool CAP, bool MIX, bool STRONG>
void grad_row(T* zs, T* zw, const T* bs, const T* bw, int64_t count, T cap, T lam,
              T one_minus_lam, int64_t column, T max_s, T logsum_s, T max_m, T logsum_m,
              T c_mix, T c_strong) {
#pragma omp simd
  for (int64_t v = 0; v < count; ++v) {
    const T a_s = zs[v] + bs[v];
    const T a_w = zw[v] + bw[v];
    const T z_s = CAP ? soft_cap(a_s, cap) : a_s;
    const T z_w = CAP ? soft_cap(a_w, cap) : a_w;
    const T onehot = v == column ? T(1) : T(0);
    T g = T(0);
    if (MIX) g = c_mix * (exp_((mix(z_s, z_w, lam, one_minus_lam) - max_m) - logsum_m) - onehot);
    T g_s = lam * g;
    if (STRONG) g_s += c_strong * (exp_((z_s - max_s) - logsum_s) - onehot);
    T g_w = one_minus_lam * g;
    if (CAP) {
      g_s *= soft_cap_slope(a_s, cap);
      g_w *= soft_cap_slope(a_w, cap);
    }
    zs[v] = g_s;
    zw[v] = g_w;
  }
}

// One model's gradient outputs and the per-thread partial sums of a vocabulary block behind them.
struct Grads {
  bool hidden = false, weight = false, bias = false;
  Tensor d_hidden;  // [N, d] compute dtype (the autograd layer casts it); rows owned by a thread
  Tensor d_weight;  // [V, d] in the weight's dtype, each block written once
  Tensor d_bias;    // [V] in the bias's dtype, each block written once
  // Per thread: the current vocabulary block's dW and db partial sums (compute dtype), and
  // whether the thread had a token block of it.
  std::vector<Tensor> weight_parts, bias_parts;
  std::vector<char> used;

  bool any() const { return hidden || weight || bias; }

  Grads(const Head& head, bool h, bool w, bool b, int64_t vocab_block)
      : hidden(h), weight(w), bias(b), used(at::get_num_threads(), 0) {
    const auto compute = head.weight.options().dtype(head.compute);
    const int64_t cols = std::min(vocab_block, head.weight.size(0));
    if (hidden) d_hidden = at::zeros(head.hidden.sizes(), compute);
    if (weight) {
      d_weight = at::empty(head.weight.sizes(), head.weight.options());
      weight_parts = per_thread({cols, head.weight.size(1)}, compute);
    }
    if (bias) {
      d_bias = at::empty({head.weight.size(0)}, head.bias.defined() ? head.bias.options()
                                                                     : head.weight.options());
      bias_parts = per_thread({cols}, compute);
    }
  }

  void start_block() { std::fill(used.begin(), used.end(), 0); }

  // A thread's first token block of this vocabulary block: its partial sums start at 0.
  void start_thread(int tid, int64_t cols) {
    used[tid] = 1;
    if (weight) block_view(weight_parts[tid], cols, weight_parts[tid].size(1)).zero_();
    if (bias) bias_parts[tid].narrow(0, 0, cols).zero_();
  }

  // Add one [rows, cols] block's dL/da: dh += G W, dW += G^T h, db += sum over rows of G.
  template <typename T>
  void accumulate(int tid, const Tensor& g, const Tensor& w_block, const Head& head, int64_t n0) {
    const int64_t rows = g.size(0), cols = g.size(1);
    if (hidden) d_hidden.narrow(0, n0, rows).addmm_(g, w_block);
    if (weight) {
      Tensor part = block_view(weight_parts[tid], cols, weight_parts[tid].size(1));
      part.addmm_(g.t(), head.hidden_block(n0, rows));
    }
    if (bias) {
      const T* gp = g.data_ptr<T>();
      T* part = bias_parts[tid].data_ptr<T>();
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = gp + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) part[c] += row[c];
      }
    }
  }

  // The threads' partial sums, added in thread order, written to the block of the outputs.
  void finish_block(int64_t v0, int64_t cols) {
    auto total = [&](const std::vector<Tensor>& parts, auto view) {
      Tensor sum;
      for (size_t tid = 0; tid < parts.size(); ++tid) {
        if (!used[tid]) continue;
        sum = sum.defined() ? sum.add_(view(parts[tid])) : view(parts[tid]);
      }
      return sum;
    };
    if (weight) {
      const int64_t d = weight_parts[0].size(1);
      Tensor sum = total(weight_parts, [&](const Tensor& t) { return block_view(t, cols, d); });
      d_weight.narrow(0, v0, cols).copy_(sum);
    }
    if (bias) {
      Tensor sum = total(bias_parts, [&](const Tensor& t) { return t.narrow(0, 0, cols); });
      d_bias.narrow(0, v0, cols).copy_(sum);
    }
  }

  // The three outputs; a gradient not requested is an empty tensor of the compute dtype (each
  // its own: outputs of an op must not alias one another).
  void outputs(std::vector<Tensor>& out, const Head& head) const {
    const auto empty = [&] { return at::empty({0}, head.weight.options().dtype(head.compute)); };
    out.push_back(hidden ? d_hidden : empty());
    out.push_back(weight ? d_weight : empty());
    out.push_back(bias ? d_bias : empty());
  }
};

template <typename T>
std::vector<Tensor> mixed_backward_impl(const Head& strong, const Head& weak,
                                        const Tensor& labels, const Tensor& max_strong_,
                                        const Tensor& logsum_strong_, const Tensor& max_mix_,
                                        const Tensor& logsum_mix_, const Tensor& coef_mix_,
                                        const std::optional<Tensor>& coef_strong_, double lam_,
                                        std::optional<double> softcap,
                                        const std::vector<bool>& requests, int64_t token_block,
                                        int64_t vocab_block) {
  const int64_t num_tokens = labels.size(0), vocab = strong.weight.size(0);
  const auto options = labels.options().dtype(strong.compute);
  const T lam = T(lam_), one_minus_lam = T(1.0 - lam_);
  const T cap = softcap.has_value() ? T(*softcap) : T(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  auto stat = [&](const Tensor& t) { return t.to(strong.compute).contiguous(); };
  const Tensor max_strong = stat(max_strong_), logsum_strong = stat(logsum_strong_);
  const Tensor max_mix = stat(max_mix_), logsum_mix = stat(logsum_mix_);
  const Tensor coef_mix = stat(coef_mix_);
  const bool gap = coef_strong_.has_value() && coef_strong_->defined();
  const Tensor coef_strong = gap ? stat(*coef_strong_) : Tensor();
  const T *mx_s = max_strong.data_ptr<T>(), *ls_s = logsum_strong.data_ptr<T>();
  const T *mx_m = max_mix.data_ptr<T>(), *ls_m = logsum_mix.data_ptr<T>();
  const T* c_mix = coef_mix.data_ptr<T>();
  const T* c_strong = gap ? coef_strong.data_ptr<T>() : nullptr;

  Grads grads_s(strong, requests[0], requests[1], requests[2], vocab_block);
  Grads grads_w(weak, requests[3], requests[4], requests[5], vocab_block);
  if (num_tokens > 0 && (grads_s.any() || grads_w.any())) {
    const int64_t rows_max = std::min(token_block, num_tokens);
    const int64_t cols_max = std::min(vocab_block, vocab);
    const std::vector<Tensor> bufs_s = per_thread({rows_max, cols_max}, options);
    const std::vector<Tensor> bufs_w = per_thread({rows_max, cols_max}, options);
    for (int64_t v0 = 0; v0 < vocab; v0 += vocab_block) {
      const int64_t cols = std::min(vocab_block, vocab - v0);
      // The logits read logit_weights (the bf16 kernel's panels where it serves the model); the
      // hidden-state gradient, a compute-dtype block (for a kernel model only when requested).
      auto dense = [&](const Head& head, const Grads& grads) {
        return head.bf16_kernel && !grads.hidden ? Tensor() : head.weight_block(v0, cols);
      };
      const Tensor w_s = dense(strong, grads_s), w_w = dense(weak, grads_w);
      const Tensor lw_s = strong.bf16_kernel ? strong.logit_weights(v0, cols) : w_s;
      const Tensor lw_w = weak.bf16_kernel ? weak.logit_weights(v0, cols) : w_w;
      const Tensor b_s = strong.bias_block(v0, cols), b_w = weak.bias_block(v0, cols);
      const T* bs = b_s.data_ptr<T>();
      const T* bw = b_w.data_ptr<T>();
      grads_s.start_block();
      grads_w.start_block();
      for_token_blocks(num_tokens, token_block, [&](int64_t first, int64_t last) {
        const int tid = at::get_thread_num();
        grads_s.start_thread(tid, cols);
        grads_w.start_thread(tid, cols);
        for (int64_t block = first; block < last; ++block) {
          const int64_t n0 = block * token_block, rows = std::min(token_block, num_tokens - n0);
          Tensor g_s = block_view(bufs_s[tid], rows, cols);
          Tensor g_w = block_view(bufs_w[tid], rows, cols);
          strong.logits_into(g_s, strong.logit_hidden(n0, rows), lw_s);
          weak.logits_into(g_w, weak.logit_hidden(n0, rows), lw_w);
          T* zs = g_s.data_ptr<T>();
          T* zw = g_w.data_ptr<T>();
          dispatch_bool(softcap.has_value(), [&](auto capped) {
            constexpr bool CAP = decltype(capped)::value;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t n = n0 + r;
              const T cm = c_mix[n], cs = gap ? c_strong[n] : T(0);
              T* row_s = zs + r * cols;
              T* row_w = zw + r * cols;
              const int64_t column = local_column(y[n], v0, cols);
              auto run = [&](auto mixes, auto strongs) {
                grad_row<T, CAP, decltype(mixes)::value, decltype(strongs)::value>(
                    row_s, row_w, bs, bw, cols, cap, lam, one_minus_lam, column, mx_s[n],
                    ls_s[n], mx_m[n], ls_m[n], cm, cs);
              };
              if (cm != T(0) && cs != T(0)) {
                run(std::true_type{}, std::true_type{});
              } else if (cm != T(0)) {
                run(std::true_type{}, std::false_type{});
              } else if (cs != T(0)) {
                run(std::false_type{}, std::true_type{});
              } else {  // an ignored token (or a zero upstream gradient): no gradient
                std::fill(row_s, row_s + cols, T(0));
                std::fill(row_w, row_w + cols, T(0));
              }
            }
          });
          if (grads_s.any()) grads_s.accumulate<T>(tid, g_s, w_s, strong, n0);
          if (grads_w.any()) grads_w.accumulate<T>(tid, g_w, w_w, weak, n0);
        }
      });
      grads_s.finish_block(v0, cols);
      grads_w.finish_block(v0, cols);
    }
  } else {
    // Nothing to accumulate: requested gradients are zeros.
    for (Grads* g : {&grads_s, &grads_w}) {
      if (g->weight) g->d_weight.zero_();
      if (g->bias) g->d_bias.zero_();
    }
  }
  std::vector<Tensor> out;
  grads_s.outputs(out, strong);
  grads_w.outputs(out, weak);
  return out;
}

// ---- forward with the gradients (training) --------------------------------------------------
//
// The forward of a step whose gradients will be needed: the statistics AND each trained input's
// gradient of sum_n u_n loss_n for a unit upstream gradient (u_n = 1 at every supervised token),
// in 6 products instead of the 2 + 6 of a forward and a recomputing backward. The tokens are cut
// into chunks of `chunk` rows; a chunk's raw logits over the WHOLE vocabulary are kept (two
// [chunk, V] buffers, vocabulary block after vocabulary block), so its statistics are complete
// before its logit gradients are formed in place and turned into dh (rows of the chunk) and the
// dW, db contributions. The autograd layer scales them by the upstream gradient (dh row by row;
// dW and db when it is the same for every supervised token, else it recomputes those).
//
// Threads share out the vocabulary blocks of each chunk (two parallel regions per chunk: the
// logits and statistics, then the gradients): each block's dW and db rows belong to one thread,
// so they are accumulated in place, chunk after chunk, in token order (deterministic whatever
// the thread count); each thread's dh partial [chunk, d] is added in thread order.

// One chunk's two phases run over its vocabulary blocks with the caller's thread-local state.
template <typename F>
void for_vocab_blocks(int64_t num_blocks, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, num_blocks, BLOCK_GRAIN, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard guard(state);
    f(first, last);
  });
}

// One model's unit-upstream gradients ([N, d], [V, d], [V]; compute dtype) and its per-thread
// dh partials of the current chunk.
struct ChunkGrads {
  bool hidden, weight, bias;
  Tensor d_hidden, d_weight, d_bias;
  std::vector<Tensor> hidden_parts;  // per thread [chunk, d]
  std::vector<char> used;            // per thread: wrote its dh partial in this chunk

  ChunkGrads(const Head& head, bool h, bool w, bool b, int64_t rows_max)
      : hidden(h), weight(w), bias(b), used(at::get_num_threads(), 0) {
    const auto compute = head.weight.options().dtype(head.compute);
    if (hidden) {
      d_hidden = at::zeros(head.hidden.sizes(), compute);
      hidden_parts = per_thread({rows_max, head.hidden.size(1)}, compute);
    }
    if (weight) d_weight = at::zeros(head.weight.sizes(), compute);
    if (bias) d_bias = at::zeros({head.weight.size(0)}, compute);
  }

  bool any() const { return hidden || weight || bias; }

  // One [rows, cols] block of dL/da (unit upstream) at vocabulary offset v0 of the chunk whose
  // hidden states are h_input (the input's dtype); w_block and h_chunk are the compute-dtype
  // weight block and chunk that float32/float64 models' products read (bf16 models read the
  // inputs themselves).
  template <typename T>
  void accumulate(int tid, const Tensor& g, const Tensor& w_block, const Tensor& h_chunk,
                  const Tensor& h_input, const Head& head, int64_t v0) {
    const int64_t rows = g.size(0), cols = g.size(1);
    if (head.hidden.scalar_type() == at::kBFloat16 && (hidden || weight)) {
      // bf16 models: the gradient products take the logit gradients rounded to bf16 and the
      // inputs as given (oneDNN's bf16 products, ~2.4x float32's speed on this CPU); each
      // block's product is rounded once to bf16 and added to the float32 accumulators.
      const Tensor g_half = g.to(at::kBFloat16);
      if (hidden) {
        Tensor part = block_view(hidden_parts[tid], rows, hidden_parts[tid].size(1));
        const Tensor product = at::mm(g_half, head.weight.narrow(0, v0, cols));
        if (used[tid]) {
          part.add_(product);
        } else {
          part.copy_(product);
          used[tid] = 1;
        }
      }
      if (weight) d_weight.narrow(0, v0, cols).add_(at::mm(g_half.t(), h_input));
    } else {
      if (hidden) {
        Tensor part = block_view(hidden_parts[tid], rows, hidden_parts[tid].size(1));
        if (used[tid]) {
          part.addmm_(g, w_block);
        } else {
          at::mm_out(part, g, w_block);
          used[tid] = 1;
        }
      }
      if (weight) d_weight.narrow(0, v0, cols).addmm_(g.t(), h_chunk);
    }
    if (bias) {
      const T* gp = g.data_ptr<T>();
      T* db = d_bias.data_ptr<T>() + v0;
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = gp + r * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) db[c] += row[c];
      }
    }
  }

  // The chunk's dh rows: the threads' partials added in thread order.
  void finish_chunk(int64_t n0, int64_t rows) {
    if (!hidden) return;
    Tensor out = d_hidden.narrow(0, n0, rows);
    for (size_t tid = 0; tid < used.size(); ++tid) {
      if (!used[tid]) continue;
      out.add_(block_view(hidden_parts[tid], rows, hidden_parts[tid].size(1)));
      used[tid] = 0;
    }
  }

  void outputs(std::vector<Tensor>& out, const Head& head) const {
    const auto empty = [&] { return at::empty({0}, head.weight.options().dtype(head.compute)); };
    out.push_back(hidden ? d_hidden : empty());
    out.push_back(weight ? d_weight : empty());
    out.push_back(bias ? d_bias : empty());
  }
};

// A model's weight cut into vocabulary blocks as the forward with the gradients reads them, made
// once rather than once per chunk: for the logits (logit_weights' form: the bf16 kernel's
// panels, or compute-dtype rows) and, for float32/float64 models, for the gradient products
// (compute-dtype rows; bf16 models' gradient products read the weight itself).
struct WeightBlocks {
  std::vector<Tensor> logits, grads;

  WeightBlocks(const Head& head, int64_t vocab_block) {
    const int64_t vocab = head.weight.size(0);
    // Contiguous in the compute dtype: the input itself when it is both already, else one
    // converted copy (half-precision without the kernel, or strided weights).
    const Tensor dense = head.bf16_kernel ? Tensor() : head.weight.to(head.compute).contiguous();
    for (int64_t v0 = 0; v0 < vocab; v0 += vocab_block) {
      const int64_t cols = std::min(vocab_block, vocab - v0);
      if (head.bf16_kernel) {
        logits.push_back(head.logit_weights(v0, cols));
        grads.push_back(Tensor());
      } else {
        logits.push_back(dense.narrow(0, v0, cols));
        grads.push_back(logits.back());
      }
    }
  }
};

template <typename T>
std::vector<Tensor> mixed_forward_grads_impl(const Head& strong, const Head& weak,
                                             const Tensor& labels, double lam_,
                                             std::optional<double> softcap,
                                             std::optional<double> gap_threshold,
                                             int64_t ignore_index,
                                             const std::vector<bool>& requests, int64_t chunk,
                                             int64_t vocab_block) {
  const int64_t num_tokens = labels.size(0), vocab = strong.weight.size(0);
  const auto options = labels.options().dtype(strong.compute);
  const T lam = T(lam_), one_minus_lam = T(1.0 - lam_);
  const T cap = softcap.has_value() ? T(*softcap) : T(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t rows_max = std::min(chunk, std::max<int64_t>(num_tokens, 1));
  const int64_t num_blocks = (vocab + vocab_block - 1) / vocab_block;

  PairOutputs<T> out(num_tokens, options);
  ChunkGrads grads_s(strong, requests[0], requests[1], requests[2], rows_max);
  ChunkGrads grads_w(weak, requests[3], requests[4], requests[5], rows_max);
  if (num_tokens > 0) {
    const WeightBlocks weight_s(strong, vocab_block), weight_w(weak, vocab_block);
    const Tensor bias_s = strong.bias_block(0, vocab), bias_w = weak.bias_block(0, vocab);
    const T* bs = bias_s.data_ptr<T>();
    const T* bw = bias_w.data_ptr<T>();
    // Block b of a chunk of `rows` tokens: [rows, cols_b] at offset rows * v0_b of a buffer.
    const Tensor buffer_s = at::empty({rows_max * vocab}, options);
    const Tensor buffer_w = at::empty({rows_max * vocab}, options);
    // Per (block, row) statistics of the chunk, merged in block order once all are in.
    std::vector<Online<T>> part_s(num_blocks * rows_max), part_w(num_blocks * rows_max),
        part_m(num_blocks * rows_max);
    std::vector<T> target_s(rows_max), target_w(rows_max), target_m(rows_max);
    std::vector<T> coef_mix(rows_max), coef_strong(rows_max);
    const bool need_s = grads_s.any(), need_w = grads_w.any();

    for (int64_t n0 = 0; n0 < num_tokens; n0 += chunk) {
      const int64_t rows = std::min(chunk, num_tokens - n0);
      const Tensor h_s = strong.logit_hidden(n0, rows), h_w = weak.logit_hidden(n0, rows);
      const Tensor in_s = strong.hidden.narrow(0, n0, rows), in_w = weak.hidden.narrow(0, n0, rows);
      auto block = [&](const Tensor& buffer, int64_t v0, int64_t cols) {
        return buffer.narrow(0, rows * v0, rows * cols).view({rows, cols});
      };
      std::fill(part_s.begin(), part_s.end(), Online<T>());
      std::fill(part_w.begin(), part_w.end(), Online<T>());
      std::fill(part_m.begin(), part_m.end(), Online<T>());
      std::fill(target_s.begin(), target_s.end(), T(0));
      std::fill(target_w.begin(), target_w.end(), T(0));
      std::fill(target_m.begin(), target_m.end(), T(0));

      // Phase 1: the raw logits of every block and each row's statistics of that block.
      for_vocab_blocks(num_blocks, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
          const int64_t v0 = b * vocab_block, cols = std::min(vocab_block, vocab - v0);
          Tensor z_s = block(buffer_s, v0, cols), z_w = block(buffer_w, v0, cols);
          strong.logits_into(z_s, h_s, weight_s.logits[b]);
          weak.logits_into(z_w, h_w, weight_w.logits[b]);
          T* zs = z_s.data_ptr<T>();
          T* zw = z_w.data_ptr<T>();
          dispatch_bool(softcap.has_value(), [&](auto capped) {
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t k = b * rows_max + r;
              fold_pair_row<T, decltype(capped)::value, true>(
                  zs + r * cols, zw + r * cols, bs + v0, bw + v0, cols, cap, lam,
                  one_minus_lam, local_column(y[n0 + r], v0, cols),
                  PairRow<T>{part_s[k], part_w[k], part_m[k], target_s[r], target_w[r],
                             target_m[r]});
            }
          });
        }
      });

      // The chunk's statistics, and each token's unit coefficient for the loss it is trained
      // with (the mixed one, or plain strong cross-entropy under gap masking; none if ignored).
      for (int64_t r = 0; r < rows; ++r) {
        Online<T> s, w, m;
        for (int64_t b = 0; b < num_blocks; ++b) {
          const Online<T>& ps = part_s[b * rows_max + r];
          const Online<T>& pw = part_w[b * rows_max + r];
          const Online<T>& pm = part_m[b * rows_max + r];
          s.merge(ps.m, ps.s, ps.t);
          w.merge(pw.m, pw.s, pw.t);
          m.merge(pm.m, pm.s, pm.t);
        }
        const int64_t n = n0 + r;
        const bool supervised = y[n] != ignore_index;
        const bool mixes = out.finish(n, s, w, m, target_s[r], target_w[r], target_m[r],
                                      supervised, gap_threshold);
        coef_mix[r] = mixes ? T(1) : T(0);
        coef_strong[r] = (supervised && !mixes) ? T(1) : T(0);
      }
      if (!need_s && !need_w) continue;

      // Phase 2: each block's logit gradients in place, then dh, dW, db from them.
      for_vocab_blocks(num_blocks, [&](int64_t first, int64_t last) {
        const int tid = at::get_thread_num();
        for (int64_t b = first; b < last; ++b) {
          const int64_t v0 = b * vocab_block, cols = std::min(vocab_block, vocab - v0);
          Tensor g_s = block(buffer_s, v0, cols), g_w = block(buffer_w, v0, cols);
          T* zs = g_s.data_ptr<T>();
          T* zw = g_w.data_ptr<T>();
          dispatch_bool(softcap.has_value(), [&](auto capped) {
            constexpr bool CAP = decltype(capped)::value;
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t n = n0 + r;
              const T cm = coef_mix[r], cs = coef_strong[r];
              T* row_s = zs + r * cols;
              T* row_w = zw + r * cols;
              const int64_t column = local_column(y[n], v0, cols);
              auto run = [&](auto mixes, auto strongs) {
                grad_row<T, CAP, decltype(mixes)::value, decltype(strongs)::value>(
                    row_s, row_w, bs + v0, bw + v0, cols, cap, lam, one_minus_lam, column,
                    out.max_s[n], out.logsum_s[n], out.max_m[n], out.logsum_m[n], cm, cs);
              };
              if (cm != T(0)) {
                run(std::true_type{}, std::false_type{});
              } else if (cs != T(0)) {
                run(std::false_type{}, std::true_type{});
              } else {  // an ignored token: no gradient
                std::fill(row_s, row_s + cols, T(0));
                std::fill(row_w, row_w + cols, T(0));
              }
            }
          });
          if (need_s) {
            grads_s.accumulate<T>(tid, g_s, weight_s.grads[b], h_s, in_s, strong, v0);
          }
          if (need_w) {
            grads_w.accumulate<T>(tid, g_w, weight_w.grads[b], h_w, in_w, weak, v0);
          }
        }
      });
      grads_s.finish_chunk(n0, rows);
      grads_w.finish_chunk(n0, rows);
    }
  }
  std::vector<Tensor> result = out.tensors;
  grads_s.outputs(result, strong);
  grads_w.outputs(result, weak);
  return result;
}

// ---- the ops -------------------------------------------------------------------------------

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "wmss_native: ", name, " must be a CPU tensor, got ",
              t.device());
}

void check_blocks(int64_t token_block, int64_t vocab_block) {
  TORCH_CHECK(token_block > 0 && vocab_block > 0,
              "wmss_native: token_block and vocab_block must be positive");
}

std::vector<bool> request_flags(const c10::List<bool>& requests) {
  TORCH_CHECK(requests.size() == 6,
              "wmss_native: requests holds (hidden, weight, bias) for each model, got ",
              requests.size());
  std::vector<bool> wanted;
  for (size_t i = 0; i < requests.size(); ++i) wanted.push_back(requests.get(i));
  return wanted;
}

// What every op on the pair starts from, checked: the two heads in their compute dtype, the
// labels as contiguous int64 and, for the ops that form gradients, the six requests.
struct PairOperands {
  Head strong, weak;
  Tensor labels;
  std::vector<bool> wanted;  // empty without requests

  bool in_double() const { return strong.compute == at::kDouble; }
};

PairOperands pair_operands(const Tensor& strong_hidden, const Tensor& strong_weight,
                           const std::optional<Tensor>& strong_bias, const Tensor& weak_hidden,
                           const Tensor& weak_weight, const std::optional<Tensor>& weak_bias,
                           const Tensor& labels, int64_t token_block, int64_t vocab_block,
                           const std::optional<c10::List<bool>>& requests = std::nullopt) {
  check_cpu(strong_hidden, "strong_hidden");
  check_cpu(weak_hidden, "weak_hidden");
  check_blocks(token_block, vocab_block);
  const std::vector<bool> wanted = requests ? request_flags(*requests) : std::vector<bool>();
  const auto compute = compute_type(strong_hidden, weak_hidden);
  PairOperands pair{Head(strong_hidden, strong_weight, strong_bias, compute),
                    Head(weak_hidden, weak_weight, weak_bias, compute),
                    labels.to(at::kLong).contiguous(), wanted};
  TORCH_CHECK(wanted.empty() || (!(wanted[2] && !pair.strong.bias.defined()) &&
                                 !(wanted[5] && !pair.weak.bias.defined())),
              "wmss_native: a bias gradient was requested for a model without a bias");
  return pair;
}

std::vector<Tensor> mixed_forward(const Tensor& strong_hidden, const Tensor& strong_weight,
                                  const std::optional<Tensor>& strong_bias,
                                  const Tensor& weak_hidden, const Tensor& weak_weight,
                                  const std::optional<Tensor>& weak_bias, const Tensor& labels,
                                  double lam, std::optional<double> softcap,
                                  std::optional<double> gap_threshold, int64_t ignore_index,
                                  int64_t token_block, int64_t vocab_block) {
  const PairOperands p = pair_operands(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                       weak_weight, weak_bias, labels, token_block, vocab_block);
  if (p.in_double()) {
    return mixed_forward_impl<double>(p.strong, p.weak, p.labels, lam, softcap, gap_threshold,
                                      ignore_index, token_block, vocab_block);
  }
  return mixed_forward_impl<float>(p.strong, p.weak, p.labels, lam, softcap, gap_threshold,
                                   ignore_index, token_block, vocab_block);
}

std::vector<Tensor> mixed_forward_grads(
    const Tensor& strong_hidden, const Tensor& strong_weight,
    const std::optional<Tensor>& strong_bias, const Tensor& weak_hidden,
    const Tensor& weak_weight, const std::optional<Tensor>& weak_bias, const Tensor& labels,
    double lam, std::optional<double> softcap, std::optional<double> gap_threshold,
    int64_t ignore_index, c10::List<bool> requests, int64_t chunk, int64_t vocab_block) {
  const PairOperands p = pair_operands(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                       weak_weight, weak_bias, labels, chunk, vocab_block,
                                       requests);
  if (p.in_double()) {
    return mixed_forward_grads_impl<double>(p.strong, p.weak, p.labels, lam, softcap,
                                            gap_threshold, ignore_index, p.wanted, chunk,
                                            vocab_block);
  }
  return mixed_forward_grads_impl<float>(p.strong, p.weak, p.labels, lam, softcap, gap_threshold,
                                         ignore_index, p.wanted, chunk, vocab_block);
}

std::vector<Tensor> single_stats(const Tensor& hidden, const Tensor& weight,
                                 const std::optional<Tensor>& bias, const Tensor& labels,
                                 std::optional<double> softcap, int64_t ignore_index,
                                 int64_t token_block, int64_t vocab_block) {
  check_cpu(hidden, "hidden");
  check_blocks(token_block, vocab_block);
  const auto compute = compute_type(hidden, hidden);
  const Head head(hidden, weight, bias, compute);
  const Tensor y = labels.to(at::kLong).contiguous();
  if (compute == at::kDouble) {
    return single_stats_impl<double>(head, y, softcap, ignore_index, token_block, vocab_block);
  }
  return single_stats_impl<float>(head, y, softcap, ignore_index, token_block, vocab_block);
}

std::vector<Tensor> mixed_backward(
    const Tensor& strong_hidden, const Tensor& strong_weight,
    const std::optional<Tensor>& strong_bias, const Tensor& weak_hidden,
    const Tensor& weak_weight, const std::optional<Tensor>& weak_bias, const Tensor& labels,
    const Tensor& max_strong, const Tensor& logsum_strong, const Tensor& max_mix,
    const Tensor& logsum_mix, const Tensor& coef_mix, const std::optional<Tensor>& coef_strong,
    double lam, std::optional<double> softcap, c10::List<bool> requests, int64_t token_block,
    int64_t vocab_block) {
  const PairOperands p = pair_operands(strong_hidden, strong_weight, strong_bias, weak_hidden,
                                       weak_weight, weak_bias, labels, token_block, vocab_block,
                                       requests);
  if (p.in_double()) {
    return mixed_backward_impl<double>(p.strong, p.weak, p.labels, max_strong, logsum_strong,
                                       max_mix, logsum_mix, coef_mix, coef_strong, lam, softcap,
                                       p.wanted, token_block, vocab_block);
  }
  return mixed_backward_impl<float>(p.strong, p.weak, p.labels, max_strong, logsum_strong,
                                    max_mix, logsum_mix, coef_mix, coef_strong, lam, softcap,
                                    p.wanted, token_block, vocab_block);
}

// The bf16 kernel's logits h W^T ([M, V] float32) of bf16 hidden [M, d] and weight [V, d], on
// the calling thread: the product the engine uses for bf16 models, exposed for its tests.
Tensor bf16_logits(const Tensor& hidden, const Tensor& weight) {
  check_cpu(hidden, "hidden");
  check_cpu(weight, "weight");
  TORCH_CHECK(bf16_gemm::available(),
              "wmss_native: the bf16 kernel is not built for this CPU (no AVX512-BF16)");
  TORCH_CHECK(hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "wmss_native: bf16_logits takes bfloat16 hidden and weight, got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) &&
                  hidden.size(1) > 0,
              "wmss_native: bf16_logits takes hidden [M, d] and weight [V, d] with d > 0, got ",
              hidden.sizes(), " and ", weight.sizes());
  Tensor out = at::empty({hidden.size(0), weight.size(0)}, hidden.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.zero_();
  bf16_gemm::logits(bf16_gemm::as_pairs(hidden), bf16_gemm::pack_panels(weight), weight.size(0),
                    out.data_ptr<float>(), out.stride(0));
  return out;
}

// Whether the engine computes bf16 models' logits with the kernel now (built for this CPU and
// not turned off by WMSS_NATIVE_BF16=0).
bool bf16_kernel_available() { return bf16_kernel_enabled(); }

}  // namespace wmss_native

TORCH_LIBRARY(wmss_native, m) {
  m.def("mixed_forward(Tensor strong_hidden, Tensor strong_weight, Tensor? strong_bias, "
        "Tensor weak_hidden, Tensor weak_weight, Tensor? weak_bias, Tensor labels, float lam, "
        "float? softcap, float? gap_threshold, int ignore_index, int token_block, "
        "int vocab_block) -> Tensor[]");
  m.def("mixed_forward_grads(Tensor strong_hidden, Tensor strong_weight, Tensor? strong_bias, "
        "Tensor weak_hidden, Tensor weak_weight, Tensor? weak_bias, Tensor labels, float lam, "
        "float? softcap, float? gap_threshold, int ignore_index, bool[] requests, int chunk, "
        "int vocab_block) -> Tensor[]");
  m.def("single_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
        "float? softcap, int ignore_index, int token_block, int vocab_block) -> Tensor[]");
  m.def("mixed_backward(Tensor strong_hidden, Tensor strong_weight, Tensor? strong_bias, "
        "Tensor weak_hidden, Tensor weak_weight, Tensor? weak_bias, Tensor labels, "
        "Tensor max_strong, Tensor logsum_strong, Tensor max_mix, Tensor logsum_mix, "
        "Tensor coef_mix, Tensor? coef_strong, float lam, float? softcap, bool[] requests, "
        "int token_block, int vocab_block) -> Tensor[]");
  m.def("bf16_logits(Tensor hidden, Tensor weight) -> Tensor");
  m.def("bf16_kernel_available() -> bool", &wmss_native::bf16_kernel_available);
}

TORCH_LIBRARY_IMPL(wmss_native, CPU, m) {
  m.impl("mixed_forward", &wmss_native::mixed_forward);
  m.impl("mixed_forward_grads", &wmss_native::mixed_forward_grads);
  m.impl("single_stats", &wmss_native::single_stats);
  m.impl("mixed_backward", &wmss_native::mixed_backward);
  m.impl("bf16_logits", &wmss_native::bf16_logits);
}
