//! The emulator against known answers: every built-in of the shim, and every misuse it should report.

use swav_cuda_emu::{bf16_from_f32, bf16_to_f32, Arg, Buffer, Elem, EmuError, Emulator, Launch, Schedule, Source};

fn emulator() -> Option<Emulator> {
    Emulator::new_or_skip(&[Source { name: "features.cu", code: include_str!("kernels/features.cu") }])
}

fn run(emu: &Emulator, l: Launch, bufs: &mut [Buffer]) {
    emu.launch(&l, bufs, Schedule::Forward).unwrap();
}

#[test]
fn three_d_indices_and_block_reductions() {
    let Some(emu) = emulator() else { return };
    let (grid, block) = ([3, 2, 2], [8, 4, 3]);
    let blocks = 12;
    let per = 96;
    let x: Vec<f32> = (0..blocks * per).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut bufs =
        vec![Buffer::from_f32(&x), Buffer::poisoned(Elem::F32, blocks), Buffer::poisoned(Elem::U32, blocks * per)];
    for schedule in [Schedule::Forward, Schedule::Reverse] {
        let l = Launch::new("sum3d", grid, block, vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2)]);
        emu.launch(&l, &mut bufs, schedule).unwrap();
        for b in 0..blocks {
            let want: f32 = x[b * per..(b + 1) * per].iter().sum();
            assert_eq!(bufs[1].as_f32()[b], want, "block {b}");
        }
        let ids: Vec<u32> = (0..(blocks * per) as u32).collect();
        assert_eq!(bufs[2].as_u32(), &ids[..]);
    }
    // 120 threads: the last warp has 24 lanes, and the xor shuffle reads lanes that do not exist.
    let l = Launch::new("sum3d", [1, 1, 1], [8, 5, 3], vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2)]);
    let err = emu.launch(&l, &mut bufs, Schedule::Forward).unwrap_err();
    assert!(matches!(&err, EmuError::Launch(m) if m.contains("does not exist")), "{err}");
}

#[test]
fn dynamic_shared_memory_is_per_block() {
    let Some(emu) = emulator() else { return };
    let n = 100;
    let input: Vec<i32> = (0..n).collect();
    let mut bufs = vec![Buffer::from_i32(&input), Buffer::poisoned(Elem::I32, n as usize)];
    let mut l = Launch::new("reverse_blocks", [4, 1, 1], [32, 1, 1], vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(n)]);
    l.shared_bytes = 32 * 4;
    run(&emu, l, &mut bufs);
    let out = bufs[1].as_i32();
    for (i, &v) in out.iter().enumerate().take(96) {
        assert_eq!(v, (i / 32 * 32 + 31 - i % 32) as i32);
    }
    // The last block's slice holds -1 for the missing inputs, reversed.
    assert_eq!(&out[96..], &[-1, -1, -1, -1]);
    l = Launch::new("reverse_blocks", [1, 1, 1], [32, 1, 1], vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(n)]);
    l.shared_bytes = 64 * 1024;
    assert!(matches!(emu.launch(&l, &mut bufs, Schedule::Forward), Err(EmuError::Launch(_))));
}

#[test]
fn shuffle_down_keeps_own_value_past_the_warp() {
    let Some(emu) = emulator() else { return };
    let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let mut bufs = vec![Buffer::from_f32(&x), Buffer::poisoned(Elem::F32, 2)];
    run(&emu, Launch::new("shfl_down_sum", [1, 1, 1], [64, 1, 1], vec![Arg::Buf(0), Arg::Buf(1)]), &mut bufs);
    assert_eq!(bufs[1].as_f32(), &[(0..32).sum::<i32>() as f32, (32..64).sum::<i32>() as f32]);
}

#[test]
fn atomics_from_concurrent_blocks() {
    let Some(mut emu) = emulator() else { return };
    emu.set_workers(3);
    let n = 1000i64;
    let mut bufs = vec![Buffer::zeros(Elem::F32, 1), Buffer::zeros(Elem::I32, 1), Buffer::zeros(Elem::U32, 1)];
    run(
        &emu,
        Launch::new("atomics", [8, 1, 1], [128, 1, 1], vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::I64(n)]),
        &mut bufs,
    );
    assert_eq!(bufs[0].as_f32()[0], n as f32);
    assert_eq!(bufs[1].as_i32()[0], (0..n as i32).sum::<i32>());
    assert_eq!(bufs[2].as_u32()[0], n as u32 - 1);
}

#[test]
fn bf16_conversion_matches_the_rust_helper_bit_for_bit() {
    let Some(emu) = emulator() else { return };
    let mut x: Vec<f32> = (0..300).map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 9 - 4)).collect();
    x.extend([f32::NAN, f32::INFINITY, -0.0, f32::MAX, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]);
    let n = x.len();
    let mut bufs = vec![
        Buffer::from_f32(&x),
        Buffer::poisoned(Elem::Bf16, n),
        Buffer::poisoned(Elem::F32, n),
        Buffer::poisoned(Elem::F32, n),
    ];
    let grid = (n as u32).div_ceil(64);
    run(
        &emu,
        Launch::new(
            "convert",
            [grid, 1, 1],
            [64, 1, 1],
            vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(n as i32)],
        ),
        &mut bufs,
    );
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(bufs[1].as_bf16_bits()[i], bf16_from_f32(v), "value {v}");
        assert_eq!(bufs[2].as_f32()[i].to_bits(), bf16_to_f32(bf16_from_f32(v)).to_bits());
    }
    let want = x[5].exp() + 1.0 / (x[5].abs() + 1.0).sqrt() + x[5].max(0.0) + 3.0;
    assert!((bufs[3].as_f32()[5] - want).abs() <= 1e-6 * want.abs());
}

