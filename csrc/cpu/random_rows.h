// Runs of consecutive Philox offsets for the CPU kernels, vectorised (docs/design.md §3).
//
// Each function treats the n offsets first, first + 1, ..., first + n − 1 and returns what svp/philox.h and
// svp/math.h give element by element: the words and the dropout masks bit for bit, the implicit R to float32
// rounding of log and cos (vector polynomials here, libm there). The words come from AVX-512 or AVX2
// integer multiplies when the CPU has them (checked once), else from the scalar svp::philox4x32_10.
#pragma once

#include <cstdint>

namespace svp::cpu {

// out[i] = implicit_normal(proj_seed, first + i, std): std · sqrt(−2 ln u1) · cos(2π u2), in float32.
void implicit_normals(uint64_t proj_seed, uint64_t first, int64_t n, float std, float* out);
void implicit_normals(uint64_t proj_seed, uint64_t first, int64_t n, float std, double* out);

// out[i] = dropped_value(source[i], word0(seed, first + i), p, scale); out may be source.
void dropout_run(uint64_t seed, uint64_t first, int64_t n, float p, float scale, const float* source, float* out);
void dropout_run(uint64_t seed, uint64_t first, int64_t n, float p, double scale, const double* source,
                 double* out);

}  // namespace svp::cpu
