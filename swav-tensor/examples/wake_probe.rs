use std::time::{Duration, Instant};
fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}
fn main() {
    let work = Duration::from_micros(200);
    for gap_us in [0u64, 5, 20, 100, 1000] {
        let gap = Duration::from_micros(gap_us);
        let n = 2000;
        let t0 = Instant::now();
        let mut lost = Duration::ZERO;
        for _ in 0..n {
            spin(gap);
            let t = Instant::now();
            rayon::join(|| spin(work), || spin(work));
            lost += t.elapsed().saturating_sub(work);
        }
        let _ = t0;
        println!(
            "serial gap {gap_us:>4} us before a join of 2 x 200 us: the join takes {:.1} us extra on average",
            lost.as_secs_f64() * 1e6 / n as f64
        );
    }
}
