// Mimi's streaming codec on the GPU (see `models::mimi::gpu`): the SEANet convolutions with
// their history in GPU buffers, transposed convolutions with their overlap-add tail, ELU,
// GELU and the residual vector quantizer's search and sums. Activations are time-major
// (`[t][channels]`), as on the CPU. Offsets and counts are in f32 values.
//
// Dispatch sizes: one invocation per output value, workgroups of 64 spread over x and y
// (index = x + y * num_workgroups.x * 64).

struct P {
    n: u32,
    src_off: u32,
    dst_off: u32,
    a: u32,
    b: u32,
    c: u32,
    d: u32,
    e: u32,
    f: u32,
    g: u32,
    flags: u32,
    alpha: f32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
@group(0) @binding(3) var<storage, read> w: array<f32>;

fn index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * 64u;
}

// A streaming convolution's outputs: dst[dst_off + to * cout + co] (+)= bias[co] +
// sum over kk, ci of w[co][kk * cin + ci] * src[src_off + (to * stride + kk * dil) * cin
// + ci], `src` holding the history rows then this call's input. a: cin, b: cout, c: k,
// d: stride, e: dilation, f: bias offset in `aux`; flags 1 accumulates, 2 adds the bias.
@group(0) @binding(4) var<storage, read> aux: array<f32>;

@compute @workgroup_size(64)
fn conv1d(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = index(gid, groups);
    if (idx >= p.n) { return; }
    let cin = p.a;
    let cout = p.b;
    let to = idx / cout;
    let co = idx % cout;
    let width = p.c * cin;
    var acc = 0.0;
    for (var kk = 0u; kk < p.c; kk = kk + 1u) {
        let xb = p.src_off + (to * p.d + kk * p.e) * cin;
        let wb = co * width + kk * cin;
        for (var ci = 0u; ci < cin; ci = ci + 1u) {
            acc = acc + w[wb + ci] * src[xb + ci];
        }
    }
    if ((p.flags & 2u) != 0u) { acc = acc + aux[p.f + co]; }
    let o = p.dst_off + idx;
    if ((p.flags & 1u) != 0u) { acc = acc + dst[o]; }
    dst[o] = acc;
}

// dst[dst_off + k] = src[src_off + k] for k < n.
@compute @workgroup_size(64)
fn copy_values(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = index(gid, groups);
    if (k >= p.n) { return; }
    dst[p.dst_off + k] = src[p.src_off + k];
}

fn elu_of(v: f32) -> f32 {
    return select(v, p.alpha * (exp(v) - 1.0), v < 0.0);
}

// dst[dst_off + k] = elu(src[src_off + k]).
@compute @workgroup_size(64)
fn elu_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = index(gid, groups);
    if (k >= p.n) { return; }
    dst[p.dst_off + k] = elu_of(src[p.src_off + k]);
}

// In place over dst[dst_off ..][..n]: ELU (flags 0) or GELU with erf (flags 1).
@compute @workgroup_size(64)
fn activate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = index(gid, groups);
    if (k >= p.n) { return; }
    let v = dst[p.dst_off + k];
    if (p.flags == 1u) {
        dst[p.dst_off + k] = (erf_approx(v * 0.70710678118654752) + 1.0) * 0.5 * v;
    } else {
        dst[p.dst_off + k] = elu_of(v);
    }
}

// erf from Numerical Recipes' erfc approximation (fractional error of erfc under 1.2e-7;
// erf's absolute error within that, about f32's rounding near 1).
fn erf_approx(x: f32) -> f32 {
    let z = abs(x);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, x >= 0.0);
}

// The replicate padding of a fresh stream (`pad_mode="replicate"`): when `st.pos` is 0,
// each of the `a` history rows of `b` channels becomes a copy of the first input row.
struct Position {
    pos: u32,
}
@group(0) @binding(5) var<uniform> st: Position;

@compute @workgroup_size(64)
fn replicate_fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = index(gid, groups);
    if (k >= p.n || st.pos != 0u) { return; }
    dst[k] = dst[p.a * p.b + k % p.b];
}

