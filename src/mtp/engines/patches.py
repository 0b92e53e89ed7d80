"""Source fixes that ``mtp engines setup llama.cpp`` applies to the vendored llama.cpp before it builds.

Each fix is an exact text replacement with the reason it exists, applied once (a tree that already holds the
new text is left alone) and reported when the old text is gone (another llama.cpp version: the fix is skipped
with a note, never forced). Keep them few, small and each tied to a bug that can be shown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceFix:
    name: str
    path: str  # relative to the llama.cpp source tree
    old: str
    new: str
    reason: str


# GCC (<= 13 at least; Debian 12's 12.2 here) declares `_tile_loadconfig(p)` as an asm statement whose memory
# operand is `*(const void **)p`: 8 bytes. The compiler then sees the stores that fill the tile shapes (bytes
# 16..63 of the 64-byte config on the stack) as dead and drops them, so `ldtilecfg` loads palette 1 with every
# tile 0 rows x 0 bytes and the first AMX tile instruction faults: the SIGSEGV in `ggml_backend_amx_mul_mat` at
# model load on AMX Xeons (Sapphire Rapids and later) with Q4_0/Q4_1/Q8_0/K-quant weights. Seen in the
# disassembly of ggml-cpu/amx/mmq.cpp built with -O3 -march=sapphirerapids: one zeroing store, one byte store of
# the palette id, then `ldtilecfg`. A config with static storage (read-only data, filled by the compiler) has
# nothing left to drop. tests/test_engine_patches.py compiles the function both ways and checks the bytes.
AMX_TILE_CONFIG = SourceFix(
    name="amx-tile-config-in-rodata",
    path="ggml/src/ggml-cpu/amx/mmq.cpp",
    old="""    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    tc.start_row = 0;
    tc.rows[0] = 8;   tc.colsb[0] = 64;
    tc.rows[1] = 8;   tc.colsb[1] = 64;
    tc.rows[2] = 16;  tc.colsb[2] = 32;
    tc.rows[3] = 16;  tc.colsb[3] = 32;
    tc.rows[4] = 16;  tc.colsb[4] = 64;
    tc.rows[5] = 16;  tc.colsb[5] = 64;
    tc.rows[6] = 16;  tc.colsb[6] = 64;
    tc.rows[7] = 16;  tc.colsb[7] = 64;

    _tile_loadconfig(&tc);""",
    new="""    // mtp: static storage, so that no store is dropped (GCC's _tile_loadconfig tells the compiler it reads
    // 8 bytes of the 64: a config on the stack lost its tile shapes and the first tile instruction faulted)
    struct make {
        static constexpr tile_config_t config() {
            tile_config_t c = {};
            c.palette_id = 1;
            c.start_row = 0;
            c.rows[0] = 8;   c.colsb[0] = 64;
            c.rows[1] = 8;   c.colsb[1] = 64;
            c.rows[2] = 16;  c.colsb[2] = 32;
            c.rows[3] = 16;  c.colsb[3] = 32;
            c.rows[4] = 16;  c.colsb[4] = 64;
            c.rows[5] = 16;  c.colsb[5] = 64;
            c.rows[6] = 16;  c.colsb[6] = 64;
            c.rows[7] = 16;  c.colsb[7] = 64;
            return c;
        }
    };
    alignas(64) static constexpr tile_config_t tc = make::config();

    _tile_loadconfig(&tc);""",
    reason="GCC drops the stores that fill an AMX tile config on the stack: SIGSEGV at load on AMX CPUs",
)

# llama.cpp's draft-eagle3 reads the target's hidden states at the input of three layers, which each model's graph
# builder records in `res->t_layer_inp[il]` (src/models/llama.cpp, qwen3.cpp and 17 more do). The Qwen2 builder
# does not, so a Qwen2 / Qwen2.5 target (qwen2.5-coder-0.5b) with an EAGLE-3 draft aborts at the first decode:
# "layer input tensor is null" (src/llama-graph.cpp). One line, as in qwen3.cpp, records it; nothing else reads it
# unless a draft asks for layer inputs.
QWEN2_LAYER_INPUTS = SourceFix(
    name="qwen2-layer-inputs",
    path="src/models/qwen2.cpp",
    old="""    for (int il = 0; il < n_layer; ++il) {
        ggml_tensor * inpSA = inpL;
""",
    new="""    for (int il = 0; il < n_layer; ++il) {
        res->t_layer_inp[il] = inpL;  // mtp: the layer inputs an EAGLE-3 draft reads (as qwen3.cpp records them)

        ggml_tensor * inpSA = inpL;
""",
    reason="Qwen2 targets do not record the layer inputs an EAGLE-3 draft reads: abort at the first decode",
)

# mtp's heads (mlp, hydra, transformer; `--tap last`) read the last layer's output *before* the final norm, and
# llama.cpp hands out only the state after it (`t_embd`, result_norm). The staging API of src/llama-ext.h returns
# layer inputs (`llama_set_embeddings_layer_inp(ctx, il, true)`, read by `llama_get_embeddings_layer_inp`) for
# il < n_layer; recording the final norm's input as "layer n_layer's input" (as nemotron-h.cpp and mimo2.cpp do)
# lets `mtp generate --backend llama.cpp` run those heads on llama.cpp's states. Nothing reads it unless asked.
_FINAL_NORM = """        inpL = cur;
    }
    cur = inpL;

    cur = build_norm(cur,
            model.output_norm, NULL,
            LLM_NORM_RMS, -1);
"""
_FINAL_NORM_RECORDED = """        inpL = cur;
    }
    cur = inpL;
    res->t_layer_inp[n_layer] = cur;  // mtp: the last layer's output before the final norm (MTP heads read it)

    cur = build_norm(cur,
            model.output_norm, NULL,
            LLM_NORM_RMS, -1);
