use rayon::prelude::*;
use std::time::Instant;
use swav_tensor::matmul::{matmul, MatMut, MatRef, Threads};

fn best(mut f: impl FnMut()) -> f64 {
    f();
    let mut b = f64::INFINITY;
    for _ in 0..4 {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn main() {
    let shapes = [
        (50176, 64, 256),
        (50176, 256, 64),
        (12544, 512, 128),
        (12544, 128, 512),
        (3136, 1024, 256),
        (3136, 256, 1024),
        (784, 2048, 512),
        (784, 512, 2048),
        (432, 2048, 512),
        (432, 512, 2048),
    ];
    for (m, k, n) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
        let mut c = vec![0f32; m * n];
        let fl = 2.0 * (m * n * k) as f64 / 1e9;
        let mut line = format!("{m:6} {k:5} {n:5}:");
        let t = best(|| {
            matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&b, n, k).t(), false, Threads::Pool)
        });
        line += &format!(" poolWt {:6.1}", fl / t);
        let t = best(|| {
            matmul(MatMut::new(&mut c, m, n), MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, Threads::Pool)
        });
        line += &format!(" poolW {:6.1}", fl / t);
        for tile in [256usize, 512, 1024] {
            let tile = tile.min(m.div_ceil(2));
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
            line += &format!(" t{tile}W {:6.1}", fl / t);
        }
        println!("{line}");
    }
}
