//! `RemotingCommand` headers: JSON (serialize type 0) and ROCKETMQ binary (type 1).

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::code::LanguageCode;
use super::error::CodecError;

/// Header encoding, the top byte of the header-length word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SerializeType {
    Json,
    RocketMq,
}

impl SerializeType {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Json),
            1 => Some(Self::RocketMq),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Self::Json => 0,
            Self::RocketMq => 1,
        }
    }

    /// Name used by `serializeTypeCurrentRPC`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::RocketMq => "ROCKETMQ",
        }
    }
}

pub const FLAG_RESPONSE: i32 = 1;
pub const FLAG_ONEWAY: i32 = 1 << 1;

/// `version` of headers the agent creates: V4_9_4, i.e. modern enough that clients
/// don't disable SQL92 filtering, and a 4.x ordinal every SDK knows.
pub const AGENT_VERSION: i32 = 401;

/// A decoded `RemotingCommand` header (the body is not part of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub code: i32,
    /// Enum name as sent ("JAVA", "CPP", …). A binary or numeric language outside
    /// the known range is kept as its decimal text so it survives re-encoding.
    pub language: String,
    pub version: i32,
    pub opaque: i32,
    pub flag: i32,
    pub remark: Option<String>,
    /// Wire order; a repeated key keeps its first position and its last value (Java `HashMap.put`).
    pub ext_fields: Vec<(String, String)>,
    pub serialize_type: SerializeType,
}