"""
LLAMA_LAST_STATE = SourceFix(
    name="llama-last-state", path="src/models/llama.cpp", old=_FINAL_NORM, new=_FINAL_NORM_RECORDED,
    reason="heads read the last layer's output before the final norm, which llama.cpp did not hand out",
)
QWEN2_LAST_STATE = SourceFix(
    name="qwen2-last-state", path="src/models/qwen2.cpp", old=_FINAL_NORM, new=_FINAL_NORM_RECORDED,
    reason="heads read the last layer's output before the final norm, which llama.cpp did not hand out",
)

# From 512 KV cells on, ggml's CPU flash attention splits a *lone* query's keys across the threads (each thread one
# chunk, then the chunks' partial softmaxes merged), while a batch of several queries runs each query over all keys
# in one pass (ggml-cpu/ops.cpp, ggml_compute_forward_flash_attn_ext_f16): the same attention rounded two ways. A
# speculative verify decodes a few tokens at once and must reproduce what plain decoding (one token per decode)
# computes; past 256 used cells (llama.cpp pads its KV view to 256, so the view reaches 512) every verified token's
# attention rounded differently, and greedy near-ties went the other way (qwen2.5-coder-0.5b Q4_K_M: 33-45 % of
# answers changed by prompt lookup against llama-server's plain greedy). The fix runs every query of a small batch
# (fewer than GGML_FA_TILE_Q, the tiled path's threshold) through the lone query's split and merge, query by query:
# bit for bit a one-token decode's attention. A lone query is untouched (plain decoding computes what upstream
# does); the split is taken only when the work buffer holds the partials (the second fix sizes it), so a build
# without that fix falls back to upstream's path instead of overrunning it. tests/test_llamacpp_backend.py checks a
# verify against one-token decodes past 512 cells.
_FA_SPLIT_OLD = """    const bool use_split_kv_path = !use_ref && (neq1 == 1 && neq3 == 1) && kv_is_f32_or_f16 && (k->type == v->type) && q->type == GGML_TYPE_F32 && nek1 >= 512;

    if (use_split_kv_path) {
        const int64_t chunk_size = (nek1 + nth - 1) / nth;

        // Partials buffer layout: [q_head][kv_chunk][M, S, VKQ]
        const int64_t partial_size  = 2 + DV;
        float *       partials_base = (float *) params->wdata + nth * (DK + 2*DV + CACHE_LINE_SIZE_F32);

        const int64_t ic_start = ith * chunk_size;
        const int64_t ic_end   = std::min(ic_start + chunk_size, nek1);

        const int64_t partial_stride = nth * partial_size;
        float *       chunk_partials = partials_base + ith * partial_size;

        if (ic_start < nek1) {
            for (int64_t q_head = 0; q_head < neq2; q_head++) {
                ggml_compute_forward_flash_attn_ext_f16_one_chunk(
                    params, dst, q_head, q_head + 1, ic_start, ic_end,
                    chunk_partials, partial_stride);
            }
        } else {
            for (int64_t q_head = 0; q_head < neq2; q_head++) {
                float * q_partials = chunk_partials + q_head * partial_stride;
                q_partials[0] = -INFINITY;  // M
                q_partials[1] = 0.0f;       // S
            }
        }

        ggml_barrier(params->threadpool);
        ggml_flash_attn_ext_reduce_partials(params, dst, nth, chunk_size);
    } else {
"""
_FA_SPLIT_NEW = """    // mtp: every query of a small batch (a speculative verify) is split across the threads as a lone query is, so
    // that each computes bit for bit what a one-token decode computes (upstream splits a lone query only)
    const int64_t split_rows = neq1*neq2;  // row ir = iq2*neq1 + iq1, as one_chunk reads it (neq3 == 1)
    const bool split_fits = params->wsize >= sizeof(float)*(nth*(DK + 2*DV + CACHE_LINE_SIZE_F32) + split_rows*nth*(2 + DV));
    const bool use_split_kv_path = !use_ref && (neq1 < GGML_FA_TILE_Q && neq3 == 1) && split_fits && kv_is_f32_or_f16 && (k->type == v->type) && q->type == GGML_TYPE_F32 && nek1 >= 512;

    if (use_split_kv_path) {
        const int64_t chunk_size = (nek1 + nth - 1) / nth;

        // Partials buffer layout: [row][kv_chunk][M, S, VKQ]
        const int64_t partial_size  = 2 + DV;
        float *       partials_base = (float *) params->wdata + nth * (DK + 2*DV + CACHE_LINE_SIZE_F32);

        const int64_t ic_start = ith * chunk_size;
        const int64_t ic_end   = std::min(ic_start + chunk_size, nek1);

        const int64_t partial_stride = nth * partial_size;
        float *       chunk_partials = partials_base + ith * partial_size;

        if (ic_start < nek1) {
            for (int64_t ir = 0; ir < split_rows; ir++) {
                ggml_compute_forward_flash_attn_ext_f16_one_chunk(
                    params, dst, ir, ir + 1, ic_start, ic_end,
                    chunk_partials, partial_stride);
            }
        } else {
            for (int64_t ir = 0; ir < split_rows; ir++) {
                float * q_partials = chunk_partials + ir * partial_stride;
                q_partials[0] = -INFINITY;  // M
                q_partials[1] = 0.0f;       // S
            }
        }

        ggml_barrier(params->threadpool);
        if (neq1 == 1) {
            ggml_flash_attn_ext_reduce_partials(params, dst, nth, chunk_size);
        } else {
            // ggml_flash_attn_ext_reduce_partials for every row: the same arithmetic in the same order
            float * VKQ_final = (float *) params->wdata + ith * (DK + 2*DV + CACHE_LINE_SIZE_F32);
            for (int64_t ir = ith; ir < split_rows; ir += nth) {
                float M_final = -INFINITY;
                float S_final = 0.0f;
                memset(VKQ_final, 0, DV * sizeof(float));
                for (int64_t chunk_idx = 0; chunk_idx < nth; ++chunk_idx) {
                    if (chunk_idx * chunk_size >= nek1) continue;
                    const float * partial   = partials_base + (ir * nth + chunk_idx) * partial_size;
                    const float   M_chunk   = partial[0];
                    const float   S_chunk   = partial[1];
                    const float * VKQ_chunk = partial + 2;
                    if (S_chunk == 0.0f) continue;
                    const float M_new     = fmaxf(M_final, M_chunk);
                    const float scale_old = expf(M_final - M_new);
                    const float scale_new = expf(M_chunk - M_new);
                    for (int64_t d = 0; d < DV; ++d) {
                        VKQ_final[d] = VKQ_final[d] * scale_old + VKQ_chunk[d] * scale_new;
                    }
                    S_final = S_final * scale_old + S_chunk * scale_new;
                    M_final = M_new;
                }
                if (S_final != 0.0f) {
                    const float S_inv = 1.0f / S_final;
                    ggml_vec_scale_f32(DV, VKQ_final, S_inv);
                }
                const int64_t iq2 = ir / neq1;
                const int64_t iq1 = ir - iq2 * neq1;
                memcpy((char *) dst->data + (iq2 + iq1*ne1)*nb1, VKQ_final, nb1);
            }
        }
    } else {
"""
FA_SPLIT_KV_ROWS = SourceFix(
    name="fa-split-kv-every-row", path="ggml/src/ggml-cpu/ops.cpp", old=_FA_SPLIT_OLD, new=_FA_SPLIT_NEW,
    reason="from 512 KV cells a verify's attention rounded unlike one-token decodes: greedy answers changed",
)
FA_SPLIT_KV_WSIZE = SourceFix(
    name="fa-split-kv-every-row-wsize", path="ggml/src/ggml-cpu/ggml-cpu.c",
    old="""                        size_t n_chunks = n_tasks;
                        size_t decode   = sizeof(float)*(neq2*n_chunks*(2+DV) + n_tasks*(DK + 2*DV));
""",
    new="""                        size_t n_chunks = n_tasks;
                        // mtp: partials for every query of a small batch (fa-split-kv-every-row), not one
                        const int64_t neq1 = node->src[0]->ne[1];
                        size_t n_rows   = neq1 < GGML_FA_TILE_Q ? neq1 : 1;
                        size_t decode   = sizeof(float)*(n_rows*neq2*n_chunks*(2+DV) + n_tasks*(DK + 2*DV + CACHE_LINE_SIZE_F32));
""",
    reason="the work buffer holds the partials of every query the split attention path now takes",
)

FIXES: tuple[SourceFix, ...] = (AMX_TILE_CONFIG, QWEN2_LAYER_INPUTS, LLAMA_LAST_STATE, QWEN2_LAST_STATE,
                                   FA_SPLIT_KV_ROWS, FA_SPLIT_KV_WSIZE)


def fingerprint(fixes: tuple[SourceFix, ...] = FIXES) -> str:
    """Changes whenever a fix's text changes: part of the build stamp, so a changed fix rebuilds."""
    h = hashlib.sha256()
    for fix in fixes:
        h.update(f"{fix.name}\0{fix.path}\0{fix.old}\0{fix.new}\0".encode())
    return h.hexdigest()[:16]


def apply(src: Path, fixes: tuple[SourceFix, ...] = FIXES) -> dict[str, str]:
    """Apply each fix to the tree at ``src``; returns name -> "applied" | "present" | "skipped: why"."""
    done = {}
    for fix in fixes:
        path = src / fix.path
        try:
            text = path.read_text()
        except OSError as e:
            done[fix.name] = f"skipped: {fix.path} unreadable ({e.strerror})"
            continue
        if fix.new in text:
            done[fix.name] = "present"
        elif text.count(fix.old) == 1:
            tmp = path.with_name(path.name + ".mtp-tmp")
            tmp.write_text(text.replace(fix.old, fix.new))
            tmp.replace(path)
            done[fix.name] = "applied"
        else:
            done[fix.name] = f"skipped: the code it fixes is not in {fix.path} (another llama.cpp version)"
    return done
