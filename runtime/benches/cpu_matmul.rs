//! MatMul through the CPU executor on the SmolLM2-135M shapes: x[512, K] @ W[K, N] for the projections
//! and the lm_head, and the batched attention products [9, 512, 64] x [9, 64, 512].
//! Run: `cargo bench -p qcc-runtime --bench cpu_matmul`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcc_ir::{DType, Graph, Op, OpKind, TensorType};
use qcc_runtime::{CpuExecutor, RtTensor};

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn matmul_graph(a: &[usize], b: &[usize]) -> CpuExecutor {
    let mut g = Graph::new("mm");
    let x = g.add_input("a", TensorType::known(DType::F32, a)).expect("fresh graph");
    let w = g.add_input("b", TensorType::known(DType::F32, b)).expect("fresh graph");
    let y = g.add_op(Op::new(OpKind::MatMul), &[x, w], TensorType::unranked(DType::F32));
    g.add_output("y", y);
    CpuExecutor::new(&g).expect("valid graph")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_matmul");
    group.sample_size(10);
    let cases: [(&[usize], &[usize]); 7] = [
        (&[512, 576], &[576, 576]),
        (&[512, 576], &[576, 192]),
        (&[512, 576], &[576, 1536]),
        (&[512, 1536], &[1536, 576]),
        (&[512, 576], &[576, 49152]),
        (&[9, 512, 64], &[9, 64, 512]),
        (&[9, 512, 512], &[9, 512, 64]),
    ];
    for (a, b) in cases {
        let exec = matmul_graph(a, b);
        let ta = RtTensor::from_vec(a, values(a.iter().product())).expect("sizes match");
        let tb = RtTensor::from_vec(b, values(b.iter().product())).expect("sizes match");
        let (m, k, n) = (a[a.len() - 2], a[a.len() - 1], b[b.len() - 1]);
        let batch: usize = a[..a.len() - 2].iter().product();
        group.throughput(Throughput::Elements((2 * batch * m * k * n) as u64));
        group.bench_function(format!("{a:?}x{b:?}"), |bench| {
            bench.iter(|| exec.run(&[("a", ta.clone()), ("b", tb.clone())]).expect("runs"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
