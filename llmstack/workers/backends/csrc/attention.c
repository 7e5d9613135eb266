/* Attention on CPU, float32, over llmstack's static per-slot KV cache: for each sequence, write its new
 * keys and values into its cache slot, then attend causally from each new token (a prompt's tokens at
 * prefill, one token at decode), with grouped-query heads read in place.
 *
 * Why not torch's scaled_dot_product_attention: at decode each (sequence, KV head) is a [group x dim] by
 * [dim x length] product, far too small for its blocked flash kernel, whose per-block overhead then costs
 * more than the arithmetic (measured: most of a batch-16 step's per-sequence cost on the tiny model); at
 * prefill it needs one call per sequence plus separate cache writes. Here the scores of 8 keys are computed
 * together and reduced with one transpose-and-add, the softmax uses a vectorized exp, the weighted sum keeps
 * its accumulators in registers, and one call serves every sequence of a step.
 *
 * Layout (t: the index of a new token in the step, its sequence's tokens consecutive, sequences in order):
 *   q             query head j of token t at q + t * q_stride + j * dim; j = kv_head * group + g
 *   k_new, v_new  KV head h of token t at k_new + t * k_stride + h * dim (v_new, v_stride alike)
 *   out           query head j of token t at out + t * out_stride + j * dim
 *   k, v          cache base pointers; element (slot, head, pos, d) at
 *                 slot * s_slot + head * s_head + pos * s_pos + d (d contiguous)
 *   slots[s]      the cache slot of sequence s
 *   starts[s]     the position of its first new token (0 at prefill, the tokens already cached at decode)
 *   counts[s]     how many new tokens it has
 *   scratch       at least group * max(starts[s] + counts[s]) floats
 * Returns 0, or -1 if a count is not positive or a start negative.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMSTACK_AVX2 1
#endif

#ifdef LLMSTACK_AVX2
/* [sum(a0), sum(a1), ..., sum(a7)] */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* exp(x) for x <= 0 (softmax after subtracting the maximum): 2^n * p(r), relative error ~2e-7. */
static inline __m256 exp_neg(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    x = _mm256_max_ps(x, lo);
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
    return acc;
}

/* scores[w] = scale * <q, keys[w]> for w < n. */
static void scores_row(const float *q, const float *keys, int64_t s_pos, int64_t n, int64_t dim, float scale,
                       float *scores) {
    int64_t w = 0;
#ifdef LLMSTACK_AVX2
    if (dim % 8 == 0) {
        const __m256 vscale = _mm256_set1_ps(scale);
        for (; w + 8 <= n; w += 8) {
            const float *k0 = keys + w * s_pos;
            __m256 a[8];
            for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 qd = _mm256_loadu_ps(q + d);
                for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k0 + i * s_pos + d), a[i]);
            }
            _mm256_storeu_ps(scores + w,
                             _mm256_mul_ps(vscale, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])));
        }
    }
#endif
    for (; w < n; ++w) scores[w] = scale * dot(q, keys + w * s_pos, dim);
}

/* p[w] = softmax(p)[w], in place. */
static void softmax(float *p, int64_t n) {
    float top = p[0];
    for (int64_t w = 1; w < n; ++w) top = p[w] > top ? p[w] : top;
    float total = 0.0f;
    int64_t w = 0;
#ifdef LLMSTACK_AVX2
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 vtotal = _mm256_setzero_ps();
    for (; w + 8 <= n; w += 8) {
        __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + w), vtop));
        _mm256_storeu_ps(p + w, e);
        vtotal = _mm256_add_ps(vtotal, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vtotal);
    for (int i = 0; i < 8; ++i) total += lanes[i];
#endif
    for (; w < n; ++w) {
        p[w] = expf(p[w] - top);
        total += p[w];
    }
    const float inv = 1.0f / total;
    for (w = 0; w < n; ++w) p[w] *= inv;
}

/* out = sum_w p[w] * values[w]. */
static void weighted_sum(const float *p, const float *values, int64_t s_pos, int64_t n, int64_t dim,
                         float *out) {
    int64_t d = 0;
#ifdef LLMSTACK_AVX2
    for (; d + 32 <= dim; d += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t w = 0; w < n; ++w) {
            const float *vw = values + w * s_pos + d;
            const __m256 pw = _mm256_broadcast_ss(p + w);
            a0 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(vw), a0);
            a1 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(vw + 8), a1);
            a2 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(vw + 16), a2);
            a3 = _mm256_fmadd_ps(pw, _mm256_loadu_ps(vw + 24), a3);
        }
        _mm256_storeu_ps(out + d, a0);
        _mm256_storeu_ps(out + d + 8, a1);
        _mm256_storeu_ps(out + d + 16, a2);
        _mm256_storeu_ps(out + d + 24, a3);
    }
#endif
    for (; d < dim; ++d) {
        float acc = 0.0f;
        for (int64_t w = 0; w < n; ++w) acc += p[w] * values[w * s_pos + d];
        out[d] = acc;
    }
}

int llmstack_attention_f32(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                           const float *v_new, int64_t v_stride, float *out, int64_t out_stride, float *k,
                           float *v, int64_t s_slot, int64_t s_head, int64_t s_pos, const int64_t *slots,
                           const int64_t *starts, const int64_t *counts, int64_t num_seqs, int64_t kv_heads,
                           int64_t group, int64_t dim, float scale, float *scratch) {
    int64_t t0 = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t start = starts[s], count = counts[s];
        if (count <= 0 || start < 0) return -1;
        for (int64_t h = 0; h < kv_heads; ++h) {
            const int64_t base = slots[s] * s_slot + h * s_head;
            for (int64_t i = 0; i < count; ++i) {
                memcpy(k + base + (start + i) * s_pos, k_new + (t0 + i) * k_stride + h * dim,
                       (size_t)dim * sizeof(float));
                memcpy(v + base + (start + i) * s_pos, v_new + (t0 + i) * v_stride + h * dim,
                       (size_t)dim * sizeof(float));
            }
            for (int64_t i = 0; i < count; ++i) {
                const int64_t n = start + i + 1; /* causal: keys 0 .. its own position */
                /* The group's query heads one after another over the same keys, then over the same
                 * values, while those are still in L1/L2 (measured: a batch-16 step of the tiny model
                 * 7 % faster than one head's keys, softmax and values at a time). */
                for (int64_t g = 0; g < group; ++g)
                    scores_row(q + (t0 + i) * q_stride + (h * group + g) * dim, k + base, s_pos, n, dim, scale,
                               scratch + g * n);
                for (int64_t g = 0; g < group; ++g) softmax(scratch + g * n, n);
                for (int64_t g = 0; g < group; ++g)
                    weighted_sum(scratch + g * n, v + base, s_pos, n, dim,
                                 out + (t0 + i) * out_stride + (h * group + g) * dim);
            }
        }
        t0 += count;
    }
    return 0;
}
