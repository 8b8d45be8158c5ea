/* ART decode attention for the CPU: one call per layer and decode step, one task per (sequence, KV head),
 * the stop check inside the block loop (so skipped blocks are never read), fp32 online-softmax state.
 * Same decisions as attention/reference.py, its oracle; built and loaded by attention/kernels/cpu.py.
 *
 * Two entry points: art_decode (a batch of sequences, each its own k/v, optional valid mask) and
 * art_decode_rows (a batch of rows of a preallocated KV pool: each batch entry reads pool row rows[i], its
 * valid positions [starts[i], lengths[i])).
 *
 * Built with -ffast-math so that expf vectorises (glibc's libmvec): nothing here may rely on infinities or
 * NaNs, hence the finite NEG sentinel for "no score" and the double-precision certified bound.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NEG (-1e30f)

typedef struct {
    int32_t B, HKV, G, T, D, NB, BS;
    int32_t dtype;            /* of k and v: 0 float32, 1 bfloat16, 2 float16 */
    int32_t q_dtype;          /* of q and of the output, same codes */
    int64_t sk_b, sk_h, sk_t; /* key strides in elements (the head dim is contiguous) */
    int64_t sv_b, sv_h, sv_t;
    int64_t sb_b, sb_h, sb_j; /* key-bound (kmin, kmax) strides in elements (the head dim is contiguous) */
    int32_t mode;             /* 0 walk every candidate, 1 stability, 2 certified, 3 skip (the keys-only
                                 comparator: every candidate's keys scored, faint blocks' values skipped) */
    int32_t patience, min_blocks, sink_tokens, recent_blocks;
    int32_t budget;           /* Quest: keep this many blocks per task (0: all) */
    int32_t quest;            /* Quest by ratio: keep max(1, ceil(quest_keep * candidate blocks)) per task */
    int32_t bounds_done;      /* blocks summarised in the key-bound buffers (-1: each row's complete blocks,
                                 lengths[i] / BS); later blocks are summarised here from k */
    int32_t nthreads;
    int32_t order_bound;      /* visit non-protected blocks by key bound (else recency) without scores */
    float tau, phi, eps;
    float scale;              /* softmax scale, for the bf16 dot path (q unscaled there) */
    double quest_keep;        /* 1 - Quest's drop ratio, in double as Python computes the budget */
    int32_t certificate;      /* certified mode: 0 mass, 1 relative, 2 absolute (value-aware: needs vmean, vspread) */
} Params;

/* The tensors of one call (NULL where absent). Batch entry i reads k, v, kmin, kmax at pool row rows[i]
 * (rows NULL: row i); starts / lengths bound its valid positions (NULL: 0 / T, then `valid` may mask).
 * The ball summaries are per batch entry (never per pool row), fp32 contiguous, computed on the host with
 * the reference's own functions: kc (B, HKV, NB, D) key centroids and kr (B, HKV, NB) key radii (box+ball
 * score bounds), vmean (B, HKV, D) and vspread (B, HKV, NB) (the value-aware certificate), skip_log (B)
 * (skip mode: ln(skip_lambda / valid positions)). */
typedef struct {
    const void *q, *k, *v;
    const uint8_t *valid;
    const float *kmin, *kmax, *scores;
    const int32_t *order_in, *rows, *starts, *lengths;
    void *out;
    int32_t *visited, *ncand, *reason;
    uint8_t *vmask;
    const float *kc, *kr, *vmean, *vspread, *skip_log;
} Buffers;

typedef struct {
    int32_t tier;             /* 2 sink, 1 recent, 0 rest, -1 no candidate position */
    float key;                /* descending */
    int32_t idx;              /* ascending on ties (the reference's stable sort) */
} Slot;

