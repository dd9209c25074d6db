// Weight-streaming matrix products for small batches, in the style that reaches memory
// bandwidth on real GPUs: out[i][j] = sum_k w[j][k] * x[i][k].
//
// A template: the runtime (`compute::gpu::MatvecShape`) sets the workgroup size `WG` and
// the rows per workgroup `ROWS` chosen for the adapter, and keeps one of the two
// reductions below (subgroup or workgroup memory) with its entry-point parameters, and
// f32 or (where the adapter has SHADER_F16) f16 products for f16 weights.
//
// Each workgroup computes ROWS output rows of one activation row `i` (wg.z): every
// invocation reads 128 bits of each row at a time (`vec4<u32>`, consecutive invocations
// on consecutive words), loads the matching activations once for all ROWS rows, and
// dequantizes in registers; the ROWS sums (and the activations' sum of squares when the
// input is normalized here) are then reduced over the workgroup. Reading the activations
// whole in every workgroup is what lets the norm and the gate ride along for free.
//
// Weight layout as in `matvec.wgsl` (`row_words` words per row, a multiple of 4 here;
// quantized rows' f16 scales from word `scale_word0`, two per word).
//
// `flags`: 1 adds what `out` holds (a residual), 2 adds aux[aux_bias + j] (a bias),
// 4 multiplies by aux[aux_scale + j] (a layer scale), 8 reads the input as a SiLU gate
// (x = [a | b], each `cols` long: silu(a) * b, the feed-forward's gate fused into its
// down-projection), 16 reads the input RMS-normalized (x * aux[aux_norm + k] /
// sqrt(mean(x^2) + eps): the norm before a product fused into it).

struct Params {
    rows: u32,
    cols: u32,
    m: u32,
    groups_per_y: u32,
    out_row0: u32,
    out_stride: u32,
    row_words: u32,
    scale_word0: u32,
    flags: u32,
    aux_bias: u32,
    aux_scale: u32,
    x_stride: u32,
    aux_norm: u32,
    eps: f32,
    // Where output row i starts before its stride (a buffer shared with other data).
    out_base: u32,
    _p1: u32,
}

@group(0) @binding(0) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

// Sums: ROWS products, then the activations' sum of squares.
const SUMS: u32 = ROWS + 1u;
var<workgroup> totals: array<f32, SUMS>;

// The activations' k4-th vec4, with the fused gate or norm weight applied; `sq` gets the
// raw values' squares for the norm.
fn xin(base: u32, k4: u32, sq: ptr<function, f32>) -> vec4<f32> {
    let v = x[base + k4];
    if ((p.flags & 8u) != 0u) {
        let b = x[base + p.cols / 4u + k4];
        return v / (vec4<f32>(1.0) + exp(-v)) * b;
    }
    if ((p.flags & 16u) != 0u) {
        *sq = *sq + dot(v, v);
        let a = p.aux_norm + 4u * k4;
        return v * vec4<f32>(aux[a], aux[a + 1u], aux[a + 2u], aux[a + 3u]);
    }
    return v;
}

fn f16_scale(row: u32, block: u32) -> f32 {
    let h = row * (p.cols / 32u) + block;
    let word = p.scale_word0 + h / 2u;
    let pair = unpack2x16float(w[word / 4u][word % 4u]);
    return select(pair.x, pair.y, (h & 1u) == 1u);
}

// The epilogue of output row `row` (the workgroup's `r`-th), after the reduction.
fn store(r: u32, row: u32, i: u32) {
    let j = p.out_row0 + row;
    let o = p.out_base + i * p.out_stride + j;
    var v = totals[r];
    if ((p.flags & 16u) != 0u) {
        v = v / sqrt(totals[ROWS] / f32(p.cols) + p.eps);
    }
    if ((p.flags & 2u) != 0u) { v = v + aux[p.aux_bias + j]; }
    if ((p.flags & 4u) != 0u) { v = v * aux[p.aux_scale + j]; }
    if ((p.flags & 1u) != 0u) { v = v + out[o]; }
    out[o] = v;
}

//! subgroup
// Subgroup sums, then one partial per subgroup in workgroup memory. No assumption on how
// invocations map to subgroups (every invocation holds partial sums of every row) or on
// their size (room for subgroups of one).
const MAX_SUBGROUPS: u32 = WG;
var<workgroup> partial: array<f32, SUMS * MAX_SUBGROUPS>;

