// Prototype: one XLA FFI CPU call that runs the float32 Adam update of every leaf
// in a single pass (reads g, m, v once; writes u, m, v), split across XLA's
// intra-op thread pool. m and v are aliased to their outputs, so they are
// updated in place.
//
// The arithmetic is the one XLA:CPU emits for adam_jax.scale_by_adam under jit
// (float32, bias correction on, eps_root = 0, no Nesterov), operation for
// operation, so the results are bitwise those of the jitted step. Two things
// XLA does that the formulas don't show are reproduced: its LLVM backend
// contracts a*b + c*d into fma(a, b, c*d), and its algebraic simplifier turns
// x / broadcast(c) into x * broadcast(1/c). Compile with -ffp-contract=off so
// that the compiler contracts nothing else:
//   m' = fma(1-b1, g, b1*m)
//   v' = fma(1-b2, g*g, b2*v)
//   u  = (m' * r1) / (sqrt(v' * r2) + eps)      r1 = 1/(1-b1^t), r2 = 1/(1-b2^t)
// The scalars arrive from the jitted graph.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Span {
  const float* g;
  float* u;
  float* m;  // read and written in place (aliased to its input)
  float* v;
  int64_t n;
};

struct Scalars {
  float b1, omb1, b2, omb2, r1, r2, eps;
};

void Kernel(const Scalars& s, const Span& sp, int64_t lo, int64_t hi) {
  const float* __restrict g = sp.g;
  float* __restrict u = sp.u;
  float* __restrict m = sp.m;
  float* __restrict v = sp.v;
  const float b1 = s.b1, omb1 = s.omb1, b2 = s.b2, omb2 = s.omb2;
  const float r1 = s.r1, r2 = s.r2, eps = s.eps;
  for (int64_t i = lo; i < hi; ++i) {
    const float gi = g[i];
    const float mn = std::fma(omb1, gi, b1 * m[i]);
    const float vn = std::fma(omb2, gi * gi, b2 * v[i]);
    m[i] = mn;
    v[i] = vn;
    u[i] = (mn * r1) / (std::sqrt(vn * r2) + eps);
  }
}

ffi::Error AdamF32(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const size_t nargs = args.size();
  if ((nargs - 1) % 3 != 0 || rets.size() != nargs - 1) {
    return ffi::Error::InvalidArgument("expected scalars, then g, m, v leaves");
  }
  const size_t L = (nargs - 1) / 3;
  auto sc = args.get<ffi::AnyBuffer>(0);
  if (sc.has_error()) return sc.error();
  const float* s = static_cast<const float*>(sc->untyped_data());
  const Scalars scal{s[0], s[1], s[2], s[3], s[4], s[5], s[6]};

  std::vector<Span> spans(L);
  std::vector<int64_t> start(L + 1, 0);
  for (size_t i = 0; i < L; ++i) {
    auto g = args.get<ffi::AnyBuffer>(1 + i);
    auto m = args.get<ffi::AnyBuffer>(1 + L + i);
    auto v = args.get<ffi::AnyBuffer>(1 + 2 * L + i);
    auto u = rets.get<ffi::AnyBuffer>(i);
    auto mo = rets.get<ffi::AnyBuffer>(L + i);
    auto vo = rets.get<ffi::AnyBuffer>(2 * L + i);
    if (g.has_error() || m.has_error() || v.has_error() || u.has_error() || mo.has_error() ||
        vo.has_error()) {
      return ffi::Error::InvalidArgument("bad buffer");
    }
    // m and v are aliased to their outputs (input_output_aliases), so the
    // update runs in place; copy first should XLA ever hand over two buffers.
    float* m_out = static_cast<float*>((*mo)->untyped_data());
    float* v_out = static_cast<float*>((*vo)->untyped_data());
    const int64_t n = static_cast<int64_t>(g->element_count());
    if (m->untyped_data() != m_out) std::memcpy(m_out, m->untyped_data(), n * sizeof(float));
    if (v->untyped_data() != v_out) std::memcpy(v_out, v->untyped_data(), n * sizeof(float));
    spans[i] = Span{static_cast<const float*>(g->untyped_data()),
                    static_cast<float*>((*u)->untyped_data()), m_out, v_out, n};
    start[i + 1] = start[i] + spans[i].n;
  }
  const int64_t total = start[L];

  // Work is cut into chunks that the calling thread and pool threads take from a
  // shared counter. The caller never waits for a task to start: if the pool is
  // busy it processes every chunk itself, and late tasks find nothing to do.
  // The state is shared so that a late task never touches a finished frame.
  struct State {
    std::vector<Span> spans;
    std::vector<int64_t> start;
    Scalars scal;
    int64_t total, chunk, nchunks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto st = std::make_shared<State>();
  st->spans = std::move(spans);
  st->start = std::move(start);
  st->scal = scal;
  st->total = total;
  st->chunk = int64_t{1} << 16;
  st->nchunks = (total + st->chunk - 1) / st->chunk;

  auto work = [](State& s) {
    for (;;) {
      const int64_t c = s.next.fetch_add(1);
      if (c >= s.nchunks) return;
      int64_t lo = c * s.chunk;
      const int64_t hi = std::min(s.total, lo + s.chunk);
      size_t leaf = std::upper_bound(s.start.begin(), s.start.end(), lo) - s.start.begin() - 1;
      const size_t L = s.spans.size();
      while (lo < hi && leaf < L) {
        const int64_t end = std::min(hi, s.start[leaf + 1]);
        Kernel(s.scal, s.spans[leaf], lo - s.start[leaf], end - s.start[leaf]);
        lo = end;
        ++leaf;
      }
      if (s.done.fetch_add(1) + 1 == s.nchunks) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), st->nchunks - 1);
  for (int64_t w = 0; w < helpers; ++w) {
    pool.Schedule([st, work] { work(*st); });
  }
  work(*st);
  {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() == st->nchunks; });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamF32Handler, AdamF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .RemainingRets());
