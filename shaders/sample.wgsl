// Token sampling on the GPU, so that only token ids come back to the CPU. One workgroup.
//
// Greedy (temperature <= 0): the first maximum, as torch.argmax. Otherwise the `top_k`
// largest logits (all when 0) are kept, found by bisecting for the k-th largest value
// (ties at the threshold are all kept), weighted by exp((l - max) / temperature), and one
// is drawn by inverse CDF in index order with the uniform draw given by the CPU's seeded
// generator.

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
    n: u32,
    // 0: text (text_top_k, text_temp), 1: audio.
    stream_class: u32,
    // Where the token goes in `tokens`, and which draw it uses.
    slot: u32,
    draw: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;
@group(0) @binding(3) var<uniform> st: Step;

const WG: u32 = 256u;
var<workgroup> val: array<f32, 256>;
var<workgroup> idx: array<u32, 256>;
var<workgroup> cnt: array<u32, 256>;
var<workgroup> chosen: u32;

fn reduce_min(lid: u32, v: f32) -> f32 {
    val[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) { val[lid] = min(val[lid], val[lid + s]); }
        workgroupBarrier();
    }
    let r = workgroupUniformLoad(&val[0]);
    workgroupBarrier();
    return r;
}

fn reduce_count(lid: u32, c: u32) -> u32 {
    cnt[lid] = c;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) { cnt[lid] = cnt[lid] + cnt[lid + s]; }
        workgroupBarrier();
    }
    // A uniform value: it decides the bisection's control flow, which holds barriers.
    let r = workgroupUniformLoad(&cnt[0]);
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn sample(@builtin(local_invocation_index) lid: u32) {
    let n = p.n;
    let temp = select(st.text_temp, st.audio_temp, p.stream_class == 1u);
    let top_k = select(st.text_top_k, st.audio_top_k, p.stream_class == 1u);
    // Each invocation owns one contiguous span, so index order is span order.
    let span = (n + WG - 1u) / WG;
    let lo = min(lid * span, n);
    let hi = min(lo + span, n);

    // Argmax with the first maximum winning.
    var best = -3.4e38;
    var best_i = 0xffffffffu;
    for (var k = lo; k < hi; k = k + 1u) {
        if (best_i == 0xffffffffu || logits[k] > best) {
            best = logits[k];
            best_i = k;
        }
    }
    val[lid] = best;
    idx[lid] = best_i;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            let a = idx[lid];
            let b = idx[lid + s];
            if (b != 0xffffffffu && (a == 0xffffffffu || val[lid + s] > val[lid]
                || (val[lid + s] == val[lid] && b < a))) {
                val[lid] = val[lid + s];
                idx[lid] = b;
            }
        }
        workgroupBarrier();
    }
    let mx = workgroupUniformLoad(&val[0]);
    let argmax = idx[0];
    workgroupBarrier();
    if (temp <= 0.0) {
        if (lid == 0u) { tokens[p.slot] = argmax; }
        return;
    }

    // The threshold: the k-th largest value, by bisection on [min, max].
    var thr = -3.4e38;
    if (top_k > 0u && top_k < n) {
        var mn = 3.4e38;
        for (var k = lo; k < hi; k = k + 1u) { mn = min(mn, logits[k]); }
        var a = reduce_min(lid, mn);
        // The bisection's bounds are the same in every invocation; only counts decide.
        var b = mx;
        // Invariant: count(>= a) >= top_k; count(>= b) may be below it.
        for (var it = 0u; it < 40u; it = it + 1u) {
            let mid = a + (b - a) * 0.5;
            if (mid <= a || mid >= b) { break; }
            var c = 0u;
            for (var k = lo; k < hi; k = k + 1u) {
                c = c + select(0u, 1u, logits[k] >= mid);
            }
            if (reduce_count(lid, c) >= top_k) { a = mid; } else { b = mid; }
        }
        thr = a;
        // count(>= b) < top_k <= count(>= a): b is above the k-th largest value, so the
        // values kept are those >= a, which include the top k.
    }

    // Weights and the inverse CDF in index order.
    var part = 0.0;
    for (var k = lo; k < hi; k = k + 1u) {
        if (logits[k] >= thr) { part = part + exp((logits[k] - mx) / temp); }
    }
    val[lid] = part;
    workgroupBarrier();
    if (lid == 0u) {
        var total = 0.0;
        for (var t = 0u; t < WG; t = t + 1u) { total = total + val[t]; }
        let dv = st.draws[p.draw / 4u];
        let u = select(select(select(dv.x, dv.y, (p.draw & 3u) == 1u), dv.z, (p.draw & 3u) == 2u), dv.w, (p.draw & 3u) == 3u);
        var r = u * total;
        var owner = WG - 1u;
        for (var t = 0u; t < WG; t = t + 1u) {
            if (r < val[t]) { owner = t; break; }
            r = r - val[t];
        }
        // Hand the remainder to the owning span through `val[0]`.
        idx[0] = owner;
        val[1] = r;
    }
    workgroupBarrier();
    let owner = idx[0];
    let rem = val[1];
    if (lid == owner) {
        var r = rem;
        var pick = argmax;
        var last = argmax;
        var found = false;
        for (var k = lo; k < hi; k = k + 1u) {
            if (logits[k] >= thr) {
                let wk = exp((logits[k] - mx) / temp);
                last = k;
                if (!found && r < wk) { pick = k; found = true; }
                r = r - wk;
            }
        }
        if (!found) { pick = last; }
        tokens[p.slot] = pick;
    }
}

// The TTS: which of the two text tokens the CPU's state machine prepared is fed after
// the prediction in tokens[0] (index 0 after a new-word prediction, 1 otherwise), into
// tokens[p.slot]; the depformer's text embedding is picked by it.
@compute @workgroup_size(1)
fn tts_feed() {
    tokens[p.slot] = select(1u, 0u, tokens[0] == 0u);
}
