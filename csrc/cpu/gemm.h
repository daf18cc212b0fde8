// Two small dense products, register-blocked and vectorised, shared by the CPU kernels.
//
// Row-major matrices with leading dimensions (ld). Each output element sums its terms in an order
// fixed by the shapes alone (never by the thread count or the vector width of the clone picked at load
// time), and neither function allocates or spawns threads: callers split the work. The x86-64-v3 and v4
// clones fuse each multiply-add (one rounding), so every CPU with FMA gets the same bits; the baseline
// clone, for x86-64 CPUs without FMA, rounds each product first and may differ in the last bits.
#pragma once

#include <cstdint>

namespace svp::cpu {

// out (rows × cols) += x (rows × width) · yᵀ, with y (cols × width): dot products along contiguous rows.
void gemm_nt_accumulate(const float* x, int64_t ldx, int64_t rows, const float* y, int64_t ldy, int64_t cols,
                        int64_t width, float* out, int64_t ldo);
void gemm_nt_accumulate(const double* x, int64_t ldx, int64_t rows, const double* y, int64_t ldy, int64_t cols,
                        int64_t width, double* out, int64_t ldo);

// out (rows × width) = a (rows × inner) · m (inner × width), or out += a · m when `accumulate`;
// terms summed over inner in increasing order.
void gemm_nn(const float* a, int64_t lda, int64_t rows, const float* m, int64_t ldm, int64_t inner, int64_t width,
             float* out, int64_t ldo, bool accumulate);
void gemm_nn(const double* a, int64_t lda, int64_t rows, const double* m, int64_t ldm, int64_t inner,
             int64_t width, double* out, int64_t ldo, bool accumulate);

// out (rows × width) = aᵀ · m, or out += aᵀ · m when `accumulate`, with a stored as (inner × rows): the same
// sums as gemm_nn on the transposed a, in the same order, without the transposed copy.
void gemm_tn(const double* a, int64_t lda, int64_t rows, const double* m, int64_t ldm, int64_t inner,
             int64_t width, double* out, int64_t ldo, bool accumulate);

}  // namespace svp::cpu
