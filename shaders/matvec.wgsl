// Weight-streaming matrix products for small batches: out[i][j] = sum_k w[j][k] * x[i][k].
// One workgroup per (output row j, activation row i); its 256 invocations stride over the
// columns and reduce in workgroup memory. Rows beyond one dispatch dimension are spread
// over y (row = wg.x + wg.y * params.rows_per_y).

struct Params {
    rows: u32,
    cols: u32,
    m: u32,
    rows_per_y: u32,
}

@group(0) @binding(0) var<storage, read> w: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

const WG: u32 = 256u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn matvec_f32(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.x + wg.y * params.rows_per_y;
    let i = wg.z;
    // Every invocation reaches the barriers below; out-of-range rows only skip the store.
    var acc = 0.0;
    if (row < params.rows) {
        let wbase = row * params.cols;
        let xbase = i * params.cols;
        var k = lid;
        loop {
            if (k >= params.cols) { break; }
            acc = acc + w[wbase + k] * x[xbase + k];
            k = k + WG;
        }
    }
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
    if (lid == 0u && row < params.rows) {
        out[i * params.rows + row] = partial[0];
    }
}
