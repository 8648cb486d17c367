//! The registration journal on disk: an append-only file of AoR states. Each record holds
//! the whole set of bindings of one AoR after a change (an empty set: the AoR is gone), so
//! the newest record of an AoR is its state and replaying the file in order rebuilds the
//! store. Records are framed `[payload length u32][CRC-32 of the payload u32][payload]`,
//! little endian, after an 8-byte header naming the format; a record torn by a crash (or
//! damaged on disk) fails its length or checksum and ends the replay there.
//!
//! The file is rewritten as a snapshot of the live bindings at start-up and when it has grown
//! to several times the last snapshot (refreshes append a record each). A rewrite goes to a
//! new file that replaces the old one by `rename`, so a crash leaves one or the other whole.
//!
//! Why not SQLite rows, as until 0.1 (`location.db`): a change was a DELETE of the AoR's rows
//! and an INSERT per binding into a table and its index, and each group commit wrote the
//! touched B-tree pages again to the WAL: 13% of the server's CPU at 2,000 REGISTER/s. A
//! record here is encoded into a buffer and written with the others of its batch by one
//! `write(2)`. A write is acknowledged when the kernel has it (as SQLite with
//! `synchronous=NORMAL` did): a crash of the process loses nothing, a power cut may lose the
//! last moments; snapshots are synced before they replace the journal.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};

use careflow_core::{Binding, Transport};

/// The first bytes of a journal: the format and its version.
pub const MAGIC: &[u8; 8] = b"CFLOCJ1\n";
const FRAME: usize = 8;
/// A longer record is damage, not data (an AoR holds at most a few dozen bindings).
const MAX_RECORD: usize = 1 << 22;
/// The journal is rewritten once it is this large and several times its last snapshot.
const REWRITE_MIN: u64 = 8 << 20;
const REWRITE_FACTOR: u64 = 4;

/// Appends one framed record to `out`: `aor` now has exactly `bindings`.
pub(crate) fn put_record<'a>(
    out: &mut Vec<u8>,
    aor: &str,
    bindings: impl ExactSizeIterator<Item = &'a Binding> + Clone,
) {
    // Reserved at once: growing from empty took ~7 reallocations per registration.
    out.reserve(FRAME + 8 + aor.len() + bindings.clone().map(binding_len_bound).sum::<usize>());
    let start = out.len();
    out.extend_from_slice(&[0; FRAME]);
    put_str(out, aor);
    put_u32(out, bindings.len() as u32);
    for b in bindings {
        put_binding(out, b);
    }
    let payload = &out[start + FRAME..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + FRAME].copy_from_slice(&crc);
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            out.push(1);
            put_u32(out, v);
        }
        None => out.push(0),
    }
}

/// What survives a restart: not the connection (this process's numbering) nor the cluster
/// owner route (the embedded store serves one node); a loaded binding is `here`.
fn put_binding(out: &mut Vec<u8>, b: &Binding) {
    put_u64(out, b.id);
    put_str(out, &b.contact);
    put_str(out, &b.call_id);
    put_u32(out, b.cseq);
    put_u64(out, b.expires_at);
    put_u64(out, b.registered_at);
    put_opt_u32(out, b.q.map(u32::from));
    put_opt_str(out, b.instance.as_deref());
    put_opt_u32(out, b.reg_id);
    out.push(b.transport.code());
    match b.source {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            // A link-local address is only reachable through its interface (the scope).
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            put_u32(out, a.flowinfo());
            put_u32(out, a.scope_id());
        }
    }
    out.extend_from_slice(&b.source.port().to_le_bytes());
    put_opt_str(out, b.user_agent.as_deref());
    put_u32(out, b.path.len() as u32);
    for p in &b.path {
        put_str(out, p);
    }
}