#[test]
fn scalars_of_every_kind_arrive_intact() {
    let Some(emu) = emulator() else { return };
    let mut bufs = vec![Buffer::poisoned(Elem::U64, 6), Buffer::from_u8(&[200, 100])];
    let args = vec![
        Arg::Buf(0),
        Arg::I32(-5),
        Arg::U32(4_000_000_000),
        Arg::F32(1.5),
        Arg::I64(-(1 << 40)),
        Arg::U64(u64::MAX - 1),
        Arg::Buf(1),
    ];
    run(&emu, Launch::new("scalars", [1, 1, 1], [32, 1, 1], args), &mut bufs);
    assert_eq!(
        bufs[0].as_u64(),
        &[(-5i64) as u64, 4_000_000_000, 1.5f32.to_bits() as u64, (-(1i64 << 40)) as u64, u64::MAX - 1, 300]
    );
}

#[test]
fn misuse_is_reported_not_hung_or_silent() {
    let Some(emu) = emulator() else { return };
    let mut bufs = vec![Buffer::zeros(Elem::F32, 32), Buffer::zeros(Elem::I32, 32), Buffer::zeros(Elem::F32, 20)];
    let one = |k: &str, args: Vec<Arg>| Launch::new(k, [1, 1, 1], [32, 1, 1], args);
    let err = emu.launch(&one("divergent_barrier", vec![Arg::Buf(0)]), &mut bufs, Schedule::Forward).unwrap_err();
    assert!(matches!(&err, EmuError::Launch(m) if m.contains("exited without reaching a __syncthreads")), "{err}");
    let err = emu.launch(&one("divergent_shuffle", vec![Arg::Buf(0)]), &mut bufs, Schedule::Forward).unwrap_err();
    assert!(matches!(&err, EmuError::Launch(m) if m.contains("exited without reaching a warp")), "{err}");
    let err = emu.launch(&one("deadlock", vec![Arg::Buf(0)]), &mut bufs, Schedule::Forward).unwrap_err();
    assert!(matches!(&err, EmuError::Launch(m) if m.contains("deadlock")), "{err}");
    let err = emu.launch(&one("overrun", vec![Arg::Buf(2), Arg::I32(20)]), &mut bufs, Schedule::Forward).unwrap_err();
    assert!(matches!(&err, EmuError::Overrun(m) if m.contains("past its end")), "{err}");
    // Wrong element type, wrong scalar kind, wrong count, unknown kernel: refused before running.
    for (k, args) in [
        ("overrun", vec![Arg::Buf(1), Arg::I32(1)]),
        ("overrun", vec![Arg::Buf(0), Arg::F32(1.0)]),
        ("overrun", vec![Arg::Buf(0)]),
        ("nope", vec![]),
    ] {
        let err = emu.launch(&one(k, args), &mut bufs, Schedule::Forward).unwrap_err();
        assert!(matches!(err, EmuError::Arguments(_)), "{err}");
    }
    let err = emu.launch(
        &Launch::new("overrun", [1, 1, 1], [2048, 1, 1], vec![Arg::Buf(0), Arg::I32(1)]),
        &mut bufs,
        Schedule::Forward,
    );
    assert!(matches!(err, Err(EmuError::Launch(_))));
}

#[test]
fn a_race_shows_up_as_a_difference_between_schedules() {
    let Some(emu) = emulator() else { return };
    let mut a = vec![Buffer::zeros(Elem::F32, 64)];
    let mut b = vec![Buffer::zeros(Elem::F32, 64)];
    let l = Launch::new("racy", [1, 1, 1], [64, 1, 1], vec![Arg::Buf(0)]);
    emu.launch(&l, &mut a, Schedule::Forward).unwrap();
    emu.launch(&l, &mut b, Schedule::Reverse).unwrap();
    assert_ne!(a[0].as_f32(), b[0].as_f32());
}

#[test]
fn null_pointers_for_optional_buffers() {
    let Some(emu) = emulator() else { return };
    let mut bufs = vec![Buffer::from_f32(&[1.0; 32]), Buffer::zeros(Elem::F32, 32), Buffer::zeros(Elem::F32, 32)];
    let l = |m| Launch::new("optional_out", [1, 1, 1], [32, 1, 1], vec![Arg::Buf(0), m, Arg::Buf(2)]);
    run(&emu, l(Arg::Null), &mut bufs);
    assert_eq!(bufs[2].as_f32(), &[1.0; 32]);
    run(&emu, l(Arg::Buf(1)), &mut bufs);
    assert_eq!(bufs[2].as_f32(), &[2.0; 32]);
    assert_eq!(bufs[1].as_f32(), &[7.0; 32]);
}
