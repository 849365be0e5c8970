//! Unit tests of the agent ⇄ VMM protocol: frames, limits, malformed input.
use super::*;
use crate::vm::{GuestKind, WorkloadParams};

fn spec() -> VmSpec {
    VmSpec {
        name: "t".into(),
        memory_mib: 64,
        vcpus: 1,
        kind: GuestKind::Workload(WorkloadParams::default()),
        disks: vec![],
        nics: vec![],
        cpu: Default::default(),
    }
}

fn hello_reply(version: u32) -> Reply {
    Reply::Hello(Box::new(HelloReply {
        protocol_version: version,
        binary_version: "9.9.9".into(),
        name: "t".into(),
        instance_id: 7,
        pid: 1,
        monitor_pid: 2,
        started_unix_ms: 3,
        mode: Mode::Create,
        spec: spec(),
        regions: vec![RegionLayout {
            gpa: 0,
            size: 64 << 20,
        }],
        state: VmStatus::Created,
        test_requests: false,
    }))
}

fn body(frame: &[u8]) -> &[u8] {
    let len = parse_header(frame[..HEADER].try_into().unwrap()).unwrap();
    assert_eq!(len, frame.len() - HEADER);
    &frame[HEADER..]
}

#[test]
fn requests_and_replies_round_trip() {
    let reqs = vec![
        Request::Hello(HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            binary_version: "0.1.0".into(),
        }),
        Request::Status,
        Request::Console {
            offset: 5,
            max: 100,
        },
        Request::MarkDirty {
            regions: vec![vec![1, 2, 3, 4, 5, 6, 7, 8]],
        },
        Request::RestoreState {
            state: vec![9; 1000],
        },
        Request::DeliverFrames {
            nic: 1,
            frames: vec![vec![0xff; 60]],
        },
        Request::TestForbiddenSyscall,
    ];
    for r in reqs {
        let f = encode(&r, "request").unwrap();
        assert_eq!(decode_request(body(&f)).unwrap(), r);
    }
    let replies = vec![
        hello_reply(PROTOCOL_VERSION),
        Reply::error(ErrorKind::State, "paused"),
        Reply::Ok,
        Reply::Dirty {
            regions: vec![words_to_bytes(&[1, u64::MAX])],
        },
        Reply::Paused {
            took_us: 12,
            quiesced: Quiesced::default(),
        },
    ];
    for r in replies {
        let f = encode(&r, "reply").unwrap();
        match decode_reply(body(&f)).unwrap() {
            DecodedReply::Reply(d) => assert_eq!(d, r),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bitmap_words_and_bytes() {
    let w = vec![0, 1, 0x8000_0000_0000_0001, u64::MAX];
    let b = words_to_bytes(&w);
    assert_eq!(b.len(), 32);
    assert_eq!(bytes_to_words(&b, 4).unwrap(), w);
    assert!(bytes_to_words(&b, 3).is_none());
    assert!(bytes_to_words(&b[..31], 4).is_none());
}

#[test]
fn headers_are_checked() {
    let f = encode(&Request::Status, "request").unwrap();
    let mut h: [u8; HEADER] = f[..HEADER].try_into().unwrap();
    assert!(parse_header(&h).is_ok());
    h[0] = b'X';
    assert!(matches!(parse_header(&h), Err(ProtocolError::Magic(_))));
    let mut h: [u8; HEADER] = f[..HEADER].try_into().unwrap();
    h[4..8].copy_from_slice(&((MAX_FRAME + 1) as u32).to_le_bytes());
    assert!(matches!(parse_header(&h), Err(ProtocolError::TooLarge(_))));
}

#[test]
fn another_versions_hello_is_recognised() {
    // A Hello of a future version with fields this build does not know.
    #[derive(Serialize)]
    struct FutureHello {
        protocol_version: u32,
        binary_version: String,
        something_new: Vec<u64>,
    }
    #[derive(Serialize)]
    enum FutureRequest {
        Hello(FutureHello),
    }
    let f = encode(
        &FutureRequest::Hello(FutureHello {
            protocol_version: 7,
            binary_version: "7.0.0".into(),
            something_new: vec![1, 2, 3],
        }),
        "request",
    )
    .unwrap();
    // Trailing bytes of a future request are not this build's business: what matters is
    // that the version can be read.
    let prefix = match decode_request(body(&f)) {
        Ok(Request::Hello(h)) => VersionPrefix {
            protocol_version: h.protocol_version,
            binary_version: h.binary_version,
        },
        Ok(other) => panic!("{other:?}"),
        Err((_, p)) => p.expect("prefix"),
    };
    assert_eq!(prefix.protocol_version, 7);
    assert!(!compatible(7));
    assert!(compatible(PROTOCOL_VERSION));
    // A Hello reply whose later fields this build cannot decode.
    #[derive(Serialize)]
    enum FutureReply {
        Hello(FutureHello),
    }
    let f = encode(
        &FutureReply::Hello(FutureHello {
            protocol_version: 8,
            binary_version: "8.0.0".into(),
            something_new: vec![],
        }),
        "reply",
    )
    .unwrap();
    match decode_reply(body(&f)).unwrap() {
        DecodedReply::OtherHello(p) => {
            assert_eq!(p.protocol_version, 8);
            assert_eq!(p.binary_version, "8.0.0");
        }
        other => panic!("{other:?}"),
    }
    let m = version_message((8, "8.0.0"), (1, "0.1.0"));
    assert!(m.contains("protocol 8 (ferry 8.0.0)") && m.contains("protocol 1 (ferry 0.1.0)"));
}

#[test]
fn garbage_bodies_are_errors_not_panics() {
    let good = encode(&hello_reply(PROTOCOL_VERSION), "reply").unwrap();
    let b = body(&good).to_vec();
    for cut in 0..b.len() {
        let _ = decode_reply(&b[..cut]);
        let _ = decode_request(&b[..cut]);
    }
    for i in 0..b.len() {
        let mut c = b.clone();
        c[i] = c[i].wrapping_add(0x55);
        let _ = decode_reply(&c);
        let _ = decode_request(&c);
    }
    // A claimed huge vector in a tiny body fails without allocating it.
    let mut evil = vec![13u8]; // RestoreState
    evil.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(decode_request(&evil).is_err());
    assert!(decode_request(&[200]).is_err());
    assert!(decode_request(&[]).is_err());
}

#[test]
fn frames_and_fds_cross_a_socket_pair() {
    let (a, b) = UnixStream::pair().unwrap();
    let f = encode(&Request::Status, "request").unwrap();
    // Two descriptors with the frame: both ends of a pipe.
    let mut p = [0; 2];
    // SAFETY: pipe2 into a two-element array; the results are owned below.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors from pipe2.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    write_frame(
        &a,
        &f,
        &[std::os::fd::AsFd::as_fd(&r), std::os::fd::AsFd::as_fd(&w)],
    )
    .unwrap();
    write_frame(&a, &f, &[]).unwrap();
    let got = read_frame(&b, || {}).unwrap();
    assert_eq!(decode_request(&got.body).unwrap(), Request::Status);
    assert_eq!(got.fds.len(), 2);
    // The received write end writes into the pipe whose read end we kept.
    let mut wf = std::fs::File::from(got.fds.into_iter().nth(1).unwrap());
    io::Write::write_all(&mut wf, b"x").unwrap();
    let mut rf = std::fs::File::from(r);
    let mut one = [0u8; 1];
    rf.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
    let got = read_frame(&b, || {}).unwrap();
    assert!(got.fds.is_empty());
    // A bad magic, then a clean close.
    io::Write::write_all(&mut &a, b"GARBAGE!").unwrap();
    assert!(matches!(
        read_frame(&b, || {}),
        Err(ProtocolError::Magic(_))
    ));
    drop(a);
    assert!(matches!(read_frame(&b, || {}), Err(ProtocolError::Closed)));
}
