//! Property tests and a bounded mutation fuzzer for the codec (stable toolchain, no cargo-fuzz).
//! `RMQ_FUZZ_CASES=N` sets the case count per property and the mutation count (default 2000).

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rmq_agent::codec::{
    decode_frame, encode_frame, CodecError, FrameMeta, FrameScanner, Header, LanguageCode, Limits,
    SerializeType, PREFIX_LEN,
};

fn cases() -> u32 {
    std::env::var("RMQ_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

fn run<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let mut r = runner();
    let n = std::cell::Cell::new(0u64);
    let result = r.run(&strategy, |v| {
        n.set(n.get() + 1);
        test(v)
    });
    println!("{name}: {} cases", n.get());
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

// ------------------------------------------------------------------ strategies

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_%@#:.;-]{0,16}",
        "(?s).{0,24}", // any Unicode, control characters and quotes included
    ]
}

/// Keys unique (a repeated key would collapse on decode, as in Java).
fn ext_fields() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((text(), text()), 0..8).prop_map(|mut v| {
        let mut seen = std::collections::HashSet::new();
        v.retain(|(k, _)| seen.insert(k.clone()));
        v
    })
}

fn language(ser: SerializeType) -> BoxedStrategy<String> {
    let known =
        proptest::sample::select(LanguageCode::ALL.to_vec()).prop_map(|l| l.name().to_owned());
    match ser {
        // JSON keeps any string as sent.
        SerializeType::Json => prop_oneof![known, text()].boxed(),
        // Binary carries a byte: known names, or unknown bytes as their decimal text.
        SerializeType::RocketMq => {
            prop_oneof![known, (14u8..=255).prop_map(|b| b.to_string())].boxed()
        }
    }
}

fn header(ser: SerializeType) -> BoxedStrategy<Header> {
    let (code, version, remark) = match ser {
        SerializeType::Json => (
            any::<i32>().boxed(),
            any::<i32>().boxed(),
            proptest::option::of(text()).boxed(),
        ),
        // i16 on the wire; a zero-length remark reads back as None.
        SerializeType::RocketMq => (
            any::<i16>().prop_map(i32::from).boxed(),
            any::<i16>().prop_map(i32::from).boxed(),
            proptest::option::of(text().prop_filter("non-empty", |s| !s.is_empty())).boxed(),
        ),
    };
    (
        code,
        language(ser),
        version,
        any::<i32>(),
        any::<i32>(),
        remark,
        ext_fields(),
    )
        .prop_map(
            move |(code, language, version, opaque, flag, remark, ext_fields)| Header {
                code,
                language,
                version,
                opaque,
                flag,
                remark,
                ext_fields,
                serialize_type: ser,
            },
        )
        .boxed()
}

fn any_header() -> impl Strategy<Value = Header> {
    prop_oneof![header(SerializeType::Json), header(SerializeType::RocketMq)]
}

fn frame() -> impl Strategy<Value = (Header, Vec<u8>)> {
    (any_header(), proptest::collection::vec(any::<u8>(), 0..300))
}

// ------------------------------------------------------------------ relay simulation

#[derive(Debug, PartialEq)]
struct Relayed {
    /// (absolute offset, frame with `offset` made absolute too) in stream order.
    frames: Vec<(usize, FrameMeta)>,
    forwarded: usize,
    error: Option<CodecError>,
    mid_frame: Option<(usize, usize)>,
}

