/*
 * INT4 pack-quantized (compressed-tensors, symmetric, group-wise) -> BF16 bit patterns.
 *
 * Same arithmetic as the numpy path in dequant.py: w = bf16_rne(float(q) * float(scale)), where
 * the float product is exact, so the result is bit-identical to compressed-tensors. Written so that
 * gcc -O3 vectorises the inner loop; the caller splits rows across threads (ctypes releases the GIL).
 */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    /* NaN becomes the quiet NaN, as torch rounds it. */
    return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)0x7FC0 : rounded;
}

/*
 * Rows [row_begin, row_end) of a (rows x cols) weight. Each byte of the little-endian words holds
 * two consecutive elements (low nibble first); they become one 32-bit pair of bf16 values, so the
 * inner loop is a plain byte -> uint32 map that the compiler vectorises.
 */
void kimi_dequant_int4_rows(const uint32_t *restrict packed, const uint16_t *restrict scale, uint16_t *restrict out, int64_t cols,
                            int64_t group, int64_t row_begin, int64_t row_end) {
    const int64_t bytes_per_row = cols / 2;
    const int64_t groups_per_row = cols / group;
    const int64_t bytes_per_group = group / 2;
    for (int64_t r = row_begin; r < row_end; r++) {
        const uint8_t *restrict prow = (const uint8_t *)packed + r * bytes_per_row;
        const uint16_t *srow = scale + r * groups_per_row;
        uint32_t *restrict orow = (uint32_t *)(out + r * cols);
        for (int64_t g = 0; g < groups_per_row; g++) {
            const float s = bf16_to_f32(srow[g]);
            const uint8_t *pb = prow + g * bytes_per_group;
            uint32_t *o = orow + g * bytes_per_group;
            for (int64_t i = 0; i < bytes_per_group; i++) {
                const uint32_t b = pb[i];
                const float lo = (float)((int32_t)(b & 0xFu) - 8) * s;
                const float hi = (float)((int32_t)(b >> 4) - 8) * s;
                o[i] = (uint32_t)f32_to_bf16(lo) | ((uint32_t)f32_to_bf16(hi) << 16);
            }
        }
    }
}
