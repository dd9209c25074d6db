// Small vector operations of a model step: the SiLU gate of the feed-forward, the sums
// of embedding rows, a vector added, and the softmax of the extra heads.

struct Params {
    n: u32,
    // embed_sum: rows gathered; embed_add: first row of this chunk of the table.
    rows: u32,
    // 0: f32, 1: bf16 (tables are never quantized).
    format: u32,
    // embed_add: which token (index into `tokens`); embed_sum: unused.
    token: u32,
    // embed_add: rows in this chunk.
    chunk_rows: u32,
    // softmax_small: offset of the output in `out`.
    out_off: u32,
    // embed_add: 1 sets `out` to the row (0 where the token is not in this chunk:
    // single-chunk tables only) instead of adding it.
    overwrite: u32,
    _p1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

// Element k of a table row starting at word `base`.
fn table_value(base_elem: u32, k: u32) -> f32 {
    if (p.format == 0u) {
        return bitcast<f32>(src[base_elem + k]);
    }
    let e = base_elem + k;
    let word = src[e / 2u];
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (e & 1u) == 1u));
}

// out[k] = silu(a[k]) * b[k] where src holds [a (n), b (n)] as f32 bits.
@compute @workgroup_size(64)
fn gate_silu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if (k >= p.n) { return; }
    let a = bitcast<f32>(src[k]);
    let b = bitcast<f32>(src[p.n + k]);
    out[k] = a / (1.0 + exp(-a)) * b;
}

// out[k] = sum over the `rows` gathered rows of row[k], in order (the embeddings of every
// stream of a step, copied into `src` by the command encoder).
@compute @workgroup_size(64)
fn embed_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if (k >= p.n) { return; }
    var acc = 0.0;
    for (var r = 0u; r < p.rows; r = r + 1u) {
        acc = acc + table_value(r * p.n, k);
    }
    out[k] = acc;
}

@group(0) @binding(3) var<storage, read> tokens: array<u32>;

// out[k] += table[token][k] when the token falls in this chunk of the table (the
// depformer's embedding of the token sampled just before, which never leaves the GPU).
@compute @workgroup_size(64)
fn embed_add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let t = tokens[p.token];
    if (k >= p.n) { return; }
    if (t < p.rows || t >= p.rows + p.chunk_rows) {
        if (p.overwrite != 0u) { out[k] = 0.0; }
        return;
    }
    let v = table_value((t - p.rows) * p.n, k);
    out[k] = select(out[k] + v, v, p.overwrite != 0u);
}

// out[k] += src[k] (a vector added to every step's input: the TTS's summed conditions).
@compute @workgroup_size(64)
fn add_vec(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    if (k >= p.n) { return; }
    out[k] = out[k] + bitcast<f32>(src[k]);
}

// out[out_off + k] = softmax(src as f32)[k] for a short vector (the extra heads).
@compute @workgroup_size(1)
fn softmax_small() {
    var m = -3.4e38;
    for (var k = 0u; k < p.n; k = k + 1u) {
        m = max(m, bitcast<f32>(src[k]));
    }
    var sum = 0.0;
    for (var k = 0u; k < p.n; k = k + 1u) {
        sum = sum + exp(bitcast<f32>(src[k]) - m);
    }
    for (var k = 0u; k < p.n; k = k + 1u) {
        out[p.out_off + k] = exp(bitcast<f32>(src[k]) - m) / sum;
    }
}
