//! Bencode, the encoding of rtpengine's ng control protocol: byte strings, integers, lists and
//! dictionaries with sorted keys. Decoding is bounded in depth and never panics.

use std::collections::BTreeMap;

/// A bencoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A byte string.
    Bytes(Vec<u8>),
    /// An integer.
    Int(i64),
    /// A list.
    List(Vec<Value>),
    /// A dictionary (keys sorted, as the format requires).
    Dict(BTreeMap<Vec<u8>, Value>),
}

impl Value {
    /// A string value.
    pub fn str(s: &str) -> Self {
        Self::Bytes(s.as_bytes().to_vec())
    }

    /// A list of strings.
    pub fn strs(items: &[&str]) -> Self {
        Self::List(items.iter().map(|s| Self::str(s)).collect())
    }

    /// A dictionary from pairs.
    pub fn dict<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Self::Dict(
            pairs
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
        )
    }

    /// The value under `key` in a dictionary.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Self::Dict(d) => d.get(key.as_bytes()),
            _ => None,
        }
    }

    /// The value as UTF-8 text, when it is a byte string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Bytes(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The value as an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Self::Bytes(b) => {
                out.extend_from_slice(b.len().to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(b);
            }
            Self::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'e');
            }
            Self::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode_into(out);
                }
                out.push(b'e');
            }
            Self::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    Self::Bytes(k.clone()).encode_into(out);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Decodes one value that must fill `input` exactly.
    pub fn decode(input: &[u8]) -> Option<Value> {
        let (v, rest) = decode_at(input, 0)?;
        rest.is_empty().then_some(v)
    }
}

const MAX_DEPTH: usize = 32;

fn decode_at(input: &[u8], depth: usize) -> Option<(Value, &[u8])> {
    if depth > MAX_DEPTH {
        return None;
    }
    match *input.first()? {
        b'i' => {
            let end = input.iter().position(|&b| b == b'e')?;
            let n: i64 = std::str::from_utf8(&input[1..end]).ok()?.parse().ok()?;
            Some((Value::Int(n), &input[end + 1..]))
        }
        b'l' => {
            let mut rest = &input[1..];
            let mut items = Vec::new();
            while *rest.first()? != b'e' {
                let (v, r) = decode_at(rest, depth + 1)?;
                items.push(v);
                rest = r;
            }
            Some((Value::List(items), &rest[1..]))
        }
        b'd' => {
            let mut rest = &input[1..];
            let mut map = BTreeMap::new();
            while *rest.first()? != b'e' {
                let (k, r) = decode_at(rest, depth + 1)?;
                let Value::Bytes(k) = k else { return None };
                let (v, r) = decode_at(r, depth + 1)?;
                map.insert(k, v);
                rest = r;
            }
            Some((Value::Dict(map), &rest[1..]))
        }
        b'0'..=b'9' => {
            let colon = input.iter().position(|&b| b == b':')?;
            let len: usize = std::str::from_utf8(&input[..colon]).ok()?.parse().ok()?;
            let start = colon + 1;
            let end = start.checked_add(len)?;
            let bytes = input.get(start..end)?;
            Some((Value::Bytes(bytes.to_vec()), &input[end..]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts_keys() {
        let v = Value::dict([
            ("sdp", Value::str("v=0\r\n")),
            ("command", Value::str("offer")),
            ("flags", Value::strs(&["trust-address"])),
            ("n", Value::Int(-3)),
        ]);
        let e = v.encode();
        assert_eq!(
            e,
            b"d7:command5:offer5:flagsl13:trust-addresse1:ni-3e3:sdp5:v=0\r\ne".to_vec()
        );
        assert_eq!(Value::decode(&e), Some(v));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            &b""[..],
            b"d",
            b"i12",
            b"5:ab",
            b"d3:keye",
            b"di1ei2ee",
            b"x",
            b"99999999999999999999:a",
            b"18446744073709551615:a",
        ] {
            assert_eq!(Value::decode(bad), None, "{bad:?}");
        }
        let deep = format!("{}{}", "l".repeat(100), "e".repeat(100));
        assert_eq!(Value::decode(deep.as_bytes()), None);
        assert_eq!(
            Value::decode(b"d6:result4:ponge")
                .unwrap()
                .get("result")
                .unwrap()
                .as_str(),
            Some("pong")
        );
    }
}