static int slot_cmp(const void *a, const void *b) {
    const Slot *x = (const Slot *)a, *y = (const Slot *)b;
    if (x->tier != y->tier) return y->tier - x->tier;
    if (x->key != y->key) return x->key < y->key ? 1 : -1;
    return x->idx - y->idx;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_BF16_DOT 1

/* r[i] = sum of the lanes of a[i], for 16 vectors at once (a transposing tree of adds) */
static inline __m512 reduce16(const __m512 a[16]) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(e[0], e[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* s[t] = scale * q . k_t for n rows of bf16 keys (D a multiple of 32, <= 256): products of bf16 pairs
 * are exact in fp32, accumulated in fp32 (vdpbf16ps) */
static inline void scores_bf16(const uint16_t *qg, const uint16_t *k0, int64_t sk_t, int n, int D, float scale,
                               float *s) {
    __m512bh qv[8];
    for (int i = 0; i < D / 32; i++) qv[i] = (__m512bh)_mm512_loadu_si512(qg + 32 * i);
    for (int t0 = 0; t0 < n; t0 += 16) {
        const int m = n - t0 < 16 ? n - t0 : 16;
        __m512 a[16];
        for (int j = 0; j < 16; j++) {
            a[j] = _mm512_setzero_ps();
            if (j < m) {
                const uint16_t *kr = k0 + (t0 + j) * sk_t;
                for (int i = 0; i < D / 32; i++)
                    a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512(kr + 32 * i), qv[i]);
            }
        }
        _mm512_mask_storeu_ps(s + t0, (__mmask16)((1u << m) - 1), _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale)));
    }
}

/* acc[g] += sum_t p[g][t] v_t for n rows of bf16 values (D a multiple of 32, G <= 8): one cache line of
 * each row at a time, the G accumulators in registers */
static inline void accumulate_bf16(const float *p, int G, int BS, const uint16_t *v0, int64_t sv_t, int n, int D,
                                   const uint8_t *vmask_rows, float *acc) {
    for (int c0 = 0; c0 < D; c0 += 32) {
        __m512 a[16];
        for (int g = 0; g < G; g++) {
            a[2 * g] = _mm512_loadu_ps(acc + g * D + c0);
            a[2 * g + 1] = _mm512_loadu_ps(acc + g * D + c0 + 16);
        }
        for (int t = 0; t < n; t++) {
            if (vmask_rows && !vmask_rows[t]) continue;
            __m512i x = _mm512_loadu_si512(v0 + t * sv_t + c0);
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16));
            __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16));
            for (int g = 0; g < G; g++) {
                __m512 pb = _mm512_set1_ps(p[g * BS + t]);
                a[2 * g] = _mm512_fmadd_ps(pb, lo, a[2 * g]);
                a[2 * g + 1] = _mm512_fmadd_ps(pb, hi, a[2 * g + 1]);
            }
        }
        for (int g = 0; g < G; g++) {
            _mm512_storeu_ps(acc + g * D + c0, a[2 * g]);
            _mm512_storeu_ps(acc + g * D + c0 + 16, a[2 * g + 1]);
        }
    }
}
#endif

static inline void load_row(const void *base, int64_t off, int dtype, int D, float *restrict dst) {
    if (dtype == 1) {
        const uint16_t *src = (const uint16_t *)base + off;
        for (int c = 0; c < D; c++) {
            uint32_t u = (uint32_t)src[c] << 16;
            float f;
            memcpy(&f, &u, 4);
            dst[c] = f;
        }
    } else if (dtype == 2) {
        const _Float16 *src = (const _Float16 *)base + off;
        for (int c = 0; c < D; c++) dst[c] = (float)src[c];
    } else {
        const float *src = (const float *)base + off;
        for (int c = 0; c < D; c++) dst[c] = src[c];
    }
}

/* The positions of block j that lie in [lo_row, hi_row): [*lo, *hi), empty when *hi <= *lo */
static inline void block_span(int j, int BS, int lo_row, int hi_row, int *lo, int *hi) {
    *lo = j * BS > lo_row ? j * BS : lo_row;
    *hi = (j + 1) * BS < hi_row ? (j + 1) * BS : hi_row;
}

