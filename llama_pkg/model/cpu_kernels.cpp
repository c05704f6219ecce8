// The CPU engine's kernels: the 4-bit product (below), the 8-bit one (tile8: the lm head, LLAMA_PKG_CPU_WEIGHTS=int8)
// and the decode step (every layer of a batch of decode rows
// in one call: RMSNorm, the products, RoPE, the bf16 cache writes, softmax attention, SiLU, residual adds; each
// row apart from the others, attention one task per (row, key head) over that row's positions).
//
// The 4-bit product, y = x @ W.T, W[n, k] = d[g, n] * q[n, k] + m[g, n] (q in 0..15, g = k / group),
// with x quantized to int8 in blocks of 32 (llama.cpp's Q4_1 x Q8_1 scheme): each block's 32 products are summed
// exactly in int32 (VNNI's vpdpbusd, or AVX2's maddubs + madd: the same integers), then scaled in float32 in an
// order fixed by K and the group alone. A row's bits depend neither on the other rows nor on the thread count
// (threads split the outputs), nor on which of the two builds runs. Built by cpu_kernels.py, twice: USE_VNNI=1
// (AVX-512 VNNI + VL) and USE_VNNI=0 (AVX2 + FMA); the Python side picks by the CPU's flags.
//
// Weight layout (cpu_kernels.Packed): outputs in tiles of 8, each tile's groups one after the other; a group is
// its blocks of 32 inputs, 128 bytes each, then d and m of its 8 outputs in fp16 (32 bytes). A block's 128 bytes
// are four 32-byte vectors h = 0..3 whose byte 4 * i + j holds q[8 t + i][32 b + 4 h + j] in its low nibble and
// q[8 t + i][32 b + 4 (h + 4) + j] in its high one, so that one vpdpbusd against 4 broadcast activation bytes
// gives 8 outputs' partial sums, lane i output i. One tile's bytes are one stream the prefetcher follows.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#define QK 32
#define MAX_HEAD_DIM 256  // the decode step's limit (Llama: 64 or 128)
#ifndef PREFETCH
#define PREFETCH 1024
#endif

