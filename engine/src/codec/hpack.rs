//! HPACK header compression (RFC 7541) for the server side of a connection:
//! a decoder for the header blocks clients send, and a small encoder for the
//! response header blocks the engine prepares once, at plan load.
//!
//! The [`Decoder`] faces arbitrary clients. It never panics on its input; it
//! bounds every integer (at most five continuation bytes and a value that
//! fits in 32 bits), every string (its length must fit in the block) and the
//! dynamic table (the size we advertise); its work is linear in the block.
//! Fields reach the caller as borrowed slices (of the block, of the
//! decoder's scratch buffers for Huffman-decoded strings, or of the tables),
//! so a block that names a large table entry many times costs no copying.
//! The header list size limit (RFC 9113 §6.5.2) is applied while decoding:
//! past it, fields are no longer handed over but the block is still decoded
//! to its end, so the dynamic table stays in step with the client's.
//!
//! Header names and values are not checked here (lowercase names, pseudo
//! headers, forbidden characters): that is HTTP/2's business, not HPACK's.
//!
//! The encoder side keeps no state: [`encode_literal`] and [`encode_status`]
//! write representations that never touch the client's dynamic table, so a
//! prepared block can be sent on any connection.

use super::huffman;
use std::collections::VecDeque;
use std::fmt;

/// HPACK decoding failed: a COMPRESSION_ERROR connection error (RFC 9113 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HPACK decoding error: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// The static table (RFC 7541 Appendix A); index `i` is `STATIC[i - 1]`.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// What an entry costs in the dynamic table beyond its name and value
/// (RFC 7541 §4.1); also what a field costs in the header list size
/// (RFC 9113 §6.5.2).
const ENTRY_OVERHEAD: usize = 32;

/// Scratch buffers that grew past this (a block with a huge Huffman-encoded
/// string) are shrunk back to it after the block, so that one large request
/// does not keep memory for the connection's lifetime.
const SCRATCH_KEEP: usize = 8 * 1024;

/// The entry at `index` (1-based) of the static table.
fn static_entry(index: usize) -> Option<(&'static [u8], &'static [u8])> {
    index.checked_sub(1).and_then(|i| STATIC.get(i)).copied()
}

/// The dynamic table (RFC 7541 §2.3.2, §4).
///
/// The names and values of all entries live in one byte buffer, oldest entry
/// first, each name directly followed by its value; `entries` holds, newest
/// first, where each one starts. Eviction drops the oldest entry's record
/// and leaves its bytes dead at the front of the buffer; an insertion that
/// would take the buffer past twice the table's maximum size first moves the
/// live bytes to the front. So an insertion allocates nothing once the
/// buffer has grown (it never needs more than about twice
/// SETTINGS_HEADER_TABLE_SIZE), every entry is one contiguous slice, and the
/// bytes moved by compaction are bounded by the bytes inserted since the
/// previous one.
#[derive(Debug, Clone, Default)]
struct Table {
    bytes: Vec<u8>,
    entries: VecDeque<Entry>,
    /// The table size in RFC terms: sum of name + value + 32 over entries.
    size: usize,
    /// The current maximum size, as last set by a size update.
    max_size: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    start: usize,
    name_len: usize,
    value_len: usize,
}

impl Entry {
    fn size(&self) -> usize {
        self.name_len + self.value_len + ENTRY_OVERHEAD
    }
}

impl Table {
    /// The field at `index` of the combined index space: the static table
    /// (1 to 61), then the dynamic table, newest entry first.
    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), DecodeError> {
        if index == 0 {
            return Err(DecodeError("header field index 0"));
        }
        if let Some(entry) = static_entry(index) {
            return Ok(entry);
        }
        let e = self.entries.get(index - STATIC.len() - 1).ok_or(DecodeError("header field index out of range"))?;
        let name_end = e.start + e.name_len;
        Ok((&self.bytes[e.start..name_end], &self.bytes[name_end..name_end + e.value_len]))
    }

    fn evict_oldest(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.size -= e.size();
        }
        if self.entries.is_empty() {
            self.bytes.clear();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes.clear();
        self.size = 0;
    }

    /// A dynamic table size update (RFC 7541 §4.3, §6.3): the caller has
    /// checked `max_size` against the advertised limit.
    fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        while self.size > self.max_size {
            self.evict_oldest();
        }
    }

    /// Adds an entry (RFC 7541 §4.4): evicts the oldest entries until it
    /// fits; an entry larger than the whole table empties it and is not
    /// added. `name` and `value` must not borrow from the table.
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let len = name.len() + value.len();
        let size = len + ENTRY_OVERHEAD;
        if size > self.max_size {
            self.clear();
            return;
        }
        while self.size + size > self.max_size {
            self.evict_oldest();
        }
        if self.bytes.len() + len > self.max_size.saturating_mul(2) {
            // Compaction: the live bytes, fewer than max_size - len, move to
            // the front.
            let head = self.entries.back().map_or(self.bytes.len(), |e| e.start);
            self.bytes.drain(..head);
            for e in &mut self.entries {
                e.start -= head;
            }
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        self.bytes.extend_from_slice(value);
        self.entries.push_front(Entry { start, name_len: name.len(), value_len: value.len() });
        self.size += size;
    }
}

