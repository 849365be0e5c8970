//! Micro-benchmarks of the page codec: encode and decode per content profile, the XOR delta,
//! and the zero-page scan. `cargo bench -p ferry-benches` (criterion; throughput in bytes of
//! guest pages per second).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry::migrate::codec::{decode, Encoder, PAGE};
use ferry::vm::memory::is_zero;
use ferry::vm::workload::{page_content, Profile};

const PAGES: u64 = 256;

fn pages(profile: Profile) -> Vec<[u8; PAGE]> {
    (0..PAGES)
        .map(|i| {
            let mut p = [0u8; PAGE];
            page_content(profile, i, 1, &mut p);
            p
        })
        .collect()
}

fn encode_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(PAGES * PAGE as u64));
    for (name, profile) in [
        ("zero", Profile::Zero),
        ("random", Profile::Random),
        ("text", Profile::Text),
        ("mixed", Profile::Mixed),
    ] {
        let src = pages(profile);
        let mut enc = Encoder::default();
        g.bench_with_input(BenchmarkId::new("encode", name), &src, |b, src| {
            b.iter(|| {
                let mut n = 0usize;
                for p in src {
                    n += enc.encode(p, None).1.len();
                }
                n
            })
        });
        let encoded: Vec<_> = src
            .iter()
            .map(|p| {
                let (e, payload) = enc.encode(p, None);
                (e, payload.to_vec())
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("decode", name), &encoded, |b, encoded| {
            let mut dst = [0u8; PAGE];
            b.iter(|| {
                for (e, payload) in encoded {
                    decode(*e, payload, &mut dst).expect("decodes");
                }
                dst[0]
            })
        });
    }
    // A page with ~1 % of its bytes changed, sent as a delta against the old version.
    let old = pages(Profile::Random);
    let new: Vec<[u8; PAGE]> = old
        .iter()
        .map(|p| {
            let mut q = *p;
            for k in (0..PAGE).step_by(100) {
                q[k] ^= 0x5a;
            }
            q
        })
        .collect();
    let mut enc = Encoder::default();
    g.bench_function("encode/delta-1pct", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for (p, base) in new.iter().zip(&old) {
                n += enc.encode(p, Some(base)).1.len();
            }
            n
        })
    });
    let zero = vec![[0u8; PAGE]; PAGES as usize];
    g.bench_function("zero-scan", |b| {
        b.iter(|| zero.iter().filter(|p| is_zero(&p[..])).count())
    });
    g.finish();
}

/// What `--encrypt` costs per byte: sealing and opening a 256 KiB page frame (AES-256-GCM).
fn seal(c: &mut Criterion) {
    use ferry::migrate::session::ClusterKey;
    use ferry::transport::seal::{data_key, Sealer, TAG_LEN};
    const FRAME: usize = 256 << 10;
    let key = data_key(&ClusterKey::from_bytes(&[7; 32]), "m-bench", "token");
    let s = Sealer::new(&key, 0);
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(FRAME as u64));
    let mut buf = vec![0x5au8; FRAME + TAG_LEN];
    let mut seq = 0u32;
    g.bench_function("seal-256k", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            s.seal(seq, &mut buf, FRAME).unwrap()
        })
    });
    let mut sealed = vec![0x5au8; FRAME + TAG_LEN];
    s.seal(1, &mut sealed, FRAME).unwrap();
    g.bench_function("open-256k", |b| {
        b.iter(|| {
            let mut p = sealed.clone();
            s.open(1, &mut p).unwrap();
            p.len()
        })
    });
    g.finish();
}

criterion_group!(benches, encode_decode, seal);
criterion_main!(benches);