fn reduce(lid: u32, acc: ptr<function, array<f32, SUMS>>, lane: u32, sg: u32, n_sg: u32) {
    for (var r = 0u; r < SUMS; r = r + 1u) {
        let s = subgroupAdd((*acc)[r]);
        if (lane == 0u) {
            partial[r * MAX_SUBGROUPS + sg] = s;
        }
    }
    workgroupBarrier();
    if (lid < SUMS) {
        var t = 0.0;
        for (var g = 0u; g < n_sg; g = g + 1u) {
            t = t + partial[lid * MAX_SUBGROUPS + g];
        }
        totals[lid] = t;
    }
    workgroupBarrier();
}
//! workgroup
// A tree in workgroup memory, all sums at once.
var<workgroup> partial: array<f32, SUMS * WG>;

fn reduce(lid: u32, acc: ptr<function, array<f32, SUMS>>) {
    for (var r = 0u; r < SUMS; r = r + 1u) {
        partial[r * WG + lid] = (*acc)[r];
    }
    workgroupBarrier();
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            for (var r = 0u; r < SUMS; r = r + 1u) {
                partial[r * WG + lid] = partial[r * WG + lid] + partial[r * WG + lid + stride];
            }
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
    if (lid < SUMS) {
        totals[lid] = partial[lid * WG];
    }
    workgroupBarrier();
}
//! end

// The shared tail of every format's kernel: reduce, then invocation r stores row r.
fn finish(lid: u32, row0: u32, i: u32, acc: ptr<function, array<f32, SUMS>> REDUCE_PARAMS) {
    reduce(lid, acc REDUCE_ARGS);
    if (lid < ROWS && row0 + lid < p.rows) {
        store(lid, row0 + lid, i);
    }
}

@compute @workgroup_size(WG)
fn matvec_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 ENTRY_PARAMS) {
    let row0 = (wg.x + wg.y * p.groups_per_y) * ROWS;
    let i = wg.z;
    let base = i * p.x_stride / 4u;
    let rv = p.row_words / 4u;
    var acc: array<f32, SUMS>;
    var sq = 0.0;
    for (var k = lid; k < rv; k = k + WG) {
        let xv = xin(base, k, &sq);
        for (var r = 0u; r < ROWS; r = r + 1u) {
            if (row0 + r < p.rows) {
                acc[r] = acc[r] + dot(bitcast<vec4<f32>>(w[(row0 + r) * rv + k]), xv);
            }
        }
    }
    acc[ROWS] = sq;
    finish(lid, row0, i, &acc REDUCE_ARGS);
}

@compute @workgroup_size(WG)
fn matvec_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 ENTRY_PARAMS) {
    let row0 = (wg.x + wg.y * p.groups_per_y) * ROWS;
    let i = wg.z;
    let base = i * p.x_stride / 4u;
    let rv = p.row_words / 4u;
    var acc: array<f32, SUMS>;
    var sq = 0.0;
    for (var k = lid; k < rv; k = k + WG) {
        let x0 = xin(base, 2u * k, &sq);
        let x1 = xin(base, 2u * k + 1u, &sq);
//! f16math
        // Half-precision products (SHADER_F16): the activations rounded to f16 once per
        // load, each 8-product partial summed in f16, then accumulated in f32.
        let h0 = vec4<f16>(x0);
        let h1 = vec4<f16>(x1);
//! end
        for (var r = 0u; r < ROWS; r = r + 1u) {
            if (row0 + r < p.rows) {
                let q = w[(row0 + r) * rv + k];
//! f32math
                let a = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
                let b = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
                acc[r] = acc[r] + dot(a, x0) + dot(b, x1);
//! f16math
                // (naga 30 mistypes `bitcast<vec2<f16>>` of a u32: the halves go through
                // unpack2x16float, exact both ways.)
                let a = vec4<f16>(vec2<f16>(unpack2x16float(q.x)), vec2<f16>(unpack2x16float(q.y)));
                let b = vec4<f16>(vec2<f16>(unpack2x16float(q.z)), vec2<f16>(unpack2x16float(q.w)));
                acc[r] = acc[r] + f32(dot(a, h0) + dot(b, h1));
//! end
            }
        }
    }
    acc[ROWS] = sq;
    finish(lid, row0, i, &acc REDUCE_ARGS);
}