/// At least the bytes [`put_binding`] writes for `b`: its strings and their length prefixes,
/// plus the fixed fields (88 bytes with every option set and an IPv6 source).
fn binding_len_bound(b: &Binding) -> usize {
    let opt = |s: Option<&str>| s.map_or(0, str::len);
    96 + b.contact.len()
        + b.call_id.len()
        + opt(b.instance.as_deref())
        + opt(b.user_agent.as_deref())
        + b.path.iter().map(|p| 4 + p.len()).sum::<usize>()
}

/// Reads a payload; `None` on anything out of shape.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).ok().map(str::to_string)
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        Some(if self.flag()? {
            Some(self.string()?)
        } else {
            None
        })
    }

    fn opt_u32(&mut self) -> Option<Option<u32>> {
        Some(if self.flag()? {
            Some(self.u32()?)
        } else {
            None
        })
    }

    fn binding(&mut self, aor: &str) -> Option<Binding> {
        let id = self.u64()?;
        let contact = self.string()?;
        let call_id = self.string()?;
        let cseq = self.u32()?;
        let expires_at = self.u64()?;
        let registered_at = self.u64()?;
        let q = match self.opt_u32()? {
            Some(q) => Some(u16::try_from(q).ok()?),
            None => None,
        };
        let instance = self.opt_string()?;
        let reg_id = self.opt_u32()?;
        let transport = Transport::from_code(self.u8()?)?;
        let source = match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                SocketAddr::V4(SocketAddrV4::new(ip, u16::from_le_bytes(self.array()?)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let (flowinfo, scope) = (self.u32()?, self.u32()?);
                let port = u16::from_le_bytes(self.array()?);
                SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope))
            }
            _ => return None,
        };
        let user_agent = self.opt_string()?;
        let hops = self.u32()? as usize;
        let mut path = Vec::with_capacity(hops.min(16));
        for _ in 0..hops {
            path.push(self.string()?);
        }
        Some(Binding {
            id,
            aor: aor.to_string(),
            contact,
            call_id,
            cseq,
            expires_at,
            registered_at,
            q,
            instance,
            reg_id,
            transport,
            source,
            user_agent,
            conn: None,
            path,
            here: true,
            owner: None,
        })
    }
}

/// One record's payload: the AoR and its bindings.
fn get_record(payload: &[u8]) -> Option<(String, Vec<Binding>)> {
    let mut c = Cursor(payload);
    let aor = c.string()?;
    let n = c.u32()? as usize;
    let mut bindings = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        bindings.push(c.binding(&aor)?);
    }
    c.0.is_empty().then_some((aor, bindings))
}

/// How a replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Records read.
    pub records: usize,
    /// Bytes of the file up to the end of the last good record.
    pub good_len: u64,
    /// Bytes after it that were not read (a torn or damaged record and what follows).
    pub discarded: u64,
}

/// Replays the journal at `path` in order, handing each record to `each`; stops at the first
/// record that is torn or damaged (see [`Replay::discarded`]). A file that is not a journal
/// is an `InvalidData` error.
pub(crate) fn replay(
    path: &Path,
    mut each: impl FnMut(String, Vec<Binding>) -> io::Result<()>,
) -> io::Result<Replay> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(64 << 10, file);
    let mut magic = [0; 8];
    if r.read_exact(&mut magic).is_err() || &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a careflow-sip registration journal",
                path.display()
            ),
        ));
    }
    let mut good_len = MAGIC.len() as u64;
    let mut records = 0;
    let mut payload = Vec::new();
    loop {
        let mut frame = [0; FRAME];
        match read_full(&mut r, &mut frame)? {
            0 => break,
            FRAME => {}
            _ => break, // torn frame header
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len > MAX_RECORD {
            break;
        }
        payload.resize(len, 0);
        if read_full(&mut r, &mut payload)? != len || crc32fast::hash(&payload) != crc {
            break;
        }
        let Some((aor, bindings)) = get_record(&payload) else {
            break;
        };
        each(aor, bindings)?;
        records += 1;
        good_len += (FRAME + len) as u64;
    }
    Ok(Replay {
        records,
        good_len,
        discarded: file_len.saturating_sub(good_len),
    })
}