#if USE_VNNI
#define NAME(x) x##_vnni
static inline __m256i dot4(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
#else
#define NAME(x) x##_avx2
static inline __m256i dot4(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
extern "C" int cpu_kernels_has_vnni(void) {
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}
extern "C" int cpu_kernels_has_avx2(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif


struct Part {  // one Linear: 4 bits in the layout above, or 8 (tile8); perm: act-order's input order (or null)
    int n, k, group, bits;
    const uint8_t* qs;
    const int64_t* perm;
};
struct Lin {  // Linears that read one input, outputs side by side
    int parts;
    Part part[3];
};

// Rows [r0, r1) of x (columns in perm's order) -> xq (int8, per 32-block scale dx = amax / 127, round to nearest
// even) and xs[r, g], the group's sum of dx * sum(xq) (what the min term m multiplies).
static void quantize(int r0, int r1, int K, int group, const float* x, long ldx, const int64_t* perm, int8_t* xq,
                     float* dx, float* xs) {
    const int nb = K / QK, bpg = group / QK, G = K / group;
    float block[QK];
    for (int r = r0; r < r1; r++) {
        const float* xr = x + (long)r * ldx;
        for (int b = 0; b < nb; b++) {
            for (int j = 0; j < QK; j++) block[j] = xr[perm ? perm[b * QK + j] : b * QK + j];
            float amax = 0.f;
            for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(block[j]));
            const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int j = 0; j < QK; j++) {
                const int v = (int)nearbyintf(block[j] * inv);
                xq[(long)r * K + b * QK + j] = (int8_t)v;
                sum += v;
            }
            dx[(long)r * nb + b] = scale;
            float* xg = xs + (long)r * G + b / bpg;
            *xg = fmaf(scale, (float)sum, b % bpg ? *xg : 0.f);
        }
    }
}

// The int32 sums of one block of 32 inputs for T tiles of 8 outputs: w[u][h] holds tile u's weights of inputs
// 4h..4h+3 (byte 4 * i + j: output i, input 4h + j), xp the row's 32 int8 inputs as 8 int32.
// 4 bits: w in 0..15 (unsigned) times x. 8 bits: |x| times sign(w, x), which keeps AVX2's maddubs pairs within
// int16 (127 * 127 * 2). Either way the exact integer sums, the same from both builds.
template <int T, int BITS>
static inline void block_sums(const __m256i (*w)[8], const int32_t* xp, __m256i* sums) {
    __m256i s0[T], s1[T];
    for (int u = 0; u < T; u++) s0[u] = s1[u] = _mm256_setzero_si256();
    for (int h = 0; h < 4; h++) {
        const __m256i x0 = _mm256_set1_epi32(xp[h]), x1 = _mm256_set1_epi32(xp[h + 4]);
        if constexpr (BITS == 8) {
            const __m256i a0 = _mm256_abs_epi8(x0), a1 = _mm256_abs_epi8(x1);
            for (int u = 0; u < T; u++) {
                s0[u] = dot4(s0[u], a0, _mm256_sign_epi8(w[u][h], x0));
                s1[u] = dot4(s1[u], a1, _mm256_sign_epi8(w[u][h + 4], x1));
            }
        } else {
            for (int u = 0; u < T; u++) {
                s0[u] = dot4(s0[u], w[u][h], x0);
                s1[u] = dot4(s1[u], w[u][h + 4], x1);
            }
        }
    }
    for (int u = 0; u < T; u++) sums[u] = _mm256_add_epi32(s0[u], s1[u]);
}

// R rows x T tiles of 8 outputs from tile t0. Per (tile, group): bpg blocks of 128 bytes, then d[8] and m[8] in fp16.
template <int R, int T>
static inline void tile(int t0, int K, int G, int bpg, const uint8_t* qs, const int8_t* xq, const float* dx,
                        const float* xs, float* y, long ldy) {
    const int nb = K / QK;
    const long group_bytes = bpg * 128 + 32, tile_bytes = G * group_bytes;
    const __m256i low = _mm256_set1_epi8(0xF);
    __m256 acc[R][T], mins[R][T];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < T; u++) acc[r][u] = mins[r][u] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256 gacc[R][T];
        for (int r = 0; r < R; r++)
            for (int u = 0; u < T; u++) gacc[r][u] = _mm256_setzero_ps();
        for (int bb = 0; bb < bpg; bb++) {
            const int b = g * bpg + bb;
            __m256i w[T][8];
            for (int u = 0; u < T; u++) {
                const uint8_t* p = qs + (long)(t0 + u) * tile_bytes + (long)g * group_bytes + bb * 128;
                _mm_prefetch((const char*)p + PREFETCH, _MM_HINT_T0);
                _mm_prefetch((const char*)p + PREFETCH + 64, _MM_HINT_T0);
                for (int h = 0; h < 4; h++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 32 * h));
                    w[u][h] = _mm256_and_si256(v, low);
                    w[u][h + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                }
            }
            for (int r = 0; r < R; r++) {
                __m256i sums[T];
                block_sums<T, 4>(w, (const int32_t*)(xq + (long)r * K + b * QK), sums);
                const __m256 scale = _mm256_set1_ps(dx[(long)r * nb + b]);
                for (int u = 0; u < T; u++)
                    gacc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[u]), scale, gacc[r][u]);
            }
        }
        for (int u = 0; u < T; u++) {
            const __m128i* dm = (const __m128i*)(qs + (long)(t0 + u) * tile_bytes + (long)g * group_bytes + bpg * 128);
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(dm)), mv = _mm256_cvtph_ps(_mm_loadu_si128(dm + 1));
            for (int r = 0; r < R; r++) {
                acc[r][u] = _mm256_fmadd_ps(gacc[r][u], dv, acc[r][u]);
                mins[r][u] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[(long)r * G + g]), mins[r][u]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < T; u++)
            _mm256_storeu_ps(y + (long)r * ldy + (t0 + u) * 8, _mm256_add_ps(acc[r][u], mins[r][u]));
}

