// Self-attention of one streaming step over the ring KV cache, with RoPE.
//
// The ring of a layer holds `cap` steps per head (`[heads][cap][head_dim]`); step `pos`
// is written at slot `pos % cap`, so slot j holds position
// pos - ((pos % cap - j) mod cap), valid when that is not negative (positions restart at
// 0 after a reset, and the ring is never longer than the attention context).
// The rings hold f32 values, or (`kv_f16`) f16 pairs in each 32-bit word: half the bytes
// a step reads from them, for the reduced-precision formats.
// `Step` carries the position and its rotary table: (cos, sin) of each frequency, two
// frequencies per vec4, computed on the CPU exactly as the CPU path does.
//
// Attention is split over the ring (flash-decoding): `attend_part` gives each (head,
// block of 64 slots) a workgroup that leaves its block's maximum score, its sum of
// exponentials and its unnormalized weighted sum of values in `scores`; `attend_combine`
// rescales and adds the blocks of each head. A long context so keeps every compute unit
// busy instead of one workgroup per head.

struct Step {
    pos: u32,
    text_top_k: u32,
    audio_top_k: u32,
    text_temp: f32,
    audio_temp: f32,
    // Positions back a step may attend to (0: the whole ring): a streaming call of
    // several steps lets its earlier steps see as far back as the ring holds after all.
    window: u32,
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
    kv_f16: u32,
    // Blocks of `SPLIT` slots the ring is attended in.
    blocks: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read_write> kring: array<u32>;
@group(0) @binding(2) var<storage, read_write> vring: array<u32>;
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
    store_pair(r, vec2<f32>(qkv[d + e], qkv[d + e + 1u]), true);
    store_pair(r, vec2<f32>(qkv[2u * d + e], qkv[2u * d + e + 1u]), false);
}

// Stores the pair of values at element `r` (even) of the key or value ring.
fn store_pair(r: u32, v: vec2<f32>, key: bool) {
    if (p.kv_f16 != 0u) {
        let word = pack2x16float(v);
        if (key) { kring[r / 2u] = word; } else { vring[r / 2u] = word; }
    } else {
        if (key) {
            kring[r] = bitcast<u32>(v.x);
            kring[r + 1u] = bitcast<u32>(v.y);
        } else {
            vring[r] = bitcast<u32>(v.x);
            vring[r + 1u] = bitcast<u32>(v.y);
        }
    }
}

// Element `r` of a ring.
fn ring_value(r: u32, key: bool) -> f32 {
    // Branches, not `select`: a select would read both rings.
    if (p.kv_f16 != 0u) {
        var word: u32;
        if (key) { word = kring[r / 2u]; } else { word = vring[r / 2u]; }
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, (r & 1u) == 1u);
    }
    if (key) { return bitcast<f32>(kring[r]); }
    return bitcast<f32>(vring[r]);
}

@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> attn: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// Over the first `n` invocations (the workgroup's size, a power of two).
fn workgroup_reduce(lid: u32, v: f32, take_max: bool, n: u32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    var stride = n / 2u;
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
    return back <= st.pos && (st.window == 0u || back < st.window);
}

const SPLIT: u32 = 64u;
var<workgroup> probs: array<f32, 64>;

// One workgroup per (head, block of SPLIT slots): one slot per invocation. `scores` gets,
// per (head, block), `head_dim` unnormalized output values, then the block's maximum
// score and its sum of exponentials.
@compute @workgroup_size(64)
fn attend_part(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let blk = wg.y;
    let hd = p.head_dim;
    let inv_sqrt = 1.0 / sqrt(f32(hd));
    let qb = h * hd;
    let j = blk * SPLIT + lid;
    let valid = j < p.cap && slot_valid(j);
    var s = -3.4e38;
    if (valid) {
        let kb = (h * p.cap + j) * hd;
        var acc = 0.0;
        for (var e = 0u; e < hd; e = e + 1u) {
            acc = acc + (qkv[qb + e] * inv_sqrt) * ring_value(kb + e, true);
        }
        s = acc;
    }
    let mx = workgroup_reduce(lid, s, true, SPLIT);
    let pj = select(0.0, exp(s - mx), valid);
    let total = workgroup_reduce(lid, pj, false, SPLIT);
    probs[lid] = pj;
    workgroupBarrier();
    let pb = (h * p.blocks + blk) * (hd + 2u);
    for (var e = lid; e < hd; e = e + SPLIT) {
        var acc = 0.0;
        for (var t = 0u; t < SPLIT; t = t + 1u) {
            let pt = probs[t];
            if (pt != 0.0) {
                acc = acc + pt * ring_value((h * p.cap + blk * SPLIT + t) * hd + e, false);
            }
        }
        scores[pb + e] = acc;
    }
    if (lid == 0u) {
        scores[pb + hd] = mx;
        scores[pb + hd + 1u] = total;
    }
}

// One workgroup per head: the blocks' outputs rescaled to the head's maximum and added.
@compute @workgroup_size(64)
fn attend_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.x;
    let hd = p.head_dim;
    var mx = -3.4e38;
    for (var b = 0u; b < p.blocks; b = b + 1u) {
        mx = max(mx, scores[(h * p.blocks + b) * (hd + 2u) + hd]);
    }
    var den = 0.0;
    for (var b = 0u; b < p.blocks; b = b + 1u) {
        let pb = (h * p.blocks + b) * (hd + 2u);
        den = den + exp(scores[pb + hd] - mx) * scores[pb + hd + 1u];
    }
    for (var e = lid; e < hd; e = e + 64u) {
        var acc = 0.0;
        for (var b = 0u; b < p.blocks; b = b + 1u) {
            let pb = (h * p.blocks + b) * (hd + 2u);
            acc = acc + exp(scores[pb + hd] - mx) * scores[pb + e];
        }
        attn[h * hd + e] = acc / den;
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
            acc = acc + (qkv[qb + e] * inv_sqrt) * bitcast<f32>(kring[kb + e]);
        }
        m = max(m, acc);
        scores[h * p.cap + j] = acc;
    }
    let mx = workgroup_reduce(lid, m, true, WG);
    var sum = 0.0;
    for (var j = lid; j < p.cap; j = j + WG) {
        let e = exp(scores[h * p.cap + j] - mx);
        scores[h * p.cap + j] = e;
        sum = sum + e;
    }
    let total = workgroup_reduce(lid, sum, false, WG);
    storageBarrier();
    let inv = 1.0 / total;
    for (var e = lid; e < hd; e = e + WG) {
        var acc = 0.0;
        for (var j = 0u; j < p.cap; j = j + 1u) {
            acc = acc + scores[h * p.cap + j] * inv * bitcast<f32>(kring[j * 2u * d + d + h * hd + e]);
        }
        attn[h * hd + e] = acc;
    }
}
