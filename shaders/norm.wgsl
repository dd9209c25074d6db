// RMSNorm and LayerNorm over one vector of `dim` values (a streaming step at batch 1),
// one workgroup: out = x / sqrt(mean(x^2) + eps) * alpha, or
// out = (x - mean) / sqrt(var + eps) * weight + bias. `g` holds alpha, or weight then bias.

struct Params {
    dim: u32,
    eps: f32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> g: array<f32>;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

// The workgroup's sum of `v`, in every invocation.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
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
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn rms_norm(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var k = lid; k < p.dim; k = k + WG) {
        acc = acc + x[k] * x[k];
    }
    let ms = workgroup_sum(lid, acc) / f32(p.dim);
    let inv = 1.0 / sqrt(ms + p.eps);
    for (var k = lid; k < p.dim; k = k + WG) {
        out[k] = x[k] * g[k] * inv;
    }
}

@compute @workgroup_size(256)
fn layer_norm(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var k = lid; k < p.dim; k = k + WG) {
        acc = acc + x[k];
    }
    let mean = workgroup_sum(lid, acc) / f32(p.dim);
    var acc2 = 0.0;
    for (var k = lid; k < p.dim; k = k + WG) {
        acc2 = acc2 + (x[k] - mean) * (x[k] - mean);
    }
    let inv = 1.0 / sqrt(workgroup_sum(lid, acc2) / f32(p.dim) + p.eps);
    for (var k = lid; k < p.dim; k = k + WG) {
        out[k] = (x[k] - mean) * inv * g[k] + g[p.dim + k];
    }
}
