// A tiled matrix-matrix product for many activation rows at once (a prefill: the TTS's
// conditioning rows through their key-value projections): out[i][j] (+)= epilogue(sum_k
// w[j][k] * x[i][k]), over weights in any of the matvec formats (`format`: 0 f32, 1 f16,
// 2 bf16, 3 q8_0, 4 q4; layouts as in `matvec.wgsl`).
//
// Each 16x16 workgroup computes a 16x16 block of outputs (16 weight rows by 16 activation
// rows): tiles of 32 columns of both are staged in workgroup memory, the weights
// dequantized once there, so a weight is read once per 16 activation rows instead of once
// per row as the mat-vec kernels do. Epilogue flags as in `matvec.wgsl`: 1 adds what `out`
// holds, 2 a bias, 4 multiplies by a scale.

struct Params {
    rows: u32,
    cols: u32,
    m: u32,
    out_row0: u32,
    out_stride: u32,
    row_words: u32,
    scale_word0: u32,
    flags: u32,
    aux_bias: u32,
    aux_scale: u32,
    format: u32,
    x_stride: u32,
    out_base: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

const T: u32 = 16u;
const K: u32 = 32u;
var<workgroup> wt: array<f32, 512>;
var<workgroup> xt: array<f32, 512>;

fn block_scale(row: u32, block: u32) -> f32 {
    let h = row * (p.cols / 32u) + block;
    let pair = unpack2x16float(w[p.scale_word0 + h / 2u]);
    return select(pair.x, pair.y, (h & 1u) == 1u);
}

// Weight (row, k), dequantized.
fn weight(row: u32, k: u32) -> f32 {
    let base = row * p.row_words;
    switch p.format {
        case 0u: {
            return bitcast<f32>(w[base + k]);
        }
        case 1u: {
            let v = unpack2x16float(w[base + k / 2u]);
            return select(v.x, v.y, (k & 1u) == 1u);
        }
        case 2u: {
            let word = w[base + k / 2u];
            return select(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u), (k & 1u) == 1u);
        }
        case 3u: {
            let word = w[base + k / 4u];
            let q = f32(bitcast<i32>(word << (24u - 8u * (k % 4u))) >> 24u);
            return q * block_scale(row, k / 32u);
        }
        default: {
            let word = w[base + k / 8u];
            let q = f32((word >> (4u * (k % 8u))) & 15u) - 8.0;
            return q * block_scale(row, k / 32u);
        }
    }
}

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let j0 = wg.x * T;
    let i0 = wg.y * T;
    let flat = lid.y * T + lid.x;
    var acc = 0.0;
    for (var k0 = 0u; k0 < p.cols; k0 = k0 + K) {
        for (var e = flat; e < T * K; e = e + T * T) {
            let r = e / K;
            let k = k0 + e % K;
            var wv = 0.0;
            if (j0 + r < p.rows && k < p.cols) {
                wv = weight(j0 + r, k);
            }
            wt[e] = wv;
            var xv = 0.0;
            if (i0 + r < p.m && k < p.cols) {
                xv = x[(i0 + r) * p.x_stride + k];
            }
            xt[e] = xv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < K; kk = kk + 1u) {
            acc = acc + wt[lid.x * K + kk] * xt[lid.y * K + kk];
        }
        workgroupBarrier();
    }
    let j = j0 + lid.x;
    let i = i0 + lid.y;
    if (j < p.rows && i < p.m) {
        let jj = p.out_row0 + j;
        let o = p.out_base + i * p.out_stride + jj;
        var v = acc;
        if ((p.flags & 2u) != 0u) { v = v + aux[p.aux_bias + jj]; }
        if ((p.flags & 4u) != 0u) { v = v * aux[p.aux_scale + jj]; }
        if ((p.flags & 1u) != 0u) { v = v + out[o]; }
        out[o] = v;
    }
}