/// Reads until `buf` is full or the file ends; the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Appends to the journal; owned by the journal thread.
#[derive(Debug)]
pub(crate) struct Writer {
    file: File,
    path: PathBuf,
    len: u64,
    snapshot_len: u64,
}

/// Where a snapshot's records go.
pub(crate) type Sink<'a> = &'a mut dyn FnMut(&[u8]) -> io::Result<()>;

impl Writer {
    /// Writes a new journal holding what `fill` gives its sink (framed records of the live
    /// bindings), synced, and makes it the journal at `path`.
    pub(crate) fn rewrite(
        path: &Path,
        fill: impl FnOnce(Sink<'_>) -> io::Result<()>,
    ) -> io::Result<Self> {
        let tmp = sibling(path, ".new");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(64 << 10, file);
        w.write_all(MAGIC)?;
        fill(&mut |bytes| w.write_all(bytes))?;
        let mut file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        let len = file.stream_position()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            snapshot_len: len,
        })
    }

    /// Appends framed records. On failure (a full disk) the file is cut back to its last
    /// whole record, so that later records are not stranded behind a torn one.
    pub(crate) fn append(&mut self, records: &[u8]) -> io::Result<()> {
        match self.file.write_all(records) {
            Ok(()) => {
                self.len += records.len() as u64;
                Ok(())
            }
            Err(e) => {
                let cut = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)));
                if let Err(c) = cut {
                    tracing::error!(path = %self.path.display(), error = %c,
                        "cannot cut the registration journal back after a failed write");
                }
                Err(e)
            }
        }
    }

    /// The journal has grown enough that a snapshot would be much smaller.
    pub(crate) fn wants_rewrite(&self) -> bool {
        self.len >= REWRITE_MIN && self.len >= REWRITE_FACTOR * self.snapshot_len
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(aor: &str, n: u64) -> Binding {
        Binding {
            id: n,
            aor: aor.into(),
            contact: format!("<sip:dev{n}@192.0.2.{n}:5060;ob>"),
            call_id: format!("call-{n}"),
            cseq: 7,
            expires_at: 1_800_000_600,
            registered_at: 1_800_000_000,
            q: Some(500),
            instance: Some("<urn:uuid:00000000-0000-0000-0000-000000000001>".into()),
            reg_id: Some(1),
            transport: Transport::Wss,
            source: "[fe80::7%2]:40000".parse().unwrap(),
            user_agent: Some("Yealink SIP-T46S".into()),
            conn: Some(9),
            path: vec!["<sip:edge.example.com;lr>".into(), "<sip:b;lr>".into()],
            here: true,
            owner: None,
        }
    }

    fn plain(aor: &str) -> Binding {
        Binding {
            q: None,
            instance: None,
            reg_id: None,
            transport: Transport::Udp,
            source: "192.0.2.9:5060".parse().unwrap(),
            user_agent: None,
            conn: None,
            path: Vec::new(),
            ..binding(aor, 3)
        }
    }

    #[test]
    fn a_record_is_written_within_the_room_reserved_for_it() {
        // Every option set and an IPv6 source is the longest fixed part; the plain binding
        // the shortest.
        for b in [binding("a@x", 1), plain("a@x"), binding("a@x", 200)] {
            let mut one = Vec::new();
            put_binding(&mut one, &b);
            assert!(one.len() <= binding_len_bound(&b), "{} > bound", one.len());
            assert!(
                binding_len_bound(&b) - one.len() <= 96,
                "the bound is not loose"
            );
        }
    }

    fn write(path: &Path, records: &[u8]) -> Writer {
        let mut w = Writer::rewrite(path, |_| Ok(())).unwrap();
        w.append(records).unwrap();
        w
    }

    fn read(path: &Path) -> (Vec<(String, Vec<Binding>)>, Replay) {
        let mut got = Vec::new();
        let r = replay(path, |aor, b| {
            got.push((aor, b));
            Ok(())
        })
        .unwrap();
        (got, r)
    }

    #[test]
    fn every_kept_field_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let full = binding("anna@clinic.example", 1);
        let mut recs = Vec::new();
        put_record(
            &mut recs,
            "anna@clinic.example",
            [&full, &plain("x")].into_iter(),
        );
        put_record(&mut recs, "bob@clinic.example", std::iter::empty());
        let w = write(&path, &recs);
        assert_eq!(w.len(), (MAGIC.len() + recs.len()) as u64);
        let (got, r) = read(&path);
        assert_eq!(r.records, 2);
        assert_eq!(r.discarded, 0);
        assert_eq!(got[0].0, "anna@clinic.example");
        // The connection is this process's numbering: not kept.
        assert_eq!(got[0].1[0], Binding { conn: None, ..full });
        assert_eq!(
            got[0].1[1],
            Binding {
                aor: "anna@clinic.example".into(),
                ..plain("x")
            }
        );
        assert_eq!(got[1], ("bob@clinic.example".to_string(), Vec::new()));
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_replay_and_keeps_what_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut recs = Vec::new();
        put_record(&mut recs, "a@x", [&plain("a@x")].into_iter());
        let first = recs.len();
        put_record(&mut recs, "b@x", [&plain("b@x")].into_iter());
        // Torn: the second record only in part.
        for cut in [first + 3, first + FRAME + 5, recs.len() - 1] {
            write(&path, &recs[..cut]);
            let (got, r) = read(&path);
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(r.good_len, (MAGIC.len() + first) as u64);
            assert_eq!(r.discarded, (cut - first) as u64);
        }
        // Damaged: a flipped byte in the second record's payload fails its checksum.
        let mut bad = recs.clone();
        bad[first + FRAME + 2] ^= 0x40;
        write(&path, &bad);
        assert_eq!(read(&path).0.len(), 1);
        // A length no record has.
        let mut bad = recs.clone();
        bad[first + 3] = 0xff;
        write(&path, &bad);
        assert_eq!(read(&path).0.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("location.db");
        std::fs::write(&path, b"SQLite format 3\0 and so on").unwrap();
        let e = replay(&path, |_, _| Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains("not a careflow-sip registration journal")
        );
    }

    #[test]
    fn a_rewrite_replaces_the_journal_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut recs = Vec::new();
        for i in 0..50 {
            put_record(&mut recs, &format!("u{i}@x"), [&plain("u")].into_iter());
        }
        let mut w = write(&path, &recs);
        assert!(!w.wants_rewrite());
        let mut snap = Vec::new();
        put_record(&mut snap, "only@x", [&plain("only@x")].into_iter());
        let w2 = Writer::rewrite(&path, |sink| sink(&snap)).unwrap();
        assert!(!sibling(&path, ".new").exists());
        let (got, _) = read(&path);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "only@x");
        // The old writer's file is no longer the journal: what it appends is not replayed.
        w.append(&recs).unwrap();
        assert_eq!(read(&path).0.len(), 1);
        assert_eq!(w2.len(), (MAGIC.len() + snap.len()) as u64);
    }

    #[test]
    fn it_asks_for_a_rewrite_once_large_and_mostly_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut snap = Vec::new();
        put_record(&mut snap, "a@x", [&binding("a@x", 1)].into_iter());
        let mut w = Writer::rewrite(&path, |sink| sink(&snap)).unwrap();
        let mut refresh = Vec::new();
        put_record(&mut refresh, "a@x", [&binding("a@x", 1)].into_iter());
        while w.len() < REWRITE_MIN - refresh.len() as u64 {
            assert!(!w.wants_rewrite());
            w.append(&refresh).unwrap();
        }
        w.append(&refresh).unwrap();
        assert!(w.wants_rewrite());
    }
}