// 8-bit weights (int8, -127..127, one float32 scale per output): per (tile, block) 256 bytes, eight 32-byte
// vectors h = 0..7 whose byte 4 * i + j holds w[8 t + i][32 b + 4 h + j]; after a tile's blocks, its 8 scales.
template <int R, int T>
static inline void tile8(int t0, int K, const uint8_t* qs, const int8_t* xq, const float* dx, float* y, long ldy) {
    const int nb = K / QK;
    const long tile_bytes = (long)nb * 256 + 32;
    __m256 acc[R][T];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < T; u++) acc[r][u] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i w[T][8];
        for (int u = 0; u < T; u++) {
            const uint8_t* p = qs + (long)(t0 + u) * tile_bytes + (long)b * 256;
            _mm_prefetch((const char*)p + 2 * PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2 * PREFETCH + 64, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2 * PREFETCH + 128, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 2 * PREFETCH + 192, _MM_HINT_T0);
            for (int h = 0; h < 8; h++) w[u][h] = _mm256_loadu_si256((const __m256i*)(p + 32 * h));
        }
        for (int r = 0; r < R; r++) {
            __m256i sums[T];
            block_sums<T, 8>(w, (const int32_t*)(xq + (long)r * K + b * QK), sums);
            const __m256 scale = _mm256_set1_ps(dx[(long)r * nb + b]);
            for (int u = 0; u < T; u++) acc[r][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[u]), scale, acc[r][u]);
        }
    }
    for (int u = 0; u < T; u++) {
        const __m256 sv = _mm256_loadu_ps((const float*)(qs + (long)(t0 + u) * tile_bytes + (long)nb * 256));
        for (int r = 0; r < R; r++) _mm256_storeu_ps(y + (long)r * ldy + (t0 + u) * 8, _mm256_mul_ps(acc[r][u], sv));
    }
}

template <int R>
static void tiles(int bits, int ta, int tb, int K, int G, int bpg, const uint8_t* qs, const int8_t* xq,
                  const float* dx, const float* xs, float* y, long ldy) {
    int t = ta;
    if (bits == 8) {
        for (; t + 2 <= tb; t += 2) tile8<R, 2>(t, K, qs, xq, dx, y, ldy);
        for (; t < tb; t++) tile8<R, 1>(t, K, qs, xq, dx, y, ldy);
        return;
    }
    for (; t + 2 <= tb; t += 2) tile<R, 2>(t, K, G, bpg, qs, xq, dx, xs, y, ldy);
    for (; t < tb; t++) tile<R, 1>(t, K, G, bpg, qs, xq, dx, xs, y, ldy);
}

// y[:, part's columns] = x @ part.T for each part: x float32 [M, K] (row stride ldx), y float32 (row stride ldy).
static void linear(const Lin* lin, int M, const float* x, long ldx, float* y, long ldy, int threads) {
    const int K = lin->part[0].k;
    int8_t* xq = (int8_t*)malloc((size_t)M * K);
    float* dx = (float*)malloc(sizeof(float) * (size_t)M * 2 * (K / QK));  // dx, then xs (K / group <= K / QK)
    for (int p = 0, col = 0; p < lin->parts; col += lin->part[p].n, p++) {
        const Part* part = &lin->part[p];
        const int nb = K / QK, G = K / part->group, bpg = part->group / QK, n_tiles = part->n / 8;
        float* xs = dx + (size_t)M * nb;
        const bool again = p > 0 && lin->part[p - 1].group == part->group && lin->part[p - 1].perm == part->perm;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            if (!again) {  // the parts of one Linear share their quantized input when they read it alike
                const int rows = (M + T - 1) / T, r0 = t * rows < M ? t * rows : M, r1 = r0 + rows < M ? r0 + rows : M;
                quantize(r0, r1, K, part->group, x, ldx, part->perm, xq, dx, xs);
#pragma omp barrier
            }
            const int per = (n_tiles + T - 1) / T;
            const int ta = t * per < n_tiles ? t * per : n_tiles, tb = ta + per < n_tiles ? ta + per : n_tiles;
            int r = 0;
            for (; r + 4 <= M; r += 4)
                tiles<4>(part->bits, ta, tb, K, G, bpg, part->qs, xq + (long)r * K, dx + (long)r * nb, xs + (long)r * G,
                         y + r * ldy + col, ldy);
            for (; r < M; r++)
                tiles<1>(part->bits, ta, tb, K, G, bpg, part->qs, xq + (long)r * K, dx + (long)r * nb, xs + (long)r * G,
                         y + r * ldy + col, ldy);
        }
    }
    free(xq);
    free(dx);
}