// A transposed convolution of kernel 2 * stride from its columns `src`
// (`[t][2 * stride][cout]`, each input row's contribution) and its tail `w` (the previous
// call's last `stride` rows): dst[dst_off + r * cout + co] for r < t * stride.
// a: t, b: stride, c: cout; flags 2 adds aux[f + co].
@compute @workgroup_size(64)
fn overlap_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = index(gid, groups);
    if (idx >= p.n) { return; }
    let s = p.b;
    let cout = p.c;
    let r = idx / cout;
    let co = idx % cout;
    let ti = r / s;
    let kk = r % s;
    let row = 2u * s * cout;
    var v = src[ti * row + kk * cout + co];
    if (ti > 0u) {
        v = v + src[(ti - 1u) * row + (kk + s) * cout + co];
    } else {
        v = v + w[kk * cout + co];
    }
    if ((p.flags & 2u) != 0u) { v = v + aux[p.f + co]; }
    dst[p.dst_off + idx] = v;
}

// The tail a transposed convolution keeps for its next call: dst[kk * cout + co] =
// src[(t - 1) * row + (kk + stride) * cout + co]. a: t, b: stride, c: cout.
@compute @workgroup_size(64)
fn overlap_keep(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = index(gid, groups);
    if (idx >= p.n) { return; }
    let s = p.b;
    let cout = p.c;
    let kk = idx / cout;
    let co = idx % cout;
    dst[idx] = src[(p.a - 1u) * 2u * s * cout + (kk + s) * cout + co];
}

// The columns of a depthwise transposed convolution (one group per channel, Mimi's
// upsampler): dst[ti * k * c + kk * c + ch] = src[src_off + ti * c + ch] * w[kk * c + ch].
// a: k, b: c.
@compute @workgroup_size(64)
fn depthwise_cols(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let idx = index(gid, groups);
    if (idx >= p.n) { return; }
    let c = p.b;
    let width = p.a * c;
    let ti = idx / width;
    let kc = idx % width;
    dst[idx] = src[p.src_off + ti * c + kc % c] * w[kc];
}

// The residual vector quantizer. `tokens` holds the codes of a frame.
@group(0) @binding(6) var<storage, read_write> tokens: array<u32>;

var<workgroup> best_d: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

// The nearest centroid: argmin over j < n of aux[f + j] - 2 src[j] (a centroid's squared
// norm less twice its dot product with the residual), the first on ties, into tokens[a].
@compute @workgroup_size(256)
fn rvq_argmin(@builtin(local_invocation_index) lid: u32) {
    var bd = 3.4e38;
    var bi = 0u;
    for (var j = lid; j < p.n; j = j + 256u) {
        let dist = aux[p.f + j] - 2.0 * src[j];
        if (dist < bd) {
            bd = dist;
            bi = j;
        }
    }
    best_d[lid] = bd;
    best_i[lid] = bi;
    workgroupBarrier();
    var stride = 128u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            let od = best_d[lid + stride];
            let oi = best_i[lid + stride];
            if (od < best_d[lid] || (od == best_d[lid] && oi < best_i[lid])) {
                best_d[lid] = od;
                best_i[lid] = oi;
            }
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
    if (lid == 0u) {
        tokens[p.a] = best_i[0];
    }
}

// dst[dst_off + k] -= (flags 0), += (flags 1) or = (flags 2) w[tokens[a] * n + k]: a
// centroid taken from the residual, added to the decoding's sum, or starting it.
@compute @workgroup_size(64)
fn rvq_centroid(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let k = index(gid, groups);
    if (k >= p.n) { return; }
    let c = w[tokens[p.a] * p.n + k];
    if (p.flags == 2u) {
        dst[p.dst_off + k] = c;
    } else if (p.flags == 1u) {
        dst[p.dst_off + k] = dst[p.dst_off + k] + c;
    } else {
        dst[p.dst_off + k] = dst[p.dst_off + k] - c;
    }
}
