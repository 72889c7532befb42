//! Little-endian building blocks for the store's own metadata files (checkpoint, retention
//! manifest): a writer, and a reader that never trusts a length or count it has not checked
//! against the bytes that are actually there, so a damaged file costs an error, never a panic or a
//! wild allocation.

pub struct Output(Vec<u8>);

impl Output {
    pub fn with_capacity(capacity: usize) -> Self {
        Output(Vec::with_capacity(capacity))
    }
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn str(&mut self, v: &str) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v.as_bytes());
    }
    /// The bytes written, followed by their CRC32C.
    pub fn finish(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.0);
        self.u32(crc);
        self.0
    }
}

pub struct Input<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    /// The bytes before a trailing CRC32C, if the checksum matches.
    pub fn checked(bytes: &'a [u8]) -> Option<Self> {
        let body_len = bytes.len().checked_sub(4)?;
        let crc = u32::from_le_bytes(bytes[body_len..].try_into().ok()?);
        (crc32c::crc32c(&bytes[..body_len]) == crc).then_some(Input {
            buf: &bytes[..body_len],
            pos: 0,
        })
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(out)
    }
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn str(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
    /// A count of items each at least `min_size` bytes: refused if the rest cannot hold them, so
    /// a damaged count cannot make us allocate wildly.
    pub fn count(&mut self, min_size: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n.checked_mul(min_size)? <= self.buf.len() - self.pos).then_some(n)
    }
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
}