extern "C" void NAME(int_linear)(const Lin* lin, int M, const float* x, long ldx, float* y, long ldy, int threads) {
    linear(lin, M, x, ldx, y, ldy, threads);
}

// -- the decode step: every layer of a batch of decode rows (one new position each) in one call ----------------

struct Layer {
    const float *attn_norm, *mlp_norm;
    Lin qkv, o, gate_up, down;
    uint16_t *keys, *values;  // bf16 [slots, kv_heads, head_dim]
};
struct Model {
    int layers, dim, heads, kv_heads, head_dim, inter;
    float eps;
    const float *cos, *sin;  // [context, head_dim / 2]
    const float* final_norm;
    const Layer* layer;
};

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256 exp8(__m256 x) {  // Cephes' expf: a degree-5 polynomial times 2^n, within 2 ulp; x >= -87.3
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline __m256 bf16x8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// where position j's key (or value) head kh sits in the cache, from the row's block table
static inline long head_offset(const int32_t* table, long j, int block_size, int KV, int hd, int kh) {
    return ((long)table[j / block_size] * block_size + j % block_size) * KV * hd + kh * hd;
}

// h = rms_norm(x) * w over rows of n (n % 8 == 0)
static void rms_norm(int M, int n, const float* x, const float* w, float eps, float* h) {
    for (int r = 0; r < M; r++) {
        const float* xr = x + (long)r * n;
        __m256 ss = _mm256_setzero_ps();
        for (int i = 0; i < n; i += 8) ss = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), _mm256_loadu_ps(xr + i), ss);
        const __m256 scale = _mm256_set1_ps(1.f / sqrtf(hsum(ss) / n + eps));
        for (int i = 0; i < n; i += 8)
            _mm256_storeu_ps(h + (long)r * n + i,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), scale), _mm256_loadu_ps(w + i)));
    }
}

// the half-split rotation (Hugging Face's layout) of `count` heads of dim d at one position
static void rope(float* v, int count, int d, const float* cos, const float* sin) {
    const int half = d / 2;
    for (int h = 0; h < count; h++, v += d)
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = fmaf(a, cos[i], -b * sin[i]);
            v[i + half] = fmaf(b, cos[i], a * sin[i]);
        }
}

