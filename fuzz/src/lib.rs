//! Fuzzing of every decoder of bytes eventbus did not write itself, on the stable toolchain: inputs
//! made by mutating seed inputs (real encodings, fixtures) with structure-aware mutations (bit
//! flips, interesting integers over length fields, splices, cuts, JSON and query tokens; for
//! checksummed formats, a checksum recomputed after the mutation so the decoder's inner layers are
//! reached). Each input runs under a watch on the largest single allocation, so a decoder that
//! trusts a length field it did not check against the input fails even when it does not crash.
//!
//! Not coverage-guided: cargo-fuzz needs a nightly toolchain these machines cannot install, and
//! cargo-afl (stable, but it builds AFL++ and an LLVM plugin first) has not been tried yet. The targets and
//! their seeds live in `tests/decoders.rs`; `FUZZ_INPUTS` sets inputs per target (10,000 by
//! default; docs/testing.md has the long run), `FUZZ_SEED` replays a run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The system allocator, recording the largest single allocation made on a watched thread.
pub struct Watched;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    let _ = WATCHING.try_with(|watching| {
        if watching.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

/// Runs `f` and returns the largest single allocation it made (with [`Watched`] as the global
/// allocator of the test binary).
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    WATCHING.with(|w| w.set(true));
    let out = f();
    WATCHING.with(|w| w.set(false));
    (out, LARGEST.with(Cell::get))
}

/// How a checksummed format is sealed again after a mutation.
#[derive(Clone, Copy, Debug)]
pub enum Seal {
    None,
    /// `[len u32][crc32c u32][payload]`, as a log record.
    Record,
    /// `[body][crc32c u32 of body]`, as the checkpoint and the retention manifest.
    Trailing,
}

fn reseal(input: &mut [u8], seal: Seal) {
    match seal {
        Seal::None => {}
        Seal::Record if input.len() >= 8 => {
            let payload = input.len() - 8;
            input[0..4].copy_from_slice(&(payload as u32).to_le_bytes());
            let crc = crc32c::crc32c(&input[8..]);
            input[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        Seal::Trailing if input.len() >= 4 => {
            let body = input.len() - 4;
            let crc = crc32c::crc32c(&input[..body]);
            input[body..].copy_from_slice(&crc.to_le_bytes());
        }
        _ => {}
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// Tokens that steer text decoders (JSON, query strings, ids) into their corners.
const TOKENS: [&str; 24] = [
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\\u0000",
    "\\ud800",
    "null",
    "true",
    "-0",
    "1e999",
    "18446744073709551616",
    "%",
    "%zz",
    "%e2%82",
    "&",
    "=",
    "+",
    ".",
    ">",
    "*",
    "\u{10ffff}",
];

/// One mutation of `input`, with `others` to splice from.
fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = input.len();
    match rng.random_range(0..10) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = rng.random();
        }
        2 if len > 0 => {
            // An interesting integer over what may be a length or count field.
            let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
            let width = [1, 2, 4, 8][rng.random_range(0..4)];
            let i = rng.random_range(0..len);
            let bytes = value.to_le_bytes();
            for (k, b) in bytes.iter().take(width).enumerate() {
                if let Some(slot) = input.get_mut(i + k) {
                    *slot = *b;
                }
            }
        }
        3 => {
            let i = rng.random_range(0..=len);
            let n = rng.random_range(1..16);
            let fresh: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            input.splice(i..i, fresh);
        }
        4 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(64));
            input.drain(i..i + n);
        }
        5 if len > 0 => {
            // Repeat a run: lists that grow, fields that repeat.
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(256));
            let run = input[i..i + n].to_vec();
            input.splice(i..i, run);
        }
        6 if !others.is_empty() => {
            let other = &others[rng.random_range(0..others.len())];
            if !other.is_empty() {
                let from = rng.random_range(0..other.len());
                let cut = rng.random_range(0..=len);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
        7 if len > 0 => input.truncate(rng.random_range(0..len)),
        _ => {
            let token = TOKENS[rng.random_range(0..TOKENS.len())];
            let i = rng.random_range(0..=len);
            input.splice(i..i, token.bytes());
        }
    }
}

/// Inputs per target: `FUZZ_INPUTS`, or 10,000.
pub fn inputs() -> usize {
    std::env::var("FUZZ_INPUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000)
}

/// Feeds `target` the seeds and then `inputs()` mutations of them; panics (naming the target, the
/// seed of the run and the input) when the target panics or allocates more than `max_alloc(len)`
/// at once. Returns how many inputs the target accepted.
pub fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    seal: Seal,
    max_alloc: impl Fn(usize) -> usize,
    target: impl Fn(&[u8]) -> bool + std::panic::RefUnwindSafe,
) -> usize {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let run_seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(run_seed);
    let mut accepted = 0;
    let total = inputs();
    for n in 0..seeds.len() + total {
        let input = if n < seeds.len() {
            seeds[n].clone()
        } else {
            let mut input = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..=8) {
                mutate(&mut rng, &mut input, seeds);
            }
            if rng.random_bool(0.5) {
                reseal(&mut input, seal);
            }
            input
        };
        let outcome = std::panic::catch_unwind(|| largest_allocation(|| target(&input)));
        let show = || {
            let shown: String = String::from_utf8_lossy(&input[..input.len().min(512)]).into();
            format!(
                "{name}: FUZZ_SEED={run_seed}, input {n} ({} bytes): {shown:?}",
                input.len()
            )
        };
        match outcome {
            Ok((ok, largest)) => {
                assert!(
                    largest <= max_alloc(input.len()),
                    "{}: allocated {largest} bytes at once",
                    show()
                );
                accepted += usize::from(ok);
            }
            Err(_) => panic!("{} made the decoder panic", show()),
        }
    }
    accepted
}
