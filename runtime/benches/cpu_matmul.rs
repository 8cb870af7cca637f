//! MatMul through the CPU executor on the SmolLM2-135M shapes: x[512, K] @ W[K, N] for the projections
//! and the lm_head, and the batched attention products [9, 512, 64] x [9, 64, 512].
//! Also the calibration forward's bf16 products (`bf16_gemm::gemm_nt`, 4096 rows: a batch of 8 x 512
//! tokens) against the f32 GEMM on the same operands, in the same run.
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

fn bench_bf16(c: &mut Criterion) {
    use qcc_runtime::cpu::bf16_gemm::{self, Strided};
    if !bf16_gemm::available() {
        eprintln!("bf16_gemm: skipped (no AVX512-BF16 on this CPU)");
        return;
    }
    let mut group = c.benchmark_group("bf16_gemm");
    group.sample_size(10);
    let m = 4096;
    for (k, n) in [(576, 576), (576, 1536), (1536, 576)] {
        let (x, w) = (values(m * k), values(n * k));
        let mut y = vec![0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(format!("bf16 {m}x{k}x{n}"), |bench| {
            bench.iter(|| {
                bf16_gemm::gemm_nt(&Strided::rows(&x, m, k), &Strided::rows(&w, n, k), &mut y, n, false, false)
            })
        });
        group.bench_function(format!("f32 {m}x{k}x{n}"), |bench| {
            // SAFETY: x is [m x k], w is [n x k] read as its transpose [k x n], y is [m x n].
            bench.iter(|| unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    x.as_ptr(),
                    k as isize,
                    1,
                    w.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    y.as_mut_ptr(),
                    n as isize,
                    1,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_bf16);
criterion_main!(benches);