/// The header list size as fields are decoded, against its limit.
struct ListSize {
    size: usize,
    max: usize,
    oversized: bool,
}

impl ListSize {
    /// Counts a field and hands it over while the list is within its limit.
    fn push(&mut self, field: &mut dyn FnMut(&[u8], &[u8]), name: &[u8], value: &[u8]) {
        if self.oversized {
            return;
        }
        self.size = self.size.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
        if self.size > self.max {
            self.oversized = true;
        } else {
            field(name, value);
        }
    }
}

/// Decodes the header blocks of one connection's client (one decoder per
/// connection: the dynamic table is the connection's HPACK state).
#[derive(Debug, Clone)]
pub struct Decoder {
    table: Table,
    /// The SETTINGS_HEADER_TABLE_SIZE we advertise: no size update may
    /// exceed it.
    max_table_size: usize,
    /// Huffman-decoded names and values of the field being decoded (and the
    /// copy of a dynamic table name about to be re-inserted).
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl Decoder {
    /// `max_table_size`: the SETTINGS_HEADER_TABLE_SIZE we advertise (4096); a dynamic table size update above it is an error.
    pub fn new(max_table_size: usize) -> Decoder {
        Decoder {
            table: Table { max_size: max_table_size, ..Table::default() },
            max_table_size,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// Decodes one complete header block (HEADERS + CONTINUATION fragments already joined).
    /// Calls `field(name, value)` for each field in order, while the decoded header list size
    /// (sum of name.len()+value.len()+32, RFC 9113 §6.5.2) stays ≤ `max_list_size`; after that it
    /// stops calling `field` but still decodes the rest of the block, so the dynamic table stays in
    /// sync, and returns Ok(true) ("oversized"). Ok(false) otherwise.
    ///
    /// An error leaves the decoder out of step with the client: the
    /// connection must end (COMPRESSION_ERROR).
    pub fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
        field: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<bool, DecodeError> {
        let mut list = ListSize { size: 0, max: max_list_size, oversized: false };
        let mut pos = 0;
        let mut fields_seen = false;
        while let Some(&first) = block.get(pos) {
            if first & 0x80 != 0 {
                // Indexed header field (§6.1).
                let index = decode_int(block, &mut pos, 7)?;
                let (name, value) = self.table.get(index)?;
                list.push(field, name, value);
            } else if first & 0x40 != 0 {
                // Literal header field with incremental indexing (§6.2.1).
                self.literal(block, &mut pos, 6, true, &mut list, field)?;
            } else if first & 0x20 != 0 {
                // Dynamic table size update (§6.3), only before the first
                // field (§4.2).
                if fields_seen {
                    return Err(DecodeError("dynamic table size update after a header field"));
                }
                let max_size = decode_int(block, &mut pos, 5)?;
                if max_size > self.max_table_size {
                    return Err(DecodeError("dynamic table size update above SETTINGS_HEADER_TABLE_SIZE"));
                }
                self.table.set_max_size(max_size);
                continue;
            } else {
                // Literal header field without indexing (§6.2.2) or never
                // indexed (§6.2.3): the same to a decoder.
                self.literal(block, &mut pos, 4, false, &mut list, field)?;
            }
            fields_seen = true;
        }
        for buf in [&mut self.name_buf, &mut self.value_buf] {
            if buf.capacity() > SCRATCH_KEEP {
                buf.clear();
                buf.shrink_to(SCRATCH_KEEP);
            }
        }
        Ok(list.oversized)
    }

    /// Current dynamic table size in RFC octets (for tests/metrics).
    pub fn table_size(&self) -> usize {
        self.table.size
    }

    /// A literal field whose first byte is at `block[*pos]`, with a name
    /// index of `prefix` bits; `index`: it is added to the dynamic table.
    fn literal(
        &mut self,
        block: &[u8],
        pos: &mut usize,
        prefix: u8,
        index: bool,
        list: &mut ListSize,
        field: &mut dyn FnMut(&[u8], &[u8]),
    ) -> Result<(), DecodeError> {
        let name_index = decode_int(block, pos, prefix)?;
        let Decoder { table, name_buf, value_buf, .. } = self;
        if index {
            let name = if name_index == 0 {
                decode_string(block, pos, name_buf)?
            } else if let Some((name, _)) = static_entry(name_index) {
                name
            } else {
                // The insertion may evict the entry this name comes from
                // (RFC 7541 §4.4): keep a copy.
                let (name, _) = table.get(name_index)?;
                name_buf.clear();
                name_buf.extend_from_slice(name);
                &name_buf[..]
            };
            let value = decode_string(block, pos, value_buf)?;
            list.push(field, name, value);
            table.insert(name, value);
        } else {
            let name = if name_index == 0 { decode_string(block, pos, name_buf)? } else { table.get(name_index)?.0 };
            let value = decode_string(block, pos, value_buf)?;
            list.push(field, name, value);
        }
        Ok(())
    }
}

/// Decodes an integer with a `prefix`-bit prefix (RFC 7541 §5.1) whose first
/// byte is at `block[*pos]` (present), and moves `pos` past it. Accepts at
/// most five continuation bytes and values that fit in 32 bits: more than
/// any table index, size or string length a block can carry.
fn decode_int(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, DecodeError> {
    let max_prefix = (1u8 << prefix) - 1;
    let first = block.get(*pos).ok_or(DecodeError("truncated integer"))? & max_prefix;
    *pos += 1;
    if first < max_prefix {
        return Ok(usize::from(first));
    }
    let mut value = u64::from(first);
    let mut shift = 0;
    loop {
        let &byte = block.get(*pos).ok_or(DecodeError("truncated integer"))?;
        *pos += 1;
        value += u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return Err(DecodeError("integer with too many continuation bytes"));
        }
    }
    u32::try_from(value).ok().and_then(|v| usize::try_from(v).ok()).ok_or(DecodeError("integer too large"))
}

/// Decodes a string literal (RFC 7541 §5.2) at `block[*pos]` and moves `pos`
/// past it: a raw string is borrowed from the block, a Huffman-encoded one
/// is decoded into `scratch`.
fn decode_string<'a>(block: &'a [u8], pos: &mut usize, scratch: &'a mut Vec<u8>) -> Result<&'a [u8], DecodeError> {
    let huffman = block.get(*pos).ok_or(DecodeError("truncated string literal"))? & 0x80 != 0;
    let len = decode_int(block, pos, 7)?;
    let bytes = block.get(*pos..).and_then(|rest| rest.get(..len)).ok_or(DecodeError("truncated string literal"))?;
    *pos += len;
    if huffman {
        scratch.clear();
        huffman::decode(bytes, scratch)?;
        Ok(scratch)
    } else {
        Ok(bytes)
    }
}

/// Appends an integer with a `prefix`-bit prefix (RFC 7541 §5.1); `flags`
/// holds the first byte's bits above the prefix.
fn encode_int(buf: &mut Vec<u8>, flags: u8, prefix: u8, value: usize) {
    let max_prefix = (1u8 << prefix) - 1;
    if value < usize::from(max_prefix) {
        buf.push(flags | value as u8);
        return;
    }
    buf.push(flags | max_prefix);
    let mut rest = value - usize::from(max_prefix);
    while rest >= 0x80 {
        buf.push(rest as u8 | 0x80);
        rest >>= 7;
    }
    buf.push(rest as u8);
}

/// Appends a raw (not Huffman-encoded) string literal (RFC 7541 §5.2).
fn encode_raw_string(buf: &mut Vec<u8>, s: &[u8]) {
    encode_int(buf, 0, 7, s.len());
    buf.extend_from_slice(s);
}

/// Appends a "literal header field without indexing" (RFC 7541 §6.2.2), using the static table's
/// name index when the name is in the static table, raw (non-Huffman) strings. Used to pre-encode
/// response header blocks once at plan load, so no dynamic table state on the encoder side.
pub fn encode_literal(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    match STATIC.iter().position(|&(n, _)| n == name) {
        Some(i) => encode_int(buf, 0, 4, i + 1),
        None => {
            buf.push(0);
            encode_raw_string(buf, name);
        }
    }
    encode_raw_string(buf, value);
}

/// Appends `:status` for an HTTP status: a static-table indexed field when there is one (200, 204, 206, 304, 400, 404, 500), else a literal without indexing with name index 8.
pub fn encode_status(buf: &mut Vec<u8>, status: u16) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if index != 0 {
        buf.push(0x80 | index);
        return;
    }
    buf.push(8);
    let mut digits = [0u8; 5];
    let mut start = digits.len();
    let mut n = status;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    encode_raw_string(buf, &digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits.chunks(2).map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap()).collect()
    }

    /// Decodes a block with a limit; the fields handed over and the verdict.
    fn decode_with(d: &mut Decoder, block: &[u8], max_list_size: usize) -> Result<(Fields, bool), DecodeError> {
        let mut fields = Vec::new();
        let oversized = d.decode(block, max_list_size, &mut |n, v| fields.push((n.to_vec(), v.to_vec())))?;
        Ok((fields, oversized))
    }

    /// Decodes a block that must fit any limit.
    fn decode(d: &mut Decoder, block: &[u8]) -> Result<Fields, DecodeError> {
        let (fields, oversized) = decode_with(d, block, usize::MAX)?;
        assert!(!oversized);
        Ok(fields)
    }

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    /// The dynamic table, newest entry first, read through the index space.
    fn dynamic(d: &Decoder) -> Fields {
        (0..d.table.entries.len())
            .map(|i| {
                let (n, v) = d.table.get(STATIC.len() + 1 + i).unwrap();
                (n.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// Header pairs as text.
    type Pairs<'a> = &'a [(&'a str, &'a str)];

    /// Decodes each block with one decoder; checks the header lists, the
    /// dynamic table and its size after each.
    fn run(d: &mut Decoder, steps: &[(&str, Pairs<'_>, Pairs<'_>, usize)]) {
        for (i, (block, list, table, size)) in steps.iter().enumerate() {
            assert_eq!(decode(d, &hex(block)).unwrap(), fields(list), "block {i}");
            assert_eq!(dynamic(d), fields(table), "table after block {i}");
            assert_eq!(d.table_size(), *size, "table size after block {i}");
        }
    }

    #[test]
    fn rfc_c2_single_fields() {
        // C.2.1: literal with indexing, new name.
        let mut d = Decoder::new(4096);
        let c = [("custom-key", "custom-header")];
        run(&mut d, &[("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572", &c, &c, 55)]);
        // C.2.2: literal without indexing, indexed name.
        let mut d = Decoder::new(4096);
        run(&mut d, &[("040c 2f73 616d 706c 652f 7061 7468", &[(":path", "/sample/path")], &[], 0)]);
        // C.2.3: literal never indexed, new name.
        let mut d = Decoder::new(4096);
        run(&mut d, &[("1008 7061 7373 776f 7264 0673 6563 7265 74", &[("password", "secret")], &[], 0)]);
        // C.2.4: indexed field.
        let mut d = Decoder::new(4096);
        run(&mut d, &[("82", &[(":method", "GET")], &[], 0)]);
    }

    const REQ1: [(&str, &str); 4] =
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")];
    const REQ2: [(&str, &str); 5] = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const REQ3: [(&str, &str); 5] = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const REQ_TABLE1: [(&str, &str); 1] = [(":authority", "www.example.com")];
    const REQ_TABLE2: [(&str, &str); 2] = [("cache-control", "no-cache"), (":authority", "www.example.com")];
    const REQ_TABLE3: [(&str, &str); 3] =
        [("custom-key", "custom-value"), ("cache-control", "no-cache"), (":authority", "www.example.com")];

    #[test]
    fn rfc_c3_requests() {
        let mut d = Decoder::new(4096);
        run(
            &mut d,
            &[
                ("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d", &REQ1, &REQ_TABLE1, 57),
                ("8286 84be 5808 6e6f 2d63 6163 6865", &REQ2, &REQ_TABLE2, 110),
                ("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65", &REQ3, &REQ_TABLE3, 164),
            ],
        );
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        run(
            &mut d,
            &[
                ("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff", &REQ1, &REQ_TABLE1, 57),
                ("8286 84be 5886 a8eb 1064 9cbf", &REQ2, &REQ_TABLE2, 110),
                ("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf", &REQ3, &REQ_TABLE3, 164),
            ],
        );
    }

    const DATE1: &str = "Mon, 21 Oct 2013 20:13:21 GMT";
    const DATE2: &str = "Mon, 21 Oct 2013 20:13:22 GMT";
    const LOCATION: &str = "https://www.example.com";
    const COOKIE: &str = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";

    /// C.5 and C.6: the same three responses and tables, with a 256-octet
    /// table, so that entries are evicted.
    fn responses(blocks: [&str; 3]) {
        let mut d = Decoder::new(256);
        let resp1 = [(":status", "302"), ("cache-control", "private"), ("date", DATE1), ("location", LOCATION)];
        let table1 = [("location", LOCATION), ("date", DATE1), ("cache-control", "private"), (":status", "302")];
        let resp2 = [(":status", "307"), ("cache-control", "private"), ("date", DATE1), ("location", LOCATION)];
        let table2 = [(":status", "307"), ("location", LOCATION), ("date", DATE1), ("cache-control", "private")];
        let resp3 = [
            (":status", "200"),
            ("cache-control", "private"),
            ("date", DATE2),
            ("location", LOCATION),
            ("content-encoding", "gzip"),
            ("set-cookie", COOKIE),
        ];
        let table3 = [("set-cookie", COOKIE), ("content-encoding", "gzip"), ("date", DATE2)];
        run(
            &mut d,
            &[(blocks[0], &resp1, &table1, 222), (blocks[1], &resp2, &table2, 222), (blocks[2], &resp3, &table3, 215)],
        );
    }

    #[test]
    fn rfc_c5_responses() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
             3d31",
        ]);
    }

    #[test]
    fn rfc_c6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 \
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab \
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f \
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    fn error(d: &mut Decoder, block: &[u8]) -> &'static str {
        decode(d, block).expect_err("the block must be rejected").0
    }

    fn int(flags: u8, prefix: u8, value: usize) -> Vec<u8> {
        let mut b = Vec::new();
        encode_int(&mut b, flags, prefix, value);
        b
    }

    #[test]
    fn index_errors() {
        let mut d = Decoder::new(4096);
        assert_eq!(error(&mut d, &[0x80]), "header field index 0");
        assert_eq!(error(&mut Decoder::new(4096), &[0xbe]), "header field index out of range");
        assert_eq!(error(&mut Decoder::new(4096), &int(0x80, 7, 1000)), "header field index out of range");
        // A literal whose name index is out of range, with and without indexing.
        assert_eq!(error(&mut Decoder::new(4096), &[0x7e, 0x00]), "header field index out of range");
        assert_eq!(error(&mut Decoder::new(4096), &[0x0f, 0x2f, 0x00]), "header field index out of range");
        // One entry: 62 is in range, 63 is not.
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")).unwrap();
        assert_eq!(decode(&mut d, &[0xbe]).unwrap(), fields(&[("custom-key", "custom-header")]));
        assert_eq!(error(&mut d, &[0xbf]), "header field index out of range");
    }

    #[test]
    fn size_updates() {
        let mut d = Decoder::new(4096);
        assert_eq!(error(&mut d, &int(0x20, 5, 4097)), "dynamic table size update above SETTINGS_HEADER_TABLE_SIZE");
        let mut d = Decoder::new(4096);
        assert_eq!(error(&mut d, &[0x82, 0x20]), "dynamic table size update after a header field");
        // Several at the start are fine; the last one rules.
        let mut d = Decoder::new(4096);
        decode(&mut d, &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d")).unwrap();
        assert_eq!(d.table_size(), 57);
        let mut block = int(0x20, 5, 0);
        block.extend(int(0x20, 5, 4096));
        block.push(0x82);
        assert_eq!(decode(&mut d, &block).unwrap(), fields(&[(":method", "GET")]));
        assert_eq!(d.table_size(), 0, "the update to 0 emptied the table");
        // A smaller table evicts the oldest entries; an entry larger than the
        // table empties it and is not added.
        decode(&mut d, &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d")).unwrap();
        decode(&mut d, &hex("8286 84be 5808 6e6f 2d63 6163 6865")).unwrap();
        assert_eq!(d.table_size(), 110);
        let mut block = int(0x20, 5, 60);
        block.push(0x82);
        decode(&mut d, &block).unwrap();
        assert_eq!(dynamic(&d), fields(&[("cache-control", "no-cache")]));
        // An entry larger than the table empties it and is not added (but
        // is handed over all the same).
        let mut d = Decoder::new(60);
        decode(&mut d, &hex("5808 6e6f 2d63 6163 6865")).unwrap();
        assert_eq!(d.table_size(), 53);
        // :authority: www.example.com, 57 octets, evicts cache-control.
        decode(&mut d, &hex("410f 7777 772e 6578 616d 706c 652e 636f 6d")).unwrap();
        assert_eq!(dynamic(&d), fields(&[(":authority", "www.example.com")]));
        // 10 + 19 + 32 = 61 octets.
        let mut big = vec![0x41, 0x13];
        big.extend_from_slice(b"www.example.com:443");
        assert_eq!(decode(&mut d, &big).unwrap(), fields(&[(":authority", "www.example.com:443")]));
        assert_eq!((d.table_size(), dynamic(&d)), (0, Vec::new()));
    }

    #[test]
    fn integer_errors() {
        // 0xff: index 127 and more to come.
        assert_eq!(error(&mut Decoder::new(4096), &[0xff]), "truncated integer");
        assert_eq!(error(&mut Decoder::new(4096), &[0xff, 0x80]), "truncated integer");
        assert_eq!(error(&mut Decoder::new(4096), &[0x3f, 0xe1]), "truncated integer");
        assert_eq!(error(&mut Decoder::new(4096), &[0xff, 0xff, 0xff, 0xff, 0xff, 0x1f]), "integer too large");
        assert_eq!(
            error(&mut Decoder::new(4096), &[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]),
            "integer with too many continuation bytes"
        );
        // The largest accepted value, as a string length: fits, but not in
        // the block.
        assert_eq!(
            error(&mut Decoder::new(4096), &[0x00, 0x7f, 0x80, 0xff, 0xff, 0xff, 0x0f]),
            "truncated string literal"
        );
        // Encoding and decoding agree around every prefix boundary.
        for prefix in 4..=7 {
            let max_prefix = (1usize << prefix) - 1;
            for value in [0, 1, max_prefix - 1, max_prefix, max_prefix + 1, max_prefix + 127, max_prefix + 128, 1 << 20]
                .into_iter()
                .chain([u32::MAX as usize])
            {
                let b = int(0, prefix, value);
                let mut pos = 0;
                assert_eq!(decode_int(&b, &mut pos, prefix), Ok(value), "prefix {prefix}, value {value}");
                assert_eq!(pos, b.len());
            }
        }
        let b = int(0, 5, u32::MAX as usize + 1);
        assert_eq!(decode_int(&b, &mut 0, 5), Err(DecodeError("integer too large")));
    }

    #[test]
    fn string_errors() {
        // A new name of 5 bytes with 1 present; a name missing; a value
        // missing; a Huffman value cut short.
        assert_eq!(error(&mut Decoder::new(4096), b"\x00\x05a"), "truncated string literal");
        assert_eq!(error(&mut Decoder::new(4096), &[0x40]), "truncated string literal");
        assert_eq!(error(&mut Decoder::new(4096), &[0x01]), "truncated string literal");
        assert_eq!(error(&mut Decoder::new(4096), &[0x01, 0x83, 0xff]), "truncated string literal");
        // Huffman: EOS; padding with a zero; padding of eight bits.
        let eos = [0x01, 0x84, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(error(&mut Decoder::new(4096), &eos), "EOS in a Huffman-encoded string");
        assert_eq!(error(&mut Decoder::new(4096), &[0x41, 0x81, 0x06]), "Huffman padding not all ones");
        assert_eq!(error(&mut Decoder::new(4096), &[0x01, 0x82, 0x07, 0xff]), "Huffman padding longer than 7 bits");
        // The same errors in a name.
        assert_eq!(error(&mut Decoder::new(4096), &[0x40, 0x81, 0xff, 0x00]), "Huffman padding longer than 7 bits");
        // An empty Huffman string is valid.
        assert_eq!(decode(&mut Decoder::new(4096), &[0x01, 0x80]).unwrap(), fields(&[(":authority", "")]));
    }

    #[test]
    fn oversized_list_keeps_the_table_in_step() {
        let mut d = Decoder::new(4096);
        // :method GET (42), custom-key: custom-header (55, indexed), then
        // that entry again (55), then a literal without indexing (:path
        // /sample/path, 49), then www.example.com with indexing, Huffman.
        let block = hex("82 400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572 be \
             040c 2f73 616d 706c 652f 7061 7468 418c f1e3 c2e5 f23a 6ba0 ab90 f4ff");
        let all = fields(&[
            (":method", "GET"),
            ("custom-key", "custom-header"),
            ("custom-key", "custom-header"),
            (":path", "/sample/path"),
            (":authority", "www.example.com"),
        ]);
        let table = fields(&[(":authority", "www.example.com"), ("custom-key", "custom-header")]);
        let sizes = [42, 97, 152, 201, 258];
        for (limit, handed) in [(0, 0), (41, 0), (42, 1), (96, 1), (97, 2), (152, 3), (257, 4), (258, 5)] {
            let mut d = Decoder::new(4096);
            let (got, oversized) = decode_with(&mut d, &block, limit).unwrap();
            assert_eq!(got, all[..handed], "limit {limit}");
            assert_eq!(oversized, handed < all.len(), "limit {limit}");
            assert!(handed == all.len() || sizes[handed] > limit);
            assert_eq!(dynamic(&d), table, "limit {limit}");
            assert_eq!(d.table_size(), 112);
            // The next block sees the same table whatever the limit was.
            assert_eq!(decode(&mut d, &[0xbe, 0xbf]).unwrap(), [all[4].clone(), all[1].clone()]);
        }
        assert_eq!(decode(&mut d, &block).unwrap(), all);
    }

    /// A literal with indexing may name the entry its insertion evicts.
    #[test]
    fn name_of_an_evicted_entry() {
        // One 90-octet entry fills a 100-octet table.
        let mut d = Decoder::new(100);
        let name = "x-".repeat(20);
        let mut block = vec![0x40, 40];
        block.extend_from_slice(name.as_bytes());
        block.extend_from_slice(&[18]);
        block.extend_from_slice(b"value-one-is-here!");
        decode(&mut d, &block).unwrap();
        assert_eq!(d.table_size(), 90);
        // Name index 62 (0x7e), new value: the old entry goes, its name stays.
        let block = [&[0x7e, 5][..], b"other"].concat();
        assert_eq!(decode(&mut d, &block).unwrap(), fields(&[(&name, "other")]));
        assert_eq!(dynamic(&d), fields(&[(&name, "other")]));
        assert_eq!(d.table_size(), 77);
        // The same without indexing borrows the table and changes nothing.
        let block = [&[0x0f, 0x2f, 3][..], b"abc"].concat();
        assert_eq!(decode(&mut d, &block).unwrap(), fields(&[(&name, "abc")]));
        assert_eq!(d.table_size(), 77);
    }

    /// Random insertions and size updates, against a table kept the obvious
    /// way (a list of owned pairs).
    #[test]
    fn dynamic_table_against_a_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as usize
        };
        for max in [0, 40, 100, 256, 4096] {
            let mut d = Decoder::new(max);
            let mut model: VecDeque<(Vec<u8>, Vec<u8>)> = VecDeque::new();
            let mut model_max = max;
            for i in 0..2000 {
                let mut block = Vec::new();
                if next(20) == 0 {
                    model_max = next(max as u64 + 1);
                    encode_int(&mut block, 0x20, 5, model_max);
                    while model.iter().map(|(n, v)| n.len() + v.len() + 32).sum::<usize>() > model_max {
                        model.pop_back();
                    }
                }
                let name: Vec<u8> = (0..next(30)).map(|_| b'a' + next(26) as u8).collect();
                let value: Vec<u8> = (0..next(if i % 7 == 0 { 300 } else { 40 })).map(|_| next(256) as u8).collect();
                let reuse = !model.is_empty() && next(3) == 0;
                let name = if reuse {
                    let at = next(model.len() as u64);
                    encode_int(&mut block, 0x40, 6, STATIC.len() + 1 + at);
                    model[at].0.clone()
                } else {
                    block.push(0x40);
                    encode_raw_string(&mut block, &name);
                    name
                };
                encode_raw_string(&mut block, &value);
                assert_eq!(decode(&mut d, &block).unwrap(), [(name.clone(), value.clone())]);
                let size = name.len() + value.len() + 32;
                if size > model_max {
                    model.clear();
                } else {
                    while model.iter().map(|(n, v)| n.len() + v.len() + 32).sum::<usize>() + size > model_max {
                        model.pop_back();
                    }
                    model.push_front((name, value));
                }
                assert_eq!(dynamic(&d), Vec::from(model.clone()), "max {max}, step {i}");
                assert_eq!(d.table_size(), model.iter().map(|(n, v)| n.len() + v.len() + 32).sum::<usize>());
                assert!(d.table.bytes.len() <= 2 * max, "the byte buffer stays within twice the table");
            }
        }
    }

    /// A block naming one large entry thousands of times: handed over as
    /// borrowed slices of the table, and the list limit cuts it short.
    #[test]
    fn many_references_to_one_entry() {
        let mut d = Decoder::new(4096);
        let value = vec![b'v'; 4000];
        let mut block = vec![0x40, 1, b'x'];
        encode_raw_string(&mut block, &value);
        block.extend(std::iter::repeat_n(0xbe, 10_000));
        let mut count = 0;
        let mut same = true;
        let oversized = d
            .decode(&block, 1 << 20, &mut |n, v| {
                count += 1;
                same &= n == b"x" && v == value.as_slice();
            })
            .unwrap();
        assert!(oversized && same);
        assert_eq!(count, (1 << 20) / (1 + 4000 + 32));
    }

    #[test]
    fn encoded_fields_decode_back() {
        let long = "l".repeat(300);
        let cases = [
            ("content-type", "application/grpc"),
            (":status", "200"),
            ("www-authenticate", ""),
            ("grpc-status", "0"),
            ("x-custom", ""),
            ("", ""),
            ("x-long", long.as_str()),
            (long.as_str(), "x"),
            ("x-126", &long[..126]),
            ("x-127", &long[..127]),
            ("x-128", &long[..128]),
        ];
        let mut block = Vec::new();
        for (n, v) in cases {
            encode_literal(&mut block, n.as_bytes(), v.as_bytes());
        }
        let mut d = Decoder::new(4096);
        assert_eq!(decode(&mut d, &block).unwrap(), fields(&cases));
        assert_eq!(d.table_size(), 0);
        // Static names are indexed: content-type is 31 (0x0f 0x10).
        let mut b = Vec::new();
        encode_literal(&mut b, b"content-type", b"application/grpc");
        assert_eq!(b[..3], [0x0f, 0x10, 16]);
        let mut b = Vec::new();
        encode_literal(&mut b, b":authority", b"a");
        assert_eq!(b, [0x01, 1, b'a']);

        for status in (0..1000).chain([1000, 9999, 65535]) {
            let mut b = Vec::new();
            encode_status(&mut b, status);
            let s = status.to_string();
            assert_eq!(decode(&mut d, &b).unwrap(), fields(&[(":status", &s)]), "status {status}");
            assert_eq!(b.len() == 1, [200, 204, 206, 304, 400, 404, 500].contains(&status), "status {status}");
        }
        assert_eq!(d.table_size(), 0);
    }

    #[test]
    fn huffman_fields_decode_back() {
        let mut d = Decoder::new(4096);
        let values: Vec<Vec<u8>> = vec![b"".to_vec(), b"grpc-go/1.60.0".to_vec(), (0..=255).collect()];
        for v in values {
            let mut block = vec![0x40];
            let mut name = Vec::new();
            huffman::encode(b"x-bin", &mut name);
            encode_int(&mut block, 0x80, 7, name.len());
            block.extend(name);
            let mut value = Vec::new();
            huffman::encode(&v, &mut value);
            encode_int(&mut block, 0x80, 7, value.len());
            block.extend(value);
            assert_eq!(decode(&mut d, &block).unwrap(), [(b"x-bin".to_vec(), v.clone())]);
            assert_eq!(decode(&mut d, &[0xbe]).unwrap(), [(b"x-bin".to_vec(), v)]);
        }
    }
}