/// Feeds `data` in chunks of the given sizes like the relay does (keep `buf[consumed..]`,
/// append the next chunk), checking per-scan invariants. Stops at the first error.
fn relay(data: &[u8], sizes: &mut dyn Iterator<Item = usize>, limits: Limits) -> Relayed {
    let mut s = FrameScanner::new(limits);
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut r = Relayed {
        frames: Vec::new(),
        forwarded: 0,
        error: None,
        mid_frame: None,
    };
    let mut validated_end = 0;
    while fed < data.len() {
        let n = sizes
            .next()
            .unwrap_or(usize::MAX)
            .clamp(1, data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        let mut frames = Vec::new();
        let out = s.scan(&buf, &mut frames);
        for mut f in frames {
            let abs = r.forwarded + f.offset;
            f.offset = abs; // relative to each scan's slice; compare streams by absolute offset
            assert!(abs >= validated_end, "frames overlap");
            assert_eq!(
                f.frame_len,
                f.body_len + PREFIX_LEN + header_len(&data[abs..])
            );
            validated_end = abs + f.frame_len;
            r.frames.push((abs, f));
        }
        assert!(out.consumed <= buf.len());
        r.forwarded += out.consumed;
        // Never forward a byte of a frame whose header wasn't validated.
        assert!(r.forwarded <= validated_end, "forwarded unvalidated bytes");
        buf.drain(..out.consumed);
        if let Some(e) = out.error {
            assert_eq!(out.need, 0);
            r.error = Some(e);
            return r;
        }
        if buf.is_empty() {
            assert_eq!(out.need, 0);
        } else {
            assert!(
                out.need > buf.len(),
                "need {} but {} buffered",
                out.need,
                buf.len()
            );
            assert!(out.need <= PREFIX_LEN + limits.max_header);
        }
    }
    r.mid_frame = s.mid_frame();
    r
}

fn header_len(frame: &[u8]) -> usize {
    usize::from(frame[5]) << 16 | usize::from(frame[6]) << 8 | usize::from(frame[7])
}

fn whole(data: &[u8], limits: Limits) -> Relayed {
    relay(data, &mut std::iter::empty(), limits)
}

// ------------------------------------------------------------------ properties

#[test]
fn arbitrary_bytes_never_panic() {
    let limits = Limits {
        max_frame: 4096,
        max_header: 1024,
    };
    let random = proptest::collection::vec(any::<u8>(), 0..600);
    // A plausible prefix in front of random bytes reaches the header decoders more often.
    let prefixed = (
        0u8..3,
        proptest::collection::vec(any::<u8>(), 0..600),
        0usize..40,
    )
        .prop_map(|(ser, tail, slack)| {
            let hl = tail.len().saturating_sub(slack);
            let mut f = ((4 + tail.len()) as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&(u32::from(ser) << 24 | hl as u32).to_be_bytes());
            f.extend_from_slice(&tail);
            f
        });
    run(
        "arbitrary_bytes_never_panic",
        prop_oneof![random, prefixed],
        |data| {
            let _ = decode_frame(&data, &limits);
            let _ = decode_frame(&data, &Limits::default());
            let w = whole(&data, limits);
            let c = relay(&data, &mut [1usize, 3, 7].into_iter().cycle(), limits);
            prop_assert_eq!(w, c);
            Ok(())
        },
    );
}

#[test]
fn valid_frames_round_trip() {
    run("valid_frames_round_trip", frame(), |(h, body)| {
        let f = encode_frame(&h, &body);
        let (d, range) =
            decode_frame(&f, &Limits::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&d, &h);
        prop_assert_eq!(&f[range], &body[..]);
        let r = whole(&f, Limits::default());
        prop_assert_eq!(r.forwarded, f.len());
        prop_assert_eq!(r.frames.len(), 1);
        prop_assert_eq!(&r.frames[0].1.header, &h);
        Ok(())
    });
}

#[test]
fn chunking_invariance() {
    let strategy = (
        proptest::collection::vec(frame(), 1..6),
        proptest::collection::vec(1usize..90, 1..40),
    );
    run("chunking_invariance", strategy, |(frames, sizes)| {
        let mut stream = Vec::new();
        let mut starts = Vec::new();
        for (h, b) in &frames {
            starts.push(stream.len());
            stream.extend_from_slice(&encode_frame(h, b));
        }
        let r = relay(
            &stream,
            &mut sizes.iter().copied().cycle(),
            Limits::default(),
        );
        prop_assert_eq!(r.error, None);
        prop_assert_eq!(r.forwarded, stream.len());
        prop_assert_eq!(r.mid_frame, None);
        let got: Vec<_> = r
            .frames
            .iter()
            .map(|(o, f)| (*o, f.header.clone(), f.body_len))
            .collect();
        let want: Vec<_> = frames
            .iter()
            .zip(&starts)
            .map(|((h, b), o)| (*o, h.clone(), b.len()))
            .collect();
        prop_assert_eq!(got, want);
        // And a truncated stream stops mid-frame without error.
        let cut = stream.len() - 1;
        let t = relay(
            &stream[..cut],
            &mut sizes.iter().copied().cycle(),
            Limits::default(),
        );
        prop_assert_eq!(t.error, None);
        prop_assert!(t.mid_frame.is_some());
        Ok(())
    });
}

// ------------------------------------------------------------------ mutation fuzzer

/// splitmix64: deterministic, so a failure is reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Real frames from tests/fixtures plus a few synthetic ones (so the fuzzer runs without them).
fn corpus() -> (Vec<Vec<u8>>, usize) {
    let mut c = Vec::new();
    if let Ok(rd) = std::fs::read_dir(fixtures_dir()) {
        let mut paths: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        paths.sort();
        for p in paths {
            c.push(std::fs::read(&p).unwrap());
        }
    }
    let real = c.len();
    let mut h = Header::response(0, 7, Some("ok".into()));
    h.ext_fields = vec![("offset".into(), "12".into()), ("topic".into(), "T".into())];
    c.push(encode_frame(&h, b"{\"a\":1}"));
    h.serialize_type = SerializeType::RocketMq;
    c.push(encode_frame(&h, &[0u8; 40]));
    c.push(encode_frame(&Header::response(1, 8, None), b""));
    (c, real)
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    // Start from one to three whole frames (a stream), then apply 1-4 mutations.
    let mut d = Vec::new();
    for _ in 0..1 + rng.below(3) {
        d.extend_from_slice(&corpus[rng.below(corpus.len())]);
    }
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'}', b'\\', b'\n'][rng.below(9)];
            }
            2 => d.truncate(rng.below(len + 1)),
            3 if len >= 4 => {
                // Length field of the first frame: off by a little, or wild.
                let old = i32::from_be_bytes(d[..4].try_into().unwrap());
                let new = match rng.below(3) {
                    0 => old.wrapping_add(rng.below(33) as i32 - 16),
                    1 => rng.next() as i32,
                    _ => [0, 3, 4, i32::MAX, i32::MIN, -1, 16 << 20, (16 << 20) + 1][rng.below(8)],
                };
                d[..4].copy_from_slice(&new.to_be_bytes());
            }
            4 if len >= 8 => {
                // Header-length word: serialize type and/or length.
                let i = 4 + rng.below(4);
                d[i] = rng.next() as u8;
            }
            5 => {
                // Splice a random slice of another corpus entry in.
                let other = &corpus[rng.below(corpus.len())];
                let a = rng.below(other.len() + 1);
                let b = a + rng.below(other.len() - a + 1);
                let at = rng.below(len + 1);
                d.splice(at..at, other[a..b].iter().copied());
            }
            6 if len > 0 => {
                let a = rng.below(len);
                let b = a + rng.below(len - a + 1);
                d.drain(a..b);
            }
            7 if len > 0 => {
                // Duplicate a region (repeated ext entries, doubled headers).
                let a = rng.below(len);
                let b = a + rng.below((len - a).min(64) + 1);
                let chunk = d[a..b].to_vec();
                d.splice(b..b, chunk);
            }
            _ => {
                let at = rng.below(len + 1);
                let n = rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(at..at, bytes);
            }
        }
    }
    d
}