@compute @workgroup_size(WG)
fn matvec_bf16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 ENTRY_PARAMS) {
    let row0 = (wg.x + wg.y * p.groups_per_y) * ROWS;
    let i = wg.z;
    let base = i * p.x_stride / 4u;
    let rv = p.row_words / 4u;
    var acc: array<f32, SUMS>;
    var sq = 0.0;
    for (var k = lid; k < rv; k = k + WG) {
        let x0 = xin(base, 2u * k, &sq);
        let x1 = xin(base, 2u * k + 1u, &sq);
        for (var r = 0u; r < ROWS; r = r + 1u) {
            if (row0 + r < p.rows) {
                let q = w[(row0 + r) * rv + k];
                let lo = bitcast<vec4<f32>>(q << vec4<u32>(16u));
                let hi = bitcast<vec4<f32>>(q & vec4<u32>(0xffff0000u));
                acc[r] = acc[r] + dot(vec4<f32>(lo.x, hi.x, lo.y, hi.y), x0)
                    + dot(vec4<f32>(lo.z, hi.z, lo.w, hi.w), x1);
            }
        }
    }
    acc[ROWS] = sq;
    finish(lid, row0, i, &acc REDUCE_ARGS);
}

fn i8x4(word: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word)) >> vec4<u32>(24u));
}

// 16 weights per vec4: half a block of 32.
@compute @workgroup_size(WG)
fn matvec_q8_0(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 ENTRY_PARAMS) {
    let row0 = (wg.x + wg.y * p.groups_per_y) * ROWS;
    let i = wg.z;
    let base = i * p.x_stride / 4u;
    let rv = p.row_words / 4u;
    var acc: array<f32, SUMS>;
    var sq = 0.0;
    for (var k = lid; k < rv; k = k + WG) {
        let x0 = xin(base, 4u * k, &sq);
        let x1 = xin(base, 4u * k + 1u, &sq);
        let x2 = xin(base, 4u * k + 2u, &sq);
        let x3 = xin(base, 4u * k + 3u, &sq);
        for (var r = 0u; r < ROWS; r = r + 1u) {
            let row = row0 + r;
            if (row < p.rows) {
                let q = w[row * rv + k];
                let s = dot(i8x4(q.x), x0) + dot(i8x4(q.y), x1) + dot(i8x4(q.z), x2)
                    + dot(i8x4(q.w), x3);
                acc[r] = acc[r] + s * f16_scale(row, k / 2u);
            }
        }
    }
    acc[ROWS] = sq;
    finish(lid, row0, i, &acc REDUCE_ARGS);
}

fn u4x4(word: u32, shift: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(word) >> vec4<u32>(shift, shift + 4u, shift + 8u, shift + 12u)) & vec4<u32>(15u)) - vec4<f32>(8.0);
}

// 32 weights per vec4: one block.
@compute @workgroup_size(WG)
fn matvec_q4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 ENTRY_PARAMS) {
    let row0 = (wg.x + wg.y * p.groups_per_y) * ROWS;
    let i = wg.z;
    let base = i * p.x_stride / 4u;
    let rv = p.row_words / 4u;
    var acc: array<f32, SUMS>;
    var sq = 0.0;
    for (var k = lid; k < rv; k = k + WG) {
        var xs: array<vec4<f32>, 8>;
        for (var t = 0u; t < 8u; t = t + 1u) {
            xs[t] = xin(base, 8u * k + t, &sq);
        }
        for (var r = 0u; r < ROWS; r = r + 1u) {
            let row = row0 + r;
            if (row < p.rows) {
                let q = w[row * rv + k];
                var s = 0.0;
                for (var t = 0u; t < 4u; t = t + 1u) {
                    s = s + dot(u4x4(q[t], 0u), xs[2u * t]) + dot(u4x4(q[t], 16u), xs[2u * t + 1u]);
                }
                acc[r] = acc[r] + s * f16_scale(row, k);
            }
        }
    }
    acc[ROWS] = sq;
    finish(lid, row0, i, &acc REDUCE_ARGS);
}
