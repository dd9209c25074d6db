// Self-attention of one streaming step over the ring KV cache, with RoPE.
//
// The ring of a layer holds `cap` steps per head (`[heads][cap][head_dim]`); step `pos`
// is written at slot `pos % cap`, so slot j holds position
// pos - ((pos % cap - j) mod cap), valid when that is not negative (positions restart at
// 0 after a reset, and the ring is never longer than the attention context).
// `Step` carries the position and its rotary table: (cos, sin) of each frequency, two
// frequencies per vec4, computed on the CPU exactly as the CPU path does.

struct Step {
    pos: u32,
    text_top_k: u32,
    audio_top_k: u32,
    text_temp: f32,
    audio_temp: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    cs: array<vec4<f32>, 64>,
    draws: array<vec4<f32>, 16>,
}

struct Params {
    heads: u32,
    head_dim: u32,
    cap: u32,
    rope: u32,
}

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> kring: array<f32>;
@group(0) @binding(2) var<storage, read_write> vring: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;
@group(0) @binding(4) var<uniform> st: Step;

fn rotate(base: u32, c: f32, s: f32) {
    let re = qkv[base];
    let im = qkv[base + 1u];
    qkv[base] = re * c - im * s;
    qkv[base + 1u] = re * s + im * c;
}

// Rotates q and k of this step (interleaved pairs) and stores k and v in the ring.
// One invocation per (head, pair).
@compute @workgroup_size(64)
fn rope_store(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let t = gid.x;
    if (t >= p.heads * half) { return; }
    let h = t / half;
    let i = t % half;
    let d = p.heads * p.head_dim;
    let e = h * p.head_dim + 2u * i;
    if (p.rope != 0u) {
        let v = st.cs[i / 2u];
        let c = select(v.x, v.z, (i & 1u) == 1u);
        let s = select(v.y, v.w, (i & 1u) == 1u);
        rotate(e, c, s);
        rotate(d + e, c, s);
    }
    let slot = st.pos % p.cap;
    let r = (h * p.cap + slot) * p.head_dim + 2u * i;
    kring[r] = qkv[d + e];
    kring[r + 1u] = qkv[d + e + 1u];
    vring[r] = qkv[2u * d + e];
    vring[r + 1u] = qkv[2u * d + e + 1u];
}

@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> attn: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

fn workgroup_reduce(lid: u32, v: f32, take_max: bool) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    var stride = WG / 2u;
    loop {
        if (stride == 0u) { break; }
        if (lid < stride) {
            let a = partial[lid];
            let b = partial[lid + stride];
            partial[lid] = select(a + b, max(a, b), take_max);
        }
        workgroupBarrier();
        stride = stride / 2u;
    }
    let r = partial[0];
    workgroupBarrier();
    return r;
}

// Whether ring slot j holds a position of this stream.
fn slot_valid(j: u32) -> bool {
    let cur = st.pos % p.cap;
    let back = select(cur + p.cap - j, cur - j, j <= cur);
    return back <= st.pos;
}

// One workgroup per head: scores, softmax, and the weighted sum of values.
@compute @workgroup_size(256)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let hd = p.head_dim;
    let inv_sqrt = 1.0 / sqrt(f32(hd));
    let qb = h * hd;
    var m = -3.4e38;
    for (var j = lid; j < p.cap; j = j + WG) {
        var s = -3.4e38;
        if (slot_valid(j)) {
            let kb = (h * p.cap + j) * hd;
            var acc = 0.0;
            for (var e = 0u; e < hd; e = e + 1u) {
                acc = acc + (qkv[qb + e] * inv_sqrt) * kring[kb + e];
            }
            s = acc;
            m = max(m, s);
        }
        scores[h * p.cap + j] = s;
    }
    let mx = workgroup_reduce(lid, m, true);
    var sum = 0.0;
    for (var j = lid; j < p.cap; j = j + WG) {
        var e = 0.0;
        if (slot_valid(j)) {
            e = exp(scores[h * p.cap + j] - mx);
        }
        scores[h * p.cap + j] = e;
        sum = sum + e;
    }
    let total = workgroup_reduce(lid, sum, false);
    // The weighted sum below reads every invocation's probabilities.
    storageBarrier();
    let inv = 1.0 / total;
    for (var e = lid; e < hd; e = e + WG) {
        var acc = 0.0;
        for (var j = 0u; j < p.cap; j = j + 1u) {
            let pj = scores[h * p.cap + j];
            if (pj != 0.0) {
                acc = acc + pj * inv * vring[(h * p.cap + j) * hd + e];
            }
        }
        attn[h * hd + e] = acc;
    }
}

// Cross-attention of this step's queries (the first heads * head_dim values of `qkv`)
// over a conditioning fixed for the utterance: `kring` holds its `cap` rows as
// [cap][2 * heads * head_dim] (each row's keys, then its values, head by head, as the
// key-value projection writes them). No position, no mask. One workgroup per head.
@compute @workgroup_size(256)
fn cross_attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let hd = p.head_dim;
    let d = p.heads * hd;
    let inv_sqrt = 1.0 / sqrt(f32(hd));
    let qb = h * hd;
    var m = -3.4e38;
    for (var j = lid; j < p.cap; j = j + WG) {
        let kb = j * 2u * d + h * hd;
        var acc = 0.0;
        for (var e = 0u; e < hd; e = e + 1u) {
            acc = acc + (qkv[qb + e] * inv_sqrt) * kring[kb + e];
        }
        m = max(m, acc);
        scores[h * p.cap + j] = acc;
    }
    let mx = workgroup_reduce(lid, m, true);
    var sum = 0.0;
    for (var j = lid; j < p.cap; j = j + WG) {
        let e = exp(scores[h * p.cap + j] - mx);
        scores[h * p.cap + j] = e;
        sum = sum + e;
    }
    let total = workgroup_reduce(lid, sum, false);
    storageBarrier();
    let inv = 1.0 / total;
    for (var e = lid; e < hd; e = e + WG) {
        var acc = 0.0;
        for (var j = 0u; j < p.cap; j = j + 1u) {
            acc = acc + scores[h * p.cap + j] * inv * kring[j * 2u * d + d + h * hd + e];
        }
        attn[h * hd + e] = acc;
    }
}