extern "C" void NAME(decode_step)(const Model* md, int M, float* x, float* out, const int64_t* positions,
                                  const int64_t* write, const int32_t* tables, long table_stride,
                                  const int64_t* table_rows, int block_size, int threads) {
    const int D = md->dim, H = md->heads, KV = md->kv_heads, hd = md->head_dim, I = md->inter, groups = H / KV;
    const int qkv_n = (H + 2 * KV) * hd;
    long longest = 0;
    for (int r = 0; r < M; r++) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    float* h = (float*)malloc(sizeof(float) * (size_t)M * D);
    float* tmp = (float*)malloc(sizeof(float) * (size_t)M * D);
    float* qkv = (float*)malloc(sizeof(float) * (size_t)M * qkv_n);
    float* att = (float*)malloc(sizeof(float) * (size_t)M * H * hd);
    float* gu = (float*)malloc(sizeof(float) * (size_t)M * 2 * I);
    float* act = (float*)malloc(sizeof(float) * (size_t)M * I);
    const long score_len = (longest + 7) / 8 * 8;
    float* scores = (float*)malloc(sizeof(float) * (size_t)M * KV * groups * score_len);
    rms_norm(M, D, x, md->layer[0].attn_norm, md->eps, h);
    for (int l = 0; l < md->layers; l++) {
        const Layer* L = &md->layer[l];
        linear(&L->qkv, M, h, D, qkv, qkv_n, threads);
        for (int r = 0; r < M; r++) {
            float* row = qkv + (long)r * qkv_n;
            const float* c = md->cos + positions[r] * (hd / 2);
            const float* s = md->sin + positions[r] * (hd / 2);
            rope(row, H + KV, hd, c, s);
            uint16_t* k = L->keys + write[r] * KV * hd;
            uint16_t* v = L->values + write[r] * KV * hd;
            for (int i = 0; i < KV * hd; i++) {
                k[i] = to_bf16(row[H * hd + i]);
                v[i] = to_bf16(row[(H + KV) * hd + i]);
            }
        }
        // softmax attention of each (row, key head): its query heads over positions 0..p, float32 sums in
        // an order set by the length alone
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int task = 0; task < M * KV; task++) {
            const int r = task / KV, kh = task % KV;
            const long n = positions[r] + 1, padded = (n + 7) / 8 * 8;
            const float* q = qkv + (long)r * qkv_n + kh * groups * hd;
            float* sc = scores + (long)task * groups * score_len;
            const int32_t* table = tables + table_rows[r] * table_stride;
            const float scale = 1.f / sqrtf((float)hd);
            for (long j = 0; j < n; j++) {
                const uint16_t* kj = L->keys + head_offset(table, j, block_size, KV, hd, kh);
                for (int g = 0; g < groups; g++) {
                    __m256 a = _mm256_setzero_ps();
                    for (int i = 0; i < hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + i), bf16x8(kj + i), a);
                    sc[g * score_len + j] = hsum(a) * scale;
                }
            }
            for (int g = 0; g < groups; g++) {
                float* sg = sc + g * score_len;
                float top = sg[0];
                for (long j = 1; j < n; j++) top = fmaxf(top, sg[j]);
                for (long j = n; j < padded; j++) sg[j] = top;  // exp(0) = 1, cleared below
                __m256 total = _mm256_setzero_ps();
                for (long j = 0; j < padded; j += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), _mm256_set1_ps(top)));
                    if (j + 8 > n) {
                        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)), lane)));
                    }
                    _mm256_storeu_ps(sg + j, e);
                    total = _mm256_add_ps(total, e);
                }
                const float inv = 1.f / hsum(total);
                float* o = att + (long)r * H * hd + (kh * groups + g) * hd;
                __m256 a[MAX_HEAD_DIM / 8];
                for (int i = 0; i < hd / 8; i++) a[i] = _mm256_setzero_ps();
                for (long j = 0; j < n; j++) {
                    const uint16_t* vj = L->values + head_offset(table, j, block_size, KV, hd, kh);
                    const __m256 p = _mm256_set1_ps(sg[j]);
                    for (int i = 0; i < hd / 8; i++) a[i] = _mm256_fmadd_ps(p, bf16x8(vj + 8 * i), a[i]);
                }
                for (int i = 0; i < hd / 8; i++) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(a[i], _mm256_set1_ps(inv)));
            }
        }
        linear(&L->o, M, att, H * hd, tmp, D, threads);
        for (long i = 0; i < (long)M * D; i++) x[i] += tmp[i];
        rms_norm(M, D, x, L->mlp_norm, md->eps, h);
        linear(&L->gate_up, M, h, D, gu, 2 * I, threads);
        for (int r = 0; r < M; r++)
            for (int i = 0; i < I; i += 8) {
                const __m256 g = _mm256_loadu_ps(gu + (long)r * 2 * I + i), u = _mm256_loadu_ps(gu + (long)r * 2 * I + I + i);
                const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
                _mm256_storeu_ps(act + (long)r * I + i, _mm256_mul_ps(silu, u));
            }
        linear(&L->down, M, act, I, tmp, D, threads);
        for (long i = 0; i < (long)M * D; i++) x[i] += tmp[i];
        rms_norm(M, D, x, l + 1 < md->layers ? md->layer[l + 1].attn_norm : md->final_norm, md->eps,
                 l + 1 < md->layers ? h : out);
    }
    free(h); free(tmp); free(qkv); free(att); free(gu); free(act); free(scores);
}
