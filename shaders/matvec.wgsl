// Weight-streaming matrix products for small batches: out[i][j] = sum_k w[j][k] * x[i][k],
// over weights in f32, f16, bf16, q8_0 or q4, all read as 32-bit words (`w`).
//
// One workgroup per (output row j, activation row i); its 256 invocations stride over the
// row's words (coalesced) and reduce in workgroup memory. Rows beyond one dispatch
// dimension are spread over y (row = wg.x + wg.y * rows_per_y). A matrix larger than one
// binding is split into chunks of rows, one dispatch each (`out_row0`).
//
// Layouts (`row_words` words per row, rows back to back):
//   f32:  one weight per word.
//   f16, bf16: two weights per word, the lower half first.
//   q8_0: four int8 per word (lowest byte first); blocks of 32 weights share one f16
//         scale; the scales of the chunk follow its quants from word `scale_word0`, two
//         per word, in row-major block order. w = q * scale.
//   q4:   eight 4-bit values per word (lowest nibble first); blocks of 32 weights share
//         one f16 scale as in q8_0. w = (q - 8) * scale.
// Epilogue (`flags`): 2 adds aux[aux_bias + j] (a bias), 4 multiplies by
// aux[aux_scale + j] (a layer scale), 1 adds the value already in `out` (a residual).

struct Params {
    rows: u32,
    cols: u32,
    m: u32,
    rows_per_y: u32,
    out_row0: u32,
    out_stride: u32,
    row_words: u32,
    scale_word0: u32,
    flags: u32,
    aux_bias: u32,
    aux_scale: u32,
    _pad: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// Reduces the workgroup's partial sums and applies the epilogue. Every invocation calls
// it (it holds barriers); only invocation 0 of an in-range row stores.
fn finish(lid: u32, row: u32, i: u32, acc: f32) {
    partial[lid] = acc;
    workgroupBarrier();
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
    if (lid == 0u && row < p.rows) {
        let j = p.out_row0 + row;
        let o = i * p.out_stride + j;
        var v = partial[0];
        if ((p.flags & 2u) != 0u) { v = v + aux[p.aux_bias + j]; }
        if ((p.flags & 4u) != 0u) { v = v * aux[p.aux_scale + j]; }
        if ((p.flags & 1u) != 0u) { v = v + out[o]; }
        out[o] = v;
    }
}

fn f16_scale(block: u32) -> f32 {
    let pair = unpack2x16float(w[p.scale_word0 + block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}

@compute @workgroup_size(256)
fn matvec_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.rows_per_y;
    let i = wg.z;
    var acc = 0.0;
    if (row < p.rows) {
        let wb = row * p.row_words;
        let xb = i * p.cols;
        for (var k = lid; k < p.cols; k = k + WG) {
            acc = acc + bitcast<f32>(w[wb + k]) * x[xb + k];
        }
    }
    finish(lid, row, i, acc);
}

@compute @workgroup_size(256)
fn matvec_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.rows_per_y;
    let i = wg.z;
    var acc = 0.0;
    if (row < p.rows) {
        let wb = row * p.row_words;
        let xb = i * p.cols;
        for (var k = lid; k < p.row_words; k = k + WG) {
            let v = unpack2x16float(w[wb + k]);
            acc = acc + v.x * x[xb + 2u * k] + v.y * x[xb + 2u * k + 1u];
        }
    }
    finish(lid, row, i, acc);
}

@compute @workgroup_size(256)
fn matvec_bf16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.rows_per_y;
    let i = wg.z;
    var acc = 0.0;
    if (row < p.rows) {
        let wb = row * p.row_words;
        let xb = i * p.cols;
        for (var k = lid; k < p.row_words; k = k + WG) {
            let word = w[wb + k];
            let lo = bitcast<f32>(word << 16u);
            let hi = bitcast<f32>(word & 0xffff0000u);
            acc = acc + lo * x[xb + 2u * k] + hi * x[xb + 2u * k + 1u];
        }
    }
    finish(lid, row, i, acc);
}

@compute @workgroup_size(256)
fn matvec_q8_0(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.rows_per_y;
    let i = wg.z;
    var acc = 0.0;
    if (row < p.rows) {
        let wb = row * p.row_words;
        let xb = i * p.cols;
        let blocks = p.cols / 32u;
        for (var k = lid; k < p.row_words; k = k + WG) {
            let word = w[wb + k];
            let q = vec4<f32>(
                f32(bitcast<i32>(word << 24u) >> 24u),
                f32(bitcast<i32>(word << 16u) >> 24u),
                f32(bitcast<i32>(word << 8u) >> 24u),
                f32(bitcast<i32>(word) >> 24u),
            );
            let xv = vec4<f32>(x[xb + 4u * k], x[xb + 4u * k + 1u], x[xb + 4u * k + 2u], x[xb + 4u * k + 3u]);
            acc = acc + dot(q, xv) * f16_scale(row * blocks + k / 8u);
        }
    }
    finish(lid, row, i, acc);
}

@compute @workgroup_size(256)
fn matvec_q4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wg.x + wg.y * p.rows_per_y;
    let i = wg.z;
    var acc = 0.0;
    if (row < p.rows) {
        let wb = row * p.row_words;
        let xb = i * p.cols;
        let blocks = p.cols / 32u;
        for (var k = lid; k < p.row_words; k = k + WG) {
            let word = w[wb + k];
            let b = xb + 8u * k;
            let lo = vec4<f32>(
                f32(word & 15u), f32((word >> 4u) & 15u), f32((word >> 8u) & 15u), f32((word >> 12u) & 15u),
            ) - vec4<f32>(8.0);
            let hi = vec4<f32>(
                f32((word >> 16u) & 15u), f32((word >> 20u) & 15u), f32((word >> 24u) & 15u), f32(word >> 28u),
            ) - vec4<f32>(8.0);
            let s = dot(lo, vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]))
                + dot(hi, vec4<f32>(x[b + 4u], x[b + 5u], x[b + 6u], x[b + 7u]));
            acc = acc + s * f16_scale(row * blocks + k / 4u);
        }
    }
    finish(lid, row, i, acc);
}