#[test]
fn mutated_real_frames() {
    let (corpus, real) = corpus();
    let seed = std::env::var("RMQ_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_u64);
    let mut rng = Rng(seed);
    let limits = Limits::default();
    let tight = Limits {
        max_frame: 2048,
        max_header: 512,
    };
    let n = cases();
    let (mut ok, mut errs, mut partial) = (0u64, 0u64, 0u64);
    for case in 0..n {
        let d = mutate(&mut rng, &corpus);
        for l in [limits, tight] {
            let _ = decode_frame(&d, &l);
            let w = whole(&d, l);
            let mut sizes = (0..).map(|_| {
                let max = if rng.below(4) == 0 { 4 } else { 200 };
                1 + rng.below(max)
            });
            let c = relay(&d, &mut sizes, l);
            assert_eq!(
                w, c,
                "case {case} (seed {seed}): chunked scan disagrees with whole scan"
            );
            // Consistent with decode_frame: every frame the scanner validated decodes on its own.
            for (o, f) in &w.frames {
                if let Some(bytes) = d.get(*o..*o + f.frame_len) {
                    let (h, body) = decode_frame(bytes, &l).expect("scanned frame decodes");
                    assert_eq!(h, f.header);
                    assert_eq!(body.len(), f.body_len);
                }
            }
            match (&w.error, w.mid_frame) {
                (Some(_), _) => errs += 1,
                (None, Some(_)) => partial += 1,
                (None, None) => {
                    assert_eq!(w.forwarded, d.len());
                    ok += 1
                }
            }
        }
    }
    println!(
        "mutated_real_frames: {n} mutants x 2 limits from {} corpus entries ({real} real fixtures), seed {seed}: \
         {ok} clean, {partial} stopped mid-frame, {errs} rejected",
        corpus.len()
    );
    assert!(
        errs > 0 && ok > 0,
        "mutator is not exercising both outcomes"
    );
}
