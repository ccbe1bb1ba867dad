use rayon::prelude::*;
use std::time::Instant;
use swav_tensor::matmul::{matmul, MatMut, MatRef, Threads};

fn best(mut f: impl FnMut()) -> f64 {
    f();
    let mut b = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
    let mut c = vec![0f32; m * n];
    let fl = 2.0 * (m * n * k) as f64 / 1e9;
    // row-major C = A B, B given as [n, k] transposed (like conv weights)
    let t = best(|| {
        matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&b, n, k).t(), false, Threads::Pool)
    });
    println!("pool   A[m,k] W[n,k]^T : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
    let t =
        best(|| matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, Threads::Pool));
    println!("pool   A[m,k] W[k,n]   : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
    for tile in [128usize, 256, 512, 1024, 2048] {
        let t = best(|| {
            c.par_chunks_mut(tile * n).enumerate().for_each(|(i, out)| {
                let rows = out.len() / n;
                matmul(
                    MatMut::new(out, rows, n),
                    MatRef::new(&a[i * tile * k..(i * tile + rows) * k], rows, k),
                    MatRef::new(&b, n, k).t(),
                    false,
                    Threads::Serial,
                )
            })
        });
        println!("tiles {tile:5} W^T        : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
        let t = best(|| {
            c.par_chunks_mut(tile * n).enumerate().for_each(|(i, out)| {
                let rows = out.len() / n;
                matmul(
                    MatMut::new(out, rows, n),
                    MatRef::new(&a[i * tile * k..(i * tile + rows) * k], rows, k),
                    MatRef::new(&b, k, n),
                    false,
                    Threads::Serial,
                )
            })
        });
        println!("tiles {tile:5} W          : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
    }
    // weight-gradient style: C[n,k] += Dy^T[n, m] X[m, k], split-k in 8 chunks
    let dy: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
    let mut dw = vec![0f32; n * k];
    let t = best(|| {
        matmul(MatMut::new(&mut dw, n, k), MatRef::new(&dy, m, n).t(), MatRef::new(&a, m, k), true, Threads::Pool)
    });
    println!("wgrad pool full depth  : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
    for chunks in [2usize, 4, 8, 16] {
        let chunk = m.div_ceil(chunks);
        let t = best(|| {
            let parts: Vec<Vec<f32>> = (0..chunks)
                .into_par_iter()
                .map(|cidx| {
                    let mut acc = vec![0f32; n * k];
                    let (s, e) = (cidx * chunk, ((cidx + 1) * chunk).min(m));
                    matmul(
                        MatMut::new(&mut acc, n, k),
                        MatRef::new(&dy[s * n..e * n], e - s, n).t(),
                        MatRef::new(&a[s * k..e * k], e - s, k),
                        true,
                        Threads::Serial,
                    );
                    acc
                })
                .collect();
            for p in parts {
                for (d, v) in dw.iter_mut().zip(p) {
                    *d += v;
                }
            }
        });
        println!("wgrad {chunks:2} chunks full    : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
        // transposed output: dw^T[k, n] = X^T Dy
        let t = best(|| {
            let parts: Vec<Vec<f32>> = (0..chunks)
                .into_par_iter()
                .map(|cidx| {
                    let mut acc = vec![0f32; n * k];
                    let (s, e) = (cidx * chunk, ((cidx + 1) * chunk).min(m));
                    matmul(
                        MatMut::new(&mut acc, k, n),
                        MatRef::new(&a[s * k..e * k], e - s, k).t(),
                        MatRef::new(&dy[s * n..e * n], e - s, n),
                        true,
                        Threads::Serial,
                    );
                    acc
                })
                .collect();
            for p in parts {
                for (d, v) in dw.iter_mut().zip(p) {
                    *d += v;
                }
            }
        });
        println!("wgrad {chunks:2} chunks T-out   : {:.1} ms {:.1} GF/s", t * 1e3, fl / t);
    }
}
