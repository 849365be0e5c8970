//! Micro-benchmarks of the data path: the page codec (encode and decode per content profile,
//! the XOR delta, the zero-page scan), frame sealing (`--encrypt`), the dirty-bitmap scan, and
//! page-frame encode/decode. `cargo bench -p ferry-benches` (criterion; throughput per second).

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
    use ferry::auth::ClusterKey;
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

/// Scanning the dirty bitmap of a 4 GiB guest (1 Mi pages) with 1 % and 50 % of pages dirty.
fn dirty_scan(c: &mut Criterion) {
    use ferry::vm::memory::{DirtyBitmap, RegionBitmap, RegionLayout};
    let layout = RegionLayout {
        gpa: 0,
        size: 4 << 30,
    };
    let mut g = c.benchmark_group("dirty-bitmap");
    g.throughput(Throughput::Elements(layout.pages()));
    for pct in [1u64, 50] {
        let mut r = RegionBitmap::empty(layout);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for p in 0..layout.pages() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 100 < pct {
                r.set(p);
            }
        }
        let bm = DirtyBitmap { regions: vec![r] };
        g.bench_with_input(
            BenchmarkId::new("scan-4g", format!("{pct}pct")),
            &bm,
            |b, bm| b.iter(|| bm.iter_gpa().fold(0u64, |a, g| a ^ g)),
        );
    }
    g.finish();
}

/// A page frame: encode (header, CRC-32C) and decode (header and payload checks, records).
fn frames(c: &mut Criterion) {
    use ferry::migrate::protocol::{
        encode_frame, parse_records, push_record, Command, Encoding, FrameReader,
    };
    let text = pages(Profile::Text);
    let mut payload = Vec::new();
    for (i, p) in text.iter().take(60).enumerate() {
        push_record(&mut payload, i as u64 * PAGE as u64, Encoding::Raw, p);
    }
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode-240k", |b| {
        b.iter(|| encode_frame(Command::Pages, 60, &payload, 1).len())
    });
    let frame = encode_frame(Command::Pages, 60, &payload, 0);
    let mut buf = Vec::new();
    g.bench_function("decode-240k", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(std::io::Cursor::new(&frame[..]));
            let (_, count) = r.next_into(&mut buf).unwrap();
            parse_records(&buf, count).unwrap().len()
        })
    });
    g.finish();
}

criterion_group!(benches, encode_decode, seal, dirty_scan, frames);
criterion_main!(benches);