static inline __attribute__((always_inline)) void walk_task_d(const Params *P, const int D, int task,
                                                              const Buffers *A) {
    const int b = task / P->HKV, h = task % P->HKV;
    const int G = P->G, NB = P->NB, BS = P->BS;
    const int r = A->rows ? A->rows[b] : b;                          /* pool row of k, v and the bounds */
    const int row_start = A->starts ? A->starts[b] : 0;              /* valid positions [row_start, row_end) */
    const int row_end = A->lengths ? A->lengths[b] : P->T;
    const int first = row_start / BS, nb_row = (row_end + BS - 1) / BS;   /* the row's blocks [first, nb_row) */
    const int bounds_done = P->bounds_done < 0 ? row_end / BS : P->bounds_done;
    const uint8_t *vrow = A->valid ? A->valid + (int64_t)b * P->T : NULL;
    const void *q_raw = A->q, *k = A->k, *v = A->v;

    int32_t *nvalid = calloc(NB, sizeof(int32_t));
    int32_t *order = malloc(sizeof(int32_t) * NB);
    Slot *slots = malloc(sizeof(Slot) * NB);
    float *ub = NULL;
    double *suffix = NULL, *wsuffix = NULL, *smax = NULL;
    float *s = malloc(sizeof(float) * G * BS);
    float *acc = calloc((size_t)G * D, sizeof(float));
    float *o = malloc(sizeof(float) * G * D);
    float *o_prev = calloc((size_t)G * D, sizeof(float));
    float *row = malloc(sizeof(float) * D);
    float m[64], l[64], alpha[64];   /* G <= 64 (checked on the host) */
    /* this group's queries, scaled, fp32; the raw bf16 ones feed the vdpbf16ps path */
    const int64_t q_off = ((int64_t)b * P->HKV * G + (int64_t)h * G) * D;
    float *qt = malloc(sizeof(float) * G * D);
    load_row(q_raw, q_off, P->q_dtype, G * D, qt);
    for (int c = 0; c < G * D; c++) qt[c] *= P->scale;
    const uint16_t *qb = P->q_dtype == 1 && P->dtype == 1 && D % 32 == 0 && D <= 256 ? (const uint16_t *)q_raw + q_off : NULL;
    const int64_t kbase = r * P->sk_b + h * P->sk_h, vbase = r * P->sv_b + h * P->sv_h;

    /* candidate blocks and the newest valid position */
    int last = row_end - 1;
    for (int j = first; j < nb_row; j++) {
        int lo, hi;
        block_span(j, BS, row_start, row_end, &lo, &hi);
        nvalid[j] = hi > lo ? hi - lo : 0;
    }
    if (vrow) {
        last = -1;
        for (int j = first; j < nb_row; j++) {
            int n = 0, lo, hi;
            block_span(j, BS, row_start, row_end, &lo, &hi);
            for (int t = lo; t < hi; t++) {
                n += vrow[t] != 0;
                if (vrow[t]) last = t;
            }
            nvalid[j] = n;
        }
    }
    const int last_block = last / BS;
    int n_cand = 0, n_protected = 0;
    for (int j = first; j < nb_row; j++) {
        n_cand += nvalid[j] > 0;
        n_protected += nvalid[j] > 0 && (j * BS < P->sink_tokens || (j <= last_block && j > last_block - P->recent_blocks));
    }
    int budget = P->budget;
    if (P->quest) {   /* Quest by ratio: this row's own share of its candidate blocks */
        const double want = ceil(P->quest_keep * (double)n_cand);
        budget = want < 1.0 ? 1 : (int)want;
    }

    const int use_bounds = P->mode == 2 || budget > 0 || P->order_bound;
    if (use_bounds) {   /* ub[g][j] >= every score of block j: sum_c max(q_c kmin_c, q_c kmax_c) */
        ub = malloc(sizeof(float) * G * NB);
        float qnorm[64];
        for (int g = 0; g < G; g++) {
            float qq = 0.f;
            for (int c = 0; c < D; c++) qq += qt[g * D + c] * qt[g * D + c];
            qnorm[g] = sqrtf(qq);
        }
        float *lo_new = malloc(sizeof(float) * D), *hi_new = malloc(sizeof(float) * D);
        const int64_t kb = r * P->sb_b + h * P->sb_h;
        for (int j = first; j < nb_row; j++) {
            const float *lo = NULL, *hi = NULL;
            if (j < bounds_done) {
                lo = A->kmin + kb + (int64_t)j * P->sb_j;
                hi = A->kmax + kb + (int64_t)j * P->sb_j;
            } else {   /* not summarised yet (the newest, partial block): from k */
                int t_lo, t_hi;
                block_span(j, BS, row_start, row_end, &t_lo, &t_hi);
                for (int c = 0; c < D; c++) { lo_new[c] = 1e30f; hi_new[c] = -1e30f; }
                for (int t = t_lo; t < t_hi; t++) {
                    if (vrow && !vrow[t]) continue;
                    load_row(k, kbase + t * P->sk_t, P->dtype, D, row);
                    for (int c = 0; c < D; c++) {
                        lo_new[c] = row[c] < lo_new[c] ? row[c] : lo_new[c];
                        hi_new[c] = row[c] > hi_new[c] ? row[c] : hi_new[c];
                    }
                }
                lo = lo_new;
                hi = hi_new;
            }
            const float *cj = A->kc ? A->kc + (task * (int64_t)NB + j) * D : NULL;
            for (int g = 0; g < G; g++) {
                const float *qg = qt + g * D;
                float acc_ub = 0.f;
                for (int c = 0; c < D; c++) {
                    float a = qg[c] * lo[c], z = qg[c] * hi[c];
                    acc_ub += a > z ? a : z;
                }
                if (cj) {   /* box+ball: also q.c_j + ||q|| r_j (Cauchy-Schwarz on the key ball) */
                    float dot = 0.f;
                    for (int c = 0; c < D; c++) dot += qg[c] * cj[c];
                    const float ball = dot + qnorm[g] * A->kr[task * (int64_t)NB + j];
                    acc_ub = ball < acc_ub ? ball : acc_ub;
                }
                ub[g * NB + j] = nvalid[j] ? acc_ub : NEG;
            }
        }
        free(lo_new);
        free(hi_new);
    }

    /* visiting order: sink, recent, then by policy score / bound / recency; non-candidates last */
    if (A->order_in) {
        memcpy(order, A->order_in + (int64_t)task * NB, sizeof(int32_t) * NB);
    } else {
        const int n_row = nb_row - first;
        for (int j = first; j < nb_row; j++) {
            int tier = j * BS < P->sink_tokens ? 2 : (j <= last_block && j > last_block - P->recent_blocks) ? 1 : 0;
            float key = (float)j;
            if (A->scores && !(P->mode == 2 && use_bounds)) key = A->scores[(int64_t)task * NB + j];
            else if (use_bounds) {   /* certified: the bound orders, whatever the policy */
                key = NEG;
                for (int g = 0; g < G; g++) key = ub[g * NB + j] > key ? ub[g * NB + j] : key;
            }
            Slot *slot = slots + (j - first);
            slot->tier = nvalid[j] ? tier : -1;
            slot->key = key;
            slot->idx = j;
        }
        if (A->scores || use_bounds) {
            qsort(slots, n_row, sizeof(Slot), slot_cmp);
            for (int j = 0; j < n_row; j++) order[j] = slots[j].idx;
        } else {   /* recency order needs no sort: each tier newest first, then the empty blocks */
            int pos = 0;
            for (int tier = 2; tier >= -1; tier--)
                for (int j = n_row - 1; j >= 0; j--)
                    if (slots[j].tier == tier) order[pos++] = slots[j].idx;
        }
    }
    if (budget > 0) {
        int keep = budget > n_protected ? budget : n_protected;
        if (keep < n_cand) n_cand = keep;
    }
    const int need = n_protected > P->min_blocks ? n_protected : P->min_blocks;

    double ref[64];
    const int values = P->mode == 2 && P->certificate != 0;   /* the value-aware certificate */
    const float *spread = values ? A->vspread + task * (int64_t)NB : NULL;
    if (P->mode == 2) {   /* suffix[g][i]: bound on the mass of order[i:], relative to exp(ref_g) */
        suffix = malloc(sizeof(double) * G * (n_cand + 1));
        if (values) {     /* and wsuffix[g][i] = sum n_b exp(ub_b - ref_g) s_b, smax[i] = max s_b over order[i:] */
            wsuffix = malloc(sizeof(double) * G * (n_cand + 1));
            smax = malloc(sizeof(double) * (n_cand + 1));
            smax[n_cand] = 0.0;
            for (int i = n_cand - 1; i >= 0; i--) smax[i] = fmax(smax[i + 1], (double)spread[order[i]]);
        }
        for (int g = 0; g < G; g++) {
            ref[g] = NEG;
            for (int i = 0; i < n_cand; i++) ref[g] = fmax(ref[g], (double)ub[g * NB + order[i]]);
            double acc_s = 0.0, acc_w = 0.0;
            suffix[g * (n_cand + 1) + n_cand] = 0.0;
            if (values) wsuffix[g * (n_cand + 1) + n_cand] = 0.0;
            for (int i = n_cand - 1; i >= 0; i--) {
                int blk = order[i];
                const double mass = nvalid[blk] * exp((double)ub[g * NB + blk] - ref[g]);
                acc_s += mass;
                suffix[g * (n_cand + 1) + i] = acc_s;
                if (values) {
                    acc_w += mass * (double)spread[blk];
                    wsuffix[g * (n_cand + 1) + i] = acc_w;
                }
            }
        }
    }
    const float skip_log = P->mode == 3 ? A->skip_log[b] : 0.f;

    for (int g = 0; g < G; g++) { m[g] = NEG; l[g] = 0.f; }
    int visited = 0, run = 0, reason = 0;
    float bmax[64];

    for (int pos = 0; pos < n_cand && reason == 0; pos++) {   /* pos: blocks of the order read so far */
        const int blk = order[pos];
        int t0, t_hi;
        block_span(blk, BS, row_start, row_end, &t0, &t_hi);
        const int n = t_hi - t0;
#ifdef HAVE_BF16_DOT
        if (qb) {
            for (int g = 0; g < G; g++)
                scores_bf16(qb + g * D,
                            (const uint16_t *)k + kbase + t0 * P->sk_t, P->sk_t, n, D, P->scale, s + g * BS);
            if (vrow)
                for (int t = 0; t < n; t++)
                    if (!vrow[t0 + t])
                        for (int g = 0; g < G; g++) s[g * BS + t] = NEG;
        } else
#endif
        for (int t = 0; t < n; t++) {
            if (vrow && !vrow[t0 + t]) {
                for (int g = 0; g < G; g++) s[g * BS + t] = NEG;
                continue;
            }
            load_row(k, kbase + (t0 + t) * P->sk_t, P->dtype, D, row);
            for (int g = 0; g < G; g++) {
                const float *qg = qt + g * D;
                float dot = 0.f;
                for (int c = 0; c < D; c++) dot += qg[c] * row[c];
                s[g * BS + t] = dot;
            }
        }
        for (int g = 0; g < G; g++) {
            const float *sg = s + g * BS;
            float bm = NEG;
            for (int t = 0; t < n; t++) bm = sg[t] > bm ? sg[t] : bm;
            bmax[g] = bm;
        }
        if (P->mode == 3) {   /* skip: every head's best score below m + ln(lambda / T): no softmax, no values */
            int faint = 1;
            for (int g = 0; g < G && faint; g++) {
                const float rise = bmax[g] - m[g];
                if (!(rise < skip_log)) faint = 0;
            }
            if (faint) continue;
        }
        for (int g = 0; g < G; g++) {
            float *sg = s + g * BS;
            const float bm = bmax[g];
            float m_new = bm > m[g] ? bm : m[g];
            alpha[g] = expf(m[g] - m_new);
            float sum = 0.f;
            for (int t = 0; t < n; t++) {
                float p = expf(sg[t] - m_new);
                sg[t] = p;
                sum += p;
            }
            l[g] = l[g] * alpha[g] + sum;
            m[g] = m_new;
            float *ag = acc + g * D;
            for (int c = 0; c < D; c++) ag[c] *= alpha[g];
        }
#ifdef HAVE_BF16_DOT
        if (qb && G <= 8)
            accumulate_bf16(s, G, BS, (const uint16_t *)v + vbase + t0 * P->sv_t, P->sv_t, n, D,
                            vrow ? vrow + t0 : NULL, acc);
        else
#endif
        for (int t = 0; t < n; t++) {
            if (vrow && !vrow[t0 + t]) continue;
            load_row(v, vbase + (t0 + t) * P->sv_t, P->dtype, D, row);
            for (int g = 0; g < G; g++) {
                const float p = s[g * BS + t];
                float *ag = acc + g * D;
                for (int c = 0; c < D; c++) ag[c] += p * row[c];
            }
        }
        if (A->vmask) A->vmask[(int64_t)task * NB + blk] = 1;
        visited++;

        const int may_stop = visited >= need && visited < n_cand;
        if (P->mode == 1 && visited >= need && visited < n_cand) {   /* o_prev matters from block `need` on */
            for (int g = 0; g < G; g++) {
                const float inv = 1.f / l[g];
                for (int c = 0; c < D; c++) o[g * D + c] = acc[g * D + c] * inv;
            }
        }
        if (P->mode == 1 && visited > need) {   /* stability: magnitude and direction change of the running output */
            int stable = 1;
            for (int g = 0; g < G; g++) {
                float dd = 0.f, pp = 0.f, oo = 0.f, op = 0.f;
                for (int c = 0; c < D; c++) {
                    float x = o[g * D + c], y = o_prev[g * D + c];
                    dd += (x - y) * (x - y);
                    pp += y * y;
                    oo += x * x;
                    op += x * y;
                }
                float pn = sqrtf(pp), on = sqrtf(oo);
                float d_mag = sqrtf(dd) / (pn > 1e-30f ? pn : 1e-30f);
                float d_dir = 1.f - op / ((on > 1e-30f ? on : 1e-30f) * (pn > 1e-30f ? pn : 1e-30f));
                if (!(d_mag < P->tau && d_dir < P->phi)) stable = 0;
            }
            run = stable ? run + 1 : 0;
            if (may_stop && run >= P->patience) reason = 1;
        } else if (P->mode == 2 && may_stop) {   /* certified: bound on the unvisited mass <= eps */
            int ok = 1;
            const int next = pos + 1;   /* the unvisited candidates are order[next:n_cand] */
            for (int g = 0; g < G && ok; g++) {
                const double lift = exp(ref[g] - (double)m[g]);
                const double rest = suffix[g * (n_cand + 1) + next] * lift;
                const double lg = (double)l[g];
                if (!values) {
                    if (!(rest / (lg + rest) <= (double)P->eps)) ok = 0;
                    continue;
                }
                /* value-aware: min(A, B) with A = W (||C - o|| + max s), B = (||C - o|| R + sum n_b e^(ub_b - m) s_b) / l */
                const float inv = 1.f / l[g];
                const float *cg = A->vmean + (int64_t)task * D;
                double to_mean = 0.0, onorm = 0.0;
                for (int c = 0; c < D; c++) {
                    const double oc = (double)(acc[g * D + c] * inv);
                    to_mean += (oc - cg[c]) * (oc - cg[c]);
                    onorm += oc * oc;
                }
                to_mean = sqrt(to_mean);
                const double weighted = wsuffix[g * (n_cand + 1) + next] * lift;
                const double bound_a = rest / (lg + rest) * (to_mean + smax[next]);
                const double bound_b = (to_mean * rest + weighted) / lg;
                const double err = bound_a < bound_b ? bound_a : bound_b;
                const double limit = (double)P->eps * (P->certificate == 1 ? sqrt(onorm) : 1.0);
                if (!(err <= limit)) ok = 0;
            }
            if (ok) reason = 2;
        }
        if (P->mode == 1 && visited >= need && visited < n_cand) {
            float *tmp = o_prev;
            o_prev = o;
            o = tmp;
        }
    }

    for (int g = 0; g < G; g++) {   /* the output in q's dtype (bf16: round to nearest even) */
        const float inv = 1.f / l[g];
        for (int c = 0; c < D; c++) o[g * D + c] = acc[g * D + c] * inv;
    }
    if (P->q_dtype == 1) {
        uint16_t *dst = (uint16_t *)A->out + q_off;
        for (int c = 0; c < G * D; c++) {
            uint32_t u;
            memcpy(&u, &o[c], 4);
            dst[c] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    } else if (P->q_dtype == 2) {
        _Float16 *dst = (_Float16 *)A->out + q_off;
        for (int c = 0; c < G * D; c++) dst[c] = (_Float16)o[c];
    } else {
        memcpy((float *)A->out + q_off, o, sizeof(float) * G * D);
    }
    A->visited[task] = visited;
    A->ncand[task] = n_cand;
    A->reason[task] = reason;

    free(nvalid); free(order); free(slots); free(ub); free(suffix); free(wsuffix); free(smax);
    free(s); free(acc); free(o); free(o_prev); free(row); free(qt);
}

static void walk_task(const Params *P, int task, const Buffers *A) {
    /* constant head dims let the channel loops unroll into whole vector registers */
    switch (P->D) {
    case 64: walk_task_d(P, 64, task, A); break;
    case 128: walk_task_d(P, 128, task, A); break;
    default: walk_task_d(P, P->D, task, A);
    }
}

/* every (batch entry, KV head) task in parallel, then the visited and candidate sums into totals[0..1] */
static int run_tasks(const Params *P, const Buffers *A, int64_t *totals) {
    if (P->G > 64 || P->G < 1) return 1;
    const int tasks = P->B * P->HKV;
#pragma omp parallel for schedule(dynamic, 1) num_threads(P->nthreads)
    for (int task = 0; task < tasks; task++)
        walk_task(P, task, A);
    totals[0] = totals[1] = 0;
    for (int task = 0; task < tasks; task++) {
        totals[0] += A->visited[task];
        totals[1] += A->ncand[task];
    }
    return 0;
}

/* the summaries a criterion reads are there (the key balls need both centroids and radii) */
static int summaries_missing(const Params *P, const Buffers *A) {
    return (P->mode == 3 && !A->skip_log) || (P->mode == 2 && P->certificate != 0 && (!A->vmean || !A->vspread))
        || (!A->kc != !A->kr);
}

/* q: (batch, q_heads, D) in q_dtype, unscaled; out: the same shape and dtype. visited, ncand, reason: per
 * (sequence, KV head); totals[0..1]: their visited and candidate sums. vmask may be NULL. */
int art_decode(const Params *P, const void *q, const void *k, const void *v, const uint8_t *valid,
               const float *kmin, const float *kmax, const float *scores, const int32_t *order, void *out,
               int32_t *visited, int32_t *ncand, int32_t *reason, uint8_t *vmask, int64_t *totals,
               const float *kc, const float *kr, const float *vmean, const float *vspread, const float *skip_log) {
    const Buffers A = {q, k, v, valid, kmin, kmax, scores, order, NULL, NULL, NULL, out, visited, ncand, reason, vmask,
                       kc, kr, vmean, vspread, skip_log};
    if (summaries_missing(P, &A)) return 3;
    return run_tasks(P, &A, totals);
}

/* The pool form: k, v (and kmin, kmax) hold S rows (only their strides matter, so work is per batch entry,
 * never per pool row); batch entry i reads row rows[i] (rows NULL: row i) over positions
 * [starts[i], lengths[i]) (starts NULL: from 0). q, out, visited, ncand, reason, totals as in art_decode. */
int art_decode_rows(const Params *P, const void *q, const void *k, const void *v, const int32_t *rows,
                    const int32_t *starts, const int32_t *lengths, const float *kmin, const float *kmax, void *out,
                    int32_t *visited, int32_t *ncand, int32_t *reason, int64_t *totals,
                    const float *kc, const float *kr, const float *vmean, const float *vspread, const float *skip_log) {
    if (!lengths) return 2;
    const Buffers A = {q, k, v, NULL, kmin, kmax, NULL, NULL, rows, starts, lengths, out, visited, ncand, reason, NULL,
                       kc, kr, vmean, vspread, skip_log};
    if (summaries_missing(P, &A)) return 3;
    return run_tasks(P, &A, totals);
}