impl Header {
    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    pub fn ext(&self, key: &str) -> Option<&str> {
        self.ext_fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A JSON response (JSON because CPP and Node clients can't read binary headers).
    pub fn response(code: i32, opaque: i32, remark: Option<String>) -> Header {
        Header {
            code,
            language: LanguageCode::Java.name().to_owned(),
            version: AGENT_VERSION,
            opaque,
            flag: FLAG_RESPONSE,
            remark,
            ext_fields: Vec::new(),
            serialize_type: SerializeType::Json,
        }
    }
}

/// Decodes a header of the given serialize type (exactly `bytes`, no frame prefix).
pub fn decode_header(ser: SerializeType, bytes: &[u8]) -> Result<Header, CodecError> {
    match ser {
        SerializeType::Json => decode_json(bytes),
        SerializeType::RocketMq => decode_binary(bytes),
    }
}

// ---------------------------------------------------------------- JSON

/// A JSON string decoded like Java/Go do: a lone surrogate escape (`"\ud800"`, which fastjson
/// accepts) becomes U+FFFD instead of failing the whole header.
struct Lossy(String);

impl<'de> Deserialize<'de> for Lossy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Lossy;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON string")
            }
            fn visit_str<E>(self, v: &str) -> Result<Lossy, E> {
                Ok(Lossy(v.to_owned()))
            }
            // serde_json hands strings with lone surrogates over as WTF-8 bytes.
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Lossy, E> {
                Ok(Lossy(String::from_utf8_lossy(v).into_owned()))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A JSON object as (key, raw value) pairs in wire order: keeps number text exact
/// and lets us coerce types the way fastjson does.
struct RawObject<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(Lossy(k)) = m.next_key()? {
                    v.push((k, m.next_value::<&RawValue>()?));
                }
                Ok(RawObject(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn json_err(what: impl fmt::Display) -> CodecError {
    CodecError::JsonHeader(what.to_string())
}

fn json_str(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<Lossy>(raw.get()).ok().map(|l| l.0)
}

/// fastjson coerces numeric strings into int fields; so do we.
fn json_int(field: &str, raw: &RawValue) -> Result<i32, CodecError> {
    let text = raw.get();
    let parsed = match text.as_bytes().first() {
        Some(b'"') => json_str(raw).and_then(|s| s.trim().parse::<i32>().ok()),
        _ if text == "null" => Some(0),
        _ => text.parse::<i32>().ok(),
    };
    parsed.ok_or_else(|| {
        json_err(format_args!(
            "\"{field}\" is not a 32-bit integer: {}",
            clip(text)
        ))
    })
}

/// Non-string scalars become their exact JSON text (`123`, `true`); `null` means absent.
fn json_text(raw: &RawValue) -> Option<String> {
    match raw.get() {
        "null" => None,
        t if t.starts_with('"') => json_str(raw),
        t => Some(t.to_owned()),
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Java's `HashMap.put` semantics: a repeated key keeps its first slot and takes the last value.
/// Hash-based so a 1 MiB header of tiny repeated keys stays linear.
fn dedup_ext(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(v.len());
    let mut repeats = Vec::new();
    for (i, (k, _)) in v.iter().enumerate() {
        match first.entry(k.as_str()) {
            Entry::Occupied(e) => repeats.push((i, *e.get())),
            Entry::Vacant(e) => {
                e.insert(i);
            }
        }
    }
    if repeats.is_empty() {
        return v;
    }
    let mut keep = vec![true; v.len()];
    for (from, to) in repeats {
        v[to].1 = std::mem::take(&mut v[from].1);
        keep[from] = false;
    }
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    v
}

fn decode_json(bytes: &[u8]) -> Result<Header, CodecError> {
    let top: RawObject = serde_json::from_slice(bytes).map_err(json_err)?;
    let mut h = Header {
        code: 0,
        language: LanguageCode::Java.name().to_owned(), // Java's field default
        version: 0,
        opaque: 0,
        flag: 0,
        remark: None,
        ext_fields: Vec::new(),
        serialize_type: SerializeType::Json,
    };
    let mut have_code = false;
    for (key, raw) in top.0 {
        match key.as_str() {
            "code" => {
                h.code = json_int("code", raw)?;
                have_code = true;
            }
            "opaque" => h.opaque = json_int("opaque", raw)?,
            "flag" => h.flag = json_int("flag", raw)?,
            "version" => h.version = json_int("version", raw)?,
            "language" => {
                if let Some(s) = json_text(raw) {
                    h.language = match s.parse::<u8>() {
                        Ok(b) if !raw.get().starts_with('"') => language_name(b),
                        _ => s,
                    };
                }
            }
            "remark" => h.remark = json_text(raw),
            "extFields" if raw.get() == "null" => h.ext_fields.clear(),
            "extFields" => {
                let obj: RawObject = serde_json::from_str(raw.get())
                    .map_err(|e| json_err(format_args!("\"extFields\" is not an object: {e}")))?;
                let ext = obj
                    .0
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, json_text(v)?)));
                h.ext_fields = dedup_ext(ext.collect());
            }
            // Unknown keys (serializeTypeCurrentRPC included) are ignored, as fastjson does.
            _ => {}
        }
    }
    if !have_code {
        return Err(json_err("no \"code\" field"));
    }
    Ok(h)
}

fn language_name(b: u8) -> String {
    match LanguageCode::from_byte(b) {
        Some(l) => l.name().to_owned(),
        None => b.to_string(),
    }
}

fn language_byte(name: &str) -> u8 {
    LanguageCode::from_name(name)
        .map(LanguageCode::byte)
        .or_else(|| name.parse().ok())
        .unwrap_or(LanguageCode::Other.byte())
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Java-style JSON header: alphabetical keys, ext values always strings
/// (GO decodes extFields into `map[string]string` and rejects numbers).
pub fn encode_json_header(h: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        128 + h
            .ext_fields
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>(),
    );
    out.extend_from_slice(format!("{{\"code\":{}", h.code).as_bytes());
    if !h.ext_fields.is_empty() {
        out.extend_from_slice(b",\"extFields\":{");
        for (i, (k, v)) in h.ext_fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_str(&mut out, k);
            out.push(b':');
            push_json_str(&mut out, v);
        }
        out.push(b'}');
    }
    out.extend_from_slice(format!(",\"flag\":{},\"language\":", h.flag).as_bytes());
    push_json_str(&mut out, &h.language);
    out.extend_from_slice(format!(",\"opaque\":{}", h.opaque).as_bytes());
    if let Some(r) = &h.remark {
        out.extend_from_slice(b",\"remark\":");
        push_json_str(&mut out, r);
    }
    out.extend_from_slice(
        format!(
            ",\"serializeTypeCurrentRPC\":\"JSON\",\"version\":{}}}",
            h.version
        )
        .as_bytes(),
    );
    out
}

// ---------------------------------------------------------------- binary

/// Bounds-checked big-endian reader; every length is checked against what is left.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], CodecError> {
        if n > self.buf.len() {
            return Err(CodecError::BinaryHeader(format!(
                "{} {field} needs {n} bytes, only {} left",
                self.what,
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn i16(&mut self, field: &str) -> Result<i16, CodecError> {
        self.array(field).map(i16::from_be_bytes)
    }

    fn i32(&mut self, field: &str) -> Result<i32, CodecError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn len(&mut self, field: &str, len: i64) -> Result<&'a [u8], CodecError> {
        let n = usize::try_from(len).map_err(|_| {
            CodecError::BinaryHeader(format!("{} {field} length is negative ({len})", self.what))
        })?;
        self.take(n, field)
    }
}

/// Java decodes with `new String(bytes, UTF_8)`, which replaces bad sequences rather than failing.
fn utf8(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn decode_binary(bytes: &[u8]) -> Result<Header, CodecError> {
    let mut r = Reader {
        buf: bytes,
        what: "header",
    };
    let code = i32::from(r.i16("code")?);
    let [lang] = r.array::<1>("language")?;
    let version = i32::from(r.i16("version")?);
    let opaque = r.i32("opaque")?;
    let flag = r.i32("flag")?;
    let remark_len = r.i32("remark length")?;
    let remark = r.len("remark", remark_len.into())?;
    let ext_len = r.i32("extFields length")?;
    let ext = r.len("extFields", ext_len.into())?;
    // Bytes after the ext block are ignored, as RocketMQSerializable does.
    let mut e = Reader {
        buf: ext,
        what: "extFields",
    };
    let mut ext_fields = Vec::new();
    while !e.buf.is_empty() {
        let kl = e.i16("key length")?;
        let k = e.len("key", kl.into())?;
        let vl = e.i32("value length")?;
        let v = e.len("value", vl.into())?;
        ext_fields.push((utf8(k), utf8(v)));
    }
    let ext_fields = dedup_ext(ext_fields);
    Ok(Header {
        code,
        language: language_name(lang),
        version,
        opaque,
        flag,
        // Java reads a zero-length string as null.
        remark: (!remark.is_empty()).then(|| utf8(remark)),
        ext_fields,
        serialize_type: SerializeType::RocketMq,
    })
}

/// ROCKETMQ binary header. `code` and `version` are truncated to i16 exactly as Java does
/// (so 200050 goes out as 3442: POP-family requests must use JSON). Entries whose key is
/// longer than i16::MAX bytes cannot be represented and are skipped.
pub fn encode_binary_header(h: &Header) -> Vec<u8> {
    let remark = h.remark.as_deref().unwrap_or("").as_bytes();
    let mut ext = Vec::new();
    for (k, v) in &h.ext_fields {
        let (Ok(kl), Ok(vl)) = (i16::try_from(k.len()), i32::try_from(v.len())) else {
            continue;
        };
        ext.extend_from_slice(&kl.to_be_bytes());
        ext.extend_from_slice(k.as_bytes());
        ext.extend_from_slice(&vl.to_be_bytes());
        ext.extend_from_slice(v.as_bytes());
    }
    let mut out = Vec::with_capacity(21 + remark.len() + ext.len());
    out.extend_from_slice(&(h.code as i16).to_be_bytes());
    out.push(language_byte(&h.language));
    out.extend_from_slice(&(h.version as i16).to_be_bytes());
    out.extend_from_slice(&h.opaque.to_be_bytes());
    out.extend_from_slice(&h.flag.to_be_bytes());
    out.extend_from_slice(&(remark.len() as i32).to_be_bytes());
    out.extend_from_slice(remark);
    out.extend_from_slice(&(ext.len() as i32).to_be_bytes());
    out.extend_from_slice(&ext);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Header, CodecError> {
        decode_header(SerializeType::Json, s.as_bytes())
    }

    #[test]
    fn java_style_request() {
        let h = json(r#"{"code":11,"extFields":{"consumerGroup":"g","queueId":"0"},"flag":0,"language":"JAVA","opaque":42,"serializeTypeCurrentRPC":"JSON","version":401}"#).unwrap();
        assert_eq!((h.code, h.opaque, h.flag, h.version), (11, 42, 0, 401));
        assert_eq!(h.language, "JAVA");
        assert_eq!(
            h.ext_fields,
            vec![
                ("consumerGroup".into(), "g".into()),
                ("queueId".into(), "0".into())
            ]
        );
        assert_eq!(h.ext("queueId"), Some("0"));
        assert_eq!(h.ext("nope"), None);
        assert!(!h.is_response() && !h.is_oneway());
    }

    #[test]
    fn lenient_json() {
        // cpp: trailing newline, numeric ext values; ali-ons: booleans; long numbers keep every digit.
        let h = json("{\"code\":\"10\",\"language\":9,\"opaque\":\"-5\",\"flag\":3,\"extFields\":{\"a\":123,\"b\":true,\"c\":null,\"d\":12345678901234567890123,\"e\":-0.5e3},\"remark\":null,\"x\":{\"y\":[1,2]}}\n").unwrap();
        assert_eq!((h.code, h.opaque, h.flag, h.version), (10, -5, 3, 0));
        assert_eq!(h.language, "GO");
        assert_eq!(h.remark, None);
        assert!(h.is_response() && h.is_oneway());
        let ext: Vec<_> = h
            .ext_fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            ext,
            ["a=123", "b=true", "d=12345678901234567890123", "e=-0.5e3"]
        );

        let h = json(r#"{"code":0,"extFields":null,"language":200}"#).unwrap();
        assert!(h.ext_fields.is_empty());
        assert_eq!(h.language, "200");
        assert_eq!(encode_binary_header(&h)[2], 200);
        assert_eq!(json(r#"{"code":0}"#).unwrap().language, "JAVA");
        assert_eq!(
            json(r#"{"code":0,"language":"KOTLIN"}"#).unwrap().language,
            "KOTLIN"
        );
        // Lone surrogates (legal for fastjson) don't fail the header.
        let h =
            json(r#"{"code":1,"remark":"a\ud800","extFields":{"k\udc00":"\ud83d\ude00\udfff"}}"#)
                .unwrap();
        assert_eq!(h.remark.as_deref(), Some("a\u{fffd}\u{fffd}\u{fffd}"));
        assert_eq!(h.ext_fields[0].1, "\u{1f600}\u{fffd}\u{fffd}\u{fffd}");
        // Duplicate ext key: first position, last value.
        let h = json(r#"{"code":1,"extFields":{"k":"1","j":"2","k":"3"}}"#).unwrap();
        assert_eq!(
            h.ext_fields,
            vec![("k".into(), "3".into()), ("j".into(), "2".into())]
        );
    }

    #[test]
    fn many_repeated_ext_keys_stay_linear() {
        let n = 150_000;
        let mut s = String::from("{\"code\":1,\"extFields\":{");
        for i in 0..n {
            s.push_str(&format!("\"k{}\":{i},", i % 1000));
        }
        s.push_str("\"z\":0}}");
        let t = std::time::Instant::now();
        let h = json(&s).unwrap();
        assert_eq!(h.ext_fields.len(), 1001);
        assert_eq!(h.ext("k7"), Some(&*format!("{}", n - 1000 + 7)));
        assert_eq!(h.ext_fields[1].0, "k1");
        let mut b = Header {
            serialize_type: SerializeType::RocketMq,
            ..h.clone()
        };
        b.ext_fields = (0..n).map(|i| ("k".to_owned(), i.to_string())).collect();
        let d = decode_header(SerializeType::RocketMq, &encode_binary_header(&b)).unwrap();
        assert_eq!(d.ext_fields, vec![("k".to_owned(), (n - 1).to_string())]);
        assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
    }

    #[test]
    fn bad_json() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"opaque":1}"#,
            r#"{"code":1.5}"#,
            r#"{"code":"x"}"#,
            r#"{"code":4294967296}"#,
            r#"{"code":1,"extFields":[1]}"#,
            "{\"code\":1}x",
        ] {
            let e = json(bad).unwrap_err();
            assert_eq!(e.kind(), "json_header", "{bad:?}: {e}");
        }
        // Deep nesting hits serde_json's recursion limit instead of the stack.
        let deep = format!(
            "{{\"code\":1,\"x\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let _ = json(&deep);
    }

    #[test]
    fn json_encode_order_and_round_trip() {
        let mut h = Header::response(17, 9, Some("no \"topic\"\n".into()));
        h.ext_fields = vec![("z".into(), "1".into()), ("a".into(), "ü".into())];
        let bytes = encode_json_header(&h);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert_eq!(
            text,
            r#"{"code":17,"extFields":{"z":"1","a":"ü"},"flag":1,"language":"JAVA","opaque":9,"remark":"no \"topic\"\n","serializeTypeCurrentRPC":"JSON","version":401}"#
        );
        assert_eq!(json(text).unwrap(), h);
        let bare = Header::response(0, 1, None);
        assert_eq!(
            json(std::str::from_utf8(&encode_json_header(&bare)).unwrap()).unwrap(),
            bare
        );
    }

    #[test]
    fn binary_round_trip_and_quirks() {
        let h = Header {
            code: -2,
            language: "GO".into(),
            version: 317,
            opaque: i32::MIN,
            flag: 2,
            remark: Some("r".into()),
            ext_fields: vec![("k".into(), "v".into()), ("".into(), "".into())],
            serialize_type: SerializeType::RocketMq,
        };
        let b = encode_binary_header(&h);
        assert_eq!(&b[..3], &[0xff, 0xfe, 9]);
        assert_eq!(decode_header(SerializeType::RocketMq, &b).unwrap(), h);
        // Trailing bytes after the ext block are ignored (Java does).
        let mut t = b.clone();
        t.extend_from_slice(b"junk");
        assert_eq!(decode_header(SerializeType::RocketMq, &t).unwrap(), h);
        // POP codes overflow the i16, as in Java.
        let pop = Header {
            code: 200050,
            ..h.clone()
        };
        assert_eq!(
            decode_header(SerializeType::RocketMq, &encode_binary_header(&pop))
                .unwrap()
                .code,
            3442
        );
        // Empty remark is null on the wire.
        let empty = Header {
            remark: Some(String::new()),
            ..h.clone()
        };
        assert_eq!(
            decode_header(SerializeType::RocketMq, &encode_binary_header(&empty))
                .unwrap()
                .remark,
            None
        );
        // Unknown language byte survives as its number.
        let mut u = b.clone();
        u[2] = 99;
        let d = decode_header(SerializeType::RocketMq, &u).unwrap();
        assert_eq!(d.language, "99");
        assert_eq!(encode_binary_header(&d), u);
    }

    #[test]
    fn bad_binary_lengths() {
        let h = Header {
            ext_fields: vec![("key".into(), "value".into())],
            ..Header::response(1, 2, Some("rem".into()))
        };
        let b = encode_binary_header(&h);
        for cut in 0..b.len() {
            let e = decode_header(SerializeType::RocketMq, &b[..cut]).unwrap_err();
            assert_eq!(e.kind(), "binary_header", "cut {cut}: {e}");
        }
        let remark_len_at = 13;
        for lie in [i32::MAX, -1, 4] {
            let mut m = b.clone();
            m[remark_len_at..remark_len_at + 4].copy_from_slice(&lie.to_be_bytes());
            assert!(decode_header(SerializeType::RocketMq, &m).is_err(), "{lie}");
        }
        let ext_at = remark_len_at + 4 + 3 + 4;
        for (off, lie) in [
            (0usize, &[0x7f, 0xff][..]),
            (0, &[0xff, 0xff]),
            (5, &[0x80, 0, 0, 0]),
            (5, &[0, 0, 1, 0]),
        ] {
            let mut m = b.clone();
            m[ext_at + off..ext_at + off + lie.len()].copy_from_slice(lie);
            let e = decode_header(SerializeType::RocketMq, &m).unwrap_err();
            assert!(e.to_string().contains("extFields"), "{e}");
        }
    }
}
