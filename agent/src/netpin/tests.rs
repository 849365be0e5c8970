//! Tests of netpin that need no BPF: speed parsing, the embedded object, the map structs
//! against the C source.

use super::*;

#[test]
fn speeds_parse() {
    assert_eq!(parse_speed("10gbit"), Ok(10_000_000_000));
    assert_eq!(parse_speed("25G"), Ok(25_000_000_000));
    assert_eq!(parse_speed("1000mbit"), Ok(1_000_000_000));
    assert_eq!(parse_speed("2.5g"), Ok(2_500_000_000));
    assert!(parse_speed("fast").is_err());
    assert!(parse_speed("-1g").is_err());
}

#[test]
fn object_is_embedded() {
    assert_eq!(&OBJECT[..4], b"\x7fELF");
}

/// `(field, offset, size)` of each field of `struct NAME` in the C source, laid out the C
/// way (each field at its natural alignment), and the struct's size.
fn c_layout(src: &str, name: &str) -> (Vec<(String, usize, usize)>, usize) {
    let start = src
        .find(&format!("\nstruct {name} {{\n"))
        .unwrap_or_else(|| panic!("no struct {name} in ebpf/netpin.bpf.c"));
    let body = &src[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
    let (mut fields, mut offset, mut align) = (Vec::new(), 0usize, 1usize);
    for line in body.lines() {
        let line = line
            .split("/*")
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(';');
        if line.is_empty() {
            continue;
        }
        let (ty, field) = line.split_once(' ').unwrap();
        let size = match ty {
            "__u8" => 1,
            "__u16" => 2,
            "__u32" => 4,
            "__u64" => 8,
            other => panic!("struct {name}: type {other} is not mirrored here"),
        };
        offset = offset.next_multiple_of(size);
        fields.push((field.trim().to_owned(), offset, size));
        offset += size;
        align = align.max(size);
    }
    (fields, offset.next_multiple_of(align))
}

/// `(field, offset, size)` of the Rust mirror's fields, and its size.
macro_rules! rust_layout {
    ($t:ty: $($f:ident),+) => {{
        let v = <$t>::default();
        (
            vec![$((
                stringify!($f).to_owned(),
                std::mem::offset_of!($t, $f),
                std::mem::size_of_val(&v.$f),
            )),+],
            std::mem::size_of::<$t>(),
        )
    }};
}

/// The map structs and the C structs agree field for field: a field added, removed,
/// renamed, reordered or retyped on either side fails here.
#[test]
fn map_structs_match_the_c_source() {
    let src = include_str!("../../../ebpf/netpin.bpf.c");
    assert_eq!(
        c_layout(src, "config"),
        rust_layout!(Config: migration_ifindex, mark, migration_addr, flags)
    );
    assert_eq!(
        c_layout(src, "counter_key"),
        rust_layout!(CounterKey: ifindex, dir, class, pad)
    );
    assert_eq!(
        c_layout(src, "counter"),
        rust_layout!(Counter: bytes, packets)
    );
}
