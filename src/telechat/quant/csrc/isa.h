// The kernels of qgemm_kernel.cpp, compiled once per instruction set, and the one chosen at run time
// (qgemm_op.cpp). Shared by the operator files.
#pragma once
#include <cstdint>

#define TC_DECLARE(SUFFIX)                                                                                        \
    extern "C" __attribute__((weak)) void telechat_quantize_rows##SUFFIX(const float *, int64_t, int64_t, int64_t, \
                                                                         int8_t *, float *, float *);              \
    extern "C" __attribute__((weak)) void telechat_qgemm##SUFFIX(                                                 \
        const int8_t *, const float *, const float *, int64_t, const uint8_t *, const uint16_t *, const uint16_t *, \
        const uint8_t *, const float *, float *, int64_t, int64_t, int64_t, int, int64_t, int64_t, float *);      \
    extern "C" __attribute__((weak)) void telechat_dgemm##SUFFIX(const float *, const void *, int, const float *,  \
                                                                 float *, int64_t, int64_t, int64_t, int64_t,      \
                                                                 int64_t);                                         \
    extern "C" __attribute__((weak)) void telechat_attend##SUFFIX(const float *, const void *, const void *, int,  \
                                                                  int64_t, const int64_t *, int64_t, int64_t,      \
                                                                  float, float *, float *);
TC_DECLARE(_portable)
TC_DECLARE(_avx2)
TC_DECLARE(_avx512)

namespace telechat {

struct Isa {
    const char *name;
    decltype(&telechat_quantize_rows_portable) quantize;
    decltype(&telechat_qgemm_portable) qgemm;
    decltype(&telechat_dgemm_portable) dgemm;
    decltype(&telechat_attend_portable) attend;
};

// The instruction set in use (TELECHAT_CPU_ISA / telechat::cpu_isa may lower it).
const Isa *active_isa();

}  // namespace telechat
