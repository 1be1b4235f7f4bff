//! The message content scanner: DATA and BDAT bytes from the client in, bytes for the
//! backend's DATA out.
//!
//! Framing lives here, apart from the session: this module does no I/O. It
//! - finds the end of DATA, which is *only* `<CRLF>.<CRLF>`;
//! - refuses a bare CR or bare LF anywhere in the content, and never forwards one: a lenient
//!   backend could read `<LF>.<LF>` or `<LF>.<CR><LF>` as the end of data and take the rest as
//!   a second, smuggled message (CVE-2023-51764 and friends);
//! - holds back the bytes that might be the terminator or a bare CR until the next byte
//!   decides, so a rejected message never reaches a backend with its end-of-data;
//! - counts `Received:` headers (loop guard), octets (size limit) and line length;
//! - dot-stuffs BDAT content, whose chunks are raw, so backends always get DATA.

/// Why a message is refused. The first violation wins; once one is found nothing more is
/// forwarded, but the scanner keeps reading to the end of DATA so the session stays in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    BareNewline,
    LineTooLong,
    TooBig,
    Loop,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: usize,
    pub max_line: usize,
    pub max_received: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// DATA: dot-stuffed input ending in `<CRLF>.<CRLF>`, forwarded as it is.
    Dot,
    /// BDAT: raw chunks, dot-stuffed on the way out.
    Raw,
}

const RECEIVED: &[u8; 9] = b"received:";

pub struct DataScanner {
    mode: Mode,
    limits: Limits,
    /// The last five bytes seen, primed with CRLF so that DATA may end at once (`.<CRLF>`).
    tail: [u8; 5],
    /// Bytes not yet forwarded (at most two: a line-start `.` and a `\r`).
    held: [u8; 2],
    n_held: usize,
    line_len: usize,
    size: usize,
    in_headers: bool,
    hdr: [u8; 9],
    hdr_len: usize,
    received: usize,
    violation: Option<Violation>,
    done: bool,
}

impl DataScanner {
    pub fn new(mode: Mode, limits: Limits) -> Self {
        Self {
            mode,
            limits,
            tail: [0, 0, 0, b'\r', b'\n'],
            held: [0; 2],
            n_held: 0,
            line_len: 0,
            size: 0,
            in_headers: true,
            hdr: [0; 9],
            hdr_len: 0,
            received: 0,
            violation: None,
            done: false,
        }
    }

    pub fn violation(&self) -> Option<Violation> {
        self.violation
    }

    /// Octets of content seen so far.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn received_headers(&self) -> usize {
        self.received
    }

    fn violate(&mut self, v: Violation) {
        if self.violation.is_none() {
            self.violation = Some(v);
        }
        self.n_held = 0;
    }

    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        if self.violation.is_some() {
            return;
        }
        // Hold at most two bytes; emit the oldest when a third arrives. A CR leaves only
        // together with its LF, so even a stream cut short never ends in a bare CR.
        if self.n_held == 2 {
            if self.held[0] == b'\r' {
                out.extend_from_slice(&self.held);
                self.held[0] = b;
                self.n_held = 1;
            } else {
                out.push(self.held[0]);
                self.held[0] = self.held[1];
                self.held[1] = b;
            }
        } else {
            self.held[self.n_held] = b;
            self.n_held += 1;
        }
    }

    /// Validation and bookkeeping common to both modes, for one content byte.
    fn check(&mut self, b: u8) {
        let prev = self.tail[4];
        self.size += 1;
        if self.size > self.limits.max_size {
            self.violate(Violation::TooBig);
        }
        if b == b'\n' && prev != b'\r' {
            self.violate(Violation::BareNewline);
        }
        if prev == b'\r' && b != b'\n' {
            self.violate(Violation::BareNewline);
        }
        if b == b'\n' {
            // A line of just CRLF ends the header section.
            if self.line_len == 1 {
                self.in_headers = false;
            }
            self.line_len = 0;
            self.hdr_len = 0;
        } else {
            self.line_len += 1;
            if self.line_len > self.limits.max_line {
                self.violate(Violation::LineTooLong);
            }
            if self.in_headers && self.hdr_len < RECEIVED.len() && self.line_len == self.hdr_len + 1
            {
                self.hdr[self.hdr_len] = b;
                self.hdr_len += 1;
                if self.hdr_len == RECEIVED.len() && self.hdr.eq_ignore_ascii_case(RECEIVED) {
                    self.received += 1;
                    if self.received > self.limits.max_received {
                        self.violate(Violation::Loop);
                    }
                }
            }
        }
        self.tail.copy_within(1.., 0);
        self.tail[4] = b;
    }

    /// DATA mode: scans `input`, appends what may be forwarded to `out`, and returns the
    /// number of input bytes that belonged to the message once `<CRLF>.<CRLF>` is seen
    /// (what follows is the client's next command, pipelined).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        debug_assert_eq!(self.mode, Mode::Dot);
        let mut i = 0;
        // `input[fwd..i]`: decided by the fast paths, copied to `out` in one go.
        let mut fwd = 0;
        while i < input.len() {
            let last = self.tail[4];
            // Nothing pending (no CR waiting for its LF, no line-start dot that may be the
            // terminator): the common cases go in bulk, the rest byte by byte below.
            if last != b'\r' && !(last == b'.' && self.tail[3] == b'\n') {
                let b = input[i];
                let plain = b != b'\r' && b != b'\n' && !(b == b'.' && last == b'\n');
                let crlf = b == b'\r' && input.get(i + 1) == Some(&b'\n');
                if plain || crlf {
                    if self.n_held > 0 {
                        // Held bytes come only from the slow path, which left `fwd == i`:
                        // they go out first, now decided.
                        if self.violation.is_none() {
                            out.extend_from_slice(&self.held[..self.n_held]);
                        }
                        self.n_held = 0;
                    }
                    if plain {
                        // Text up to the next CR or LF decides nothing about the end of data.
                        let end = memchr::memchr2(b'\r', b'\n', &input[i..])
                            .map_or(input.len(), |j| i + j);
                        self.plain_run(&input[i..end]);
                        i = end;
                    } else {
                        // A CRLF that ends a line other than "." cannot end the data.
                        self.crlf();
                        i += 2;
                    }
                    continue;
                }
            }
            if self.violation.is_none() {
                out.extend_from_slice(&input[fwd..i]);
            }
            let b = input[i];
            i += 1;
            fwd = i;
            if self.byte(b, out) {
                return Some(i);
            }
        }
        if self.violation.is_none() {
            out.extend_from_slice(&input[fwd..i]);
        }
        None
    }

    /// One byte the slow way; true when it completes the end of data.
    fn byte(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        // End of data: CRLF "." CRLF, the first CRLF possibly the primed one.
        if b == b'\n' && self.tail[1..] == *b"\r\n.\r" {
            // The held `.` and `\r` are the terminator, not content; the size counted
            // them, so take them back.
            self.size = self.size.saturating_sub(2);
            self.n_held = 0;
            self.done = true;
            return true;
        }
        self.check(b);
        self.emit(b, out);
        false
    }

    /// The reference for [`Self::feed`]: every byte through the slow path (for tests and
    /// the fuzzer, which check that the fast paths decide and forward exactly the same).
    #[doc(hidden)]
    pub fn feed_bytewise(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            if self.byte(b, out) {
                return Some(i + 1);
            }
        }
        None
    }

    /// A CRLF after ordinary text or at the start of a line (not after a line-start dot):
    /// the bookkeeping of [`Self::check`] for both bytes (the caller forwards them).
    fn crlf(&mut self) {
        // The limits in the byte path's order: the CR's size and line length, then the
        // LF's size.
        if self.size + 1 > self.limits.max_size {
            self.violate(Violation::TooBig);
        } else if self.line_len + 1 > self.limits.max_line {
            self.violate(Violation::LineTooLong);
        } else if self.size + 2 > self.limits.max_size {
            self.violate(Violation::TooBig);
        }
        self.size += 2;
        if self.line_len == 0 {
            // An empty line ends the header section.
            self.in_headers = false;
        }
        self.line_len = 0;
        self.hdr_len = 0;
        self.tail.copy_within(2.., 0);
        self.tail[3] = b'\r';
        self.tail[4] = b'\n';
    }

    /// A run of bytes without CR or LF, after ordinary text or at the start of a line (not
    /// starting with a dot there): the same bookkeeping as [`Self::check`] byte by byte,
    /// done for the whole run (the caller forwards it).
    fn plain_run(&mut self, run: &[u8]) {
        let n = run.len();
        // Where in the run each limit is first crossed; the earliest is what the byte path
        // reports (on a tie, `check`'s order: size, line length, loop).
        let mut first: Option<(usize, Violation)> = None;
        let mut note = |at: usize, v: Violation| {
            if first.is_none_or(|(k, _)| at < k) {
                first = Some((at, v));
            }
        };
        if self.size + n > self.limits.max_size {
            note(
                self.limits.max_size.saturating_sub(self.size),
                Violation::TooBig,
            );
        }
        if self.line_len + n > self.limits.max_line {
            note(
                self.limits.max_line.saturating_sub(self.line_len),
                Violation::LineTooLong,
            );
        }
        if self.in_headers && self.hdr_len < RECEIVED.len() && self.line_len == self.hdr_len {
            let k = (RECEIVED.len() - self.hdr_len).min(n);
            self.hdr[self.hdr_len..self.hdr_len + k].copy_from_slice(&run[..k]);
            self.hdr_len += k;
            if self.hdr_len == RECEIVED.len() && self.hdr.eq_ignore_ascii_case(RECEIVED) {
                self.received += 1;
                if self.received > self.limits.max_received {
                    note(k - 1, Violation::Loop);
                }
            }
        }
        if let Some((_, v)) = first {
            self.violate(v);
        }
        self.size += n;
        self.line_len += n;
        let k = n.min(5);
        self.tail.copy_within(k.., 0);
        self.tail[5 - k..].copy_from_slice(&run[n - k..]);
    }

    /// BDAT mode: scans one chunk's bytes, dot-stuffing them into `out`.
    pub fn feed_raw(&mut self, input: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(self.mode, Mode::Raw);
        for &b in input {
            let line_start = self.tail[3] == b'\r' && self.tail[4] == b'\n';
            self.check(b);
            if b == b'.' && line_start {
                self.emit(b'.', out);
            }
            self.emit(b, out);
        }
    }

    /// BDAT mode, after the LAST chunk: flushes held bytes, makes sure the content ends with
    /// CRLF (DATA needs it before the final dot), and catches a bare CR at the very end.
    pub fn finish_raw(&mut self, out: &mut Vec<u8>) {
        if self.tail[4] == b'\r' {
            self.violate(Violation::BareNewline);
        }
        self.flush(out);
        if self.violation.is_none() && self.size > 0 && self.tail[3..] != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        self.done = true;
    }

    /// Forwards the held bytes of a BDAT chunk boundary that cannot be a terminator. In DATA
    /// mode held bytes stay held: they might still turn out to be `.<CR>`.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.mode == Mode::Raw && self.violation.is_none() {
            // A trailing CR must wait for the next chunk's first byte.
            let keep = usize::from(self.n_held > 0 && self.held[self.n_held - 1] == b'\r');
            let emit = self.n_held - keep;
            out.extend_from_slice(&self.held[..emit]);
            if keep == 1 {
                self.held[0] = b'\r';
            }
            self.n_held = keep;
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_size: 1 << 20,
        max_line: 2048,
        max_received: 50,
    };

    fn scan(input: &[u8]) -> (Option<usize>, Vec<u8>, Option<Violation>) {
        let mut s = DataScanner::new(Mode::Dot, LIMITS);
        let mut out = Vec::new();
        let end = s.feed(input, &mut out);
        (end, out, s.violation())
    }

    /// The slow path for every byte: what the fast paths must agree with.
    fn scan_bytewise(input: &[u8]) -> (Option<usize>, Vec<u8>, Option<Violation>) {
        let mut s = DataScanner::new(Mode::Dot, LIMITS);
        let mut out = Vec::new();
        let end = s.feed_bytewise(input, &mut out);
        (end, out, s.violation())
    }

    /// Fed one byte at a time: the fast paths see every boundary.
    fn scan_split(input: &[u8]) -> (Option<usize>, Vec<u8>, Option<Violation>) {
        let mut s = DataScanner::new(Mode::Dot, LIMITS);
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            if s.feed(std::slice::from_ref(b), &mut out).is_some() {
                return (Some(i + 1), out, s.violation());
            }
        }
        (None, out, s.violation())
    }

    #[test]
    fn plain_message_ends_at_crlf_dot_crlf() {
        let msg = b"Subject: hi\r\n\r\nbody\r\n..stuffed\r\n.\r\nQUIT\r\n";
        for f in [scan, scan_bytewise, scan_split] {
            let (end, out, v) = f(msg);
            assert_eq!(end, Some(msg.len() - 6));
            assert_eq!(out, b"Subject: hi\r\n\r\nbody\r\n..stuffed\r\n");
            assert_eq!(v, None);
        }
    }

    #[test]
    fn fast_path_agrees_with_bytewise() {
        for hops in [10, 60] {
            let mut msg = Vec::new();
            for i in 0..hops {
                let long = "y".repeat(i * 7);
                msg.extend_from_slice(
                    format!("Received: hop {i}\r\nX-Long: {long}\r\n").as_bytes(),
                );
            }
            msg.extend_from_slice(b"\r\n.dot\r\n..two\r\nplain text\r\n.\r\nNEXT");
            let (a_end, a_out, a_v) = scan(&msg);
            let (b_end, b_out, b_v) = scan_bytewise(&msg);
            assert_eq!((a_end, a_v), (b_end, b_v), "{hops} hops");
            if a_v.is_none() {
                assert!(a_out == b_out, "outputs differ for {hops} hops");
                assert_eq!(a_out.len(), msg.len() - ".\r\nNEXT".len());
            } else {
                // Refused: how much was forwarded before the refusal may differ (it is cut
                // off either way), but neither forwarded the end of the message.
                assert!(!a_out.ends_with(b"plain text\r\n") && !b_out.ends_with(b"plain text\r\n"));
            }
        }
    }

    use proptest::prelude::*;

    proptest! {
        // Any mix of text, dots, CRs and LFs: the fast path decides exactly like the
        // byte-by-byte path, and what it forwards never holds a bare CR or LF.
        #[test]
        fn fast_path_is_exact(parts in proptest::collection::vec(
            prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\n".to_vec()),
                Just(b".".to_vec()),
                Just(b"Received: x".to_vec()),
                "[a-z ]{1,20}".prop_map(String::into_bytes),
            ], 0..60)) {
            let mut msg: Vec<u8> = parts.concat();
            msg.extend_from_slice(b"\r\n.\r\n");
            let (a_end, a_out, a_v) = scan(&msg);
            let (b_end, b_out, b_v) = scan_bytewise(&msg);
            let (c_end, c_out, c_v) = scan_split(&msg);
            prop_assert_eq!((a_end, a_v), (b_end, b_v));
            prop_assert_eq!((c_end, c_v), (b_end, b_v));
            if a_v.is_none() {
                prop_assert!(a_out == b_out);
                prop_assert!(c_out == b_out);
            }
            for (i, &c) in a_out.iter().enumerate() {
                if c == b'\n' {
                    prop_assert!(i > 0 && a_out[i - 1] == b'\r');
                }
                if c == b'\r' {
                    prop_assert!(a_out.get(i + 1) == Some(&b'\n'));
                }
            }
        }
    }

    proptest! {
        // Limits small enough to be crossed inside a run or a CRLF: the fast paths report
        // the same violation as the byte path (the one the client's reply code names).
        #[test]
        fn fast_path_is_exact_at_the_limits(parts in proptest::collection::vec(
            prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b".".to_vec()),
                Just(b"Received: x".to_vec()),
                "[a-z ]{1,20}".prop_map(String::into_bytes),
            ], 0..40), max_size in 1usize..120, max_line in 1usize..30) {
            let limits = Limits { max_size, max_line, max_received: 1 };
            let mut msg: Vec<u8> = parts.concat();
            msg.extend_from_slice(b"\r\n.\r\n");
            let mut fast = DataScanner::new(Mode::Dot, limits);
            let mut slow = DataScanner::new(Mode::Dot, limits);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            prop_assert_eq!(fast.feed(&msg, &mut a), slow.feed_bytewise(&msg, &mut b));
            prop_assert_eq!(fast.violation(), slow.violation());
        }
    }

    #[test]
    fn empty_message() {
        assert_eq!(scan(b".\r\n"), (Some(3), vec![], None));
    }

    #[test]
    fn smuggling_variants_are_refused_and_never_forwarded() {
        // Each end-of-data reading a lenient server might accept, followed by a second
        // message. Only the real terminator at the end ends DATA.
        for fake_end in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r\r\n.\r\r\n",
            b"\n",
            b"\r",
        ] {
            let mut msg = b"Subject: x\r\n\r\nhello".to_vec();
            msg.extend_from_slice(fake_end);
            msg.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nspoof\r\n.\r\n");
            for f in [scan, scan_bytewise, scan_split] {
                let (end, out, v) = f(&msg);
                assert_eq!(end, Some(msg.len()), "{fake_end:?}");
                assert_eq!(v, Some(Violation::BareNewline), "{fake_end:?}");
                assert!(
                    !out.windows(4).any(|w| w == b"MAIL"),
                    "{fake_end:?} forwarded {:?}",
                    String::from_utf8_lossy(&out)
                );
                for (i, &b) in out.iter().enumerate() {
                    if b == b'\n' {
                        assert_eq!(out[i - 1], b'\r', "bare LF forwarded for {fake_end:?}");
                    }
                    if b == b'\r' {
                        assert_eq!(
                            out.get(i + 1),
                            Some(&b'\n'),
                            "bare CR forwarded for {fake_end:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn received_headers_are_counted_in_the_header_section_only() {
        let mut msg = Vec::new();
        for _ in 0..51 {
            msg.extend_from_slice(b"Received: from a by b\r\n");
        }
        msg.extend_from_slice(b"\r\nbody\r\n.\r\n");
        let (_, _, v) = scan(&msg);
        assert_eq!(v, Some(Violation::Loop));
        let mut ok = b"RECEIVED: x\r\n\r\n".to_vec();
        for _ in 0..60 {
            ok.extend_from_slice(b"Received: in the body\r\n");
        }
        ok.extend_from_slice(b".\r\n");
        let mut s = DataScanner::new(Mode::Dot, LIMITS);
        let mut out = Vec::new();
        assert!(s.feed(&ok, &mut out).is_some());
        assert_eq!(s.received_headers(), 1);
        assert_eq!(s.violation(), None);
    }

    #[test]
    fn size_and_line_limits() {
        let small = Limits {
            max_size: 10,
            ..LIMITS
        };
        let mut s = DataScanner::new(Mode::Dot, small);
        let mut out = Vec::new();
        assert!(s.feed(b"0123456789abc\r\n.\r\n", &mut out).is_some());
        assert_eq!(s.violation(), Some(Violation::TooBig));
        let short = Limits {
            max_line: 4,
            ..LIMITS
        };
        let mut s = DataScanner::new(Mode::Dot, short);
        assert!(s.feed(b"abcd\r\nabcde\r\n.\r\n", &mut out).is_some());
        assert_eq!(s.violation(), Some(Violation::LineTooLong));
    }

    #[test]
    fn bdat_is_dot_stuffed_and_checked() {
        let mut s = DataScanner::new(Mode::Raw, LIMITS);
        let mut out = Vec::new();
        s.feed_raw(b"a\r\n.b\r", &mut out);
        s.flush(&mut out);
        s.feed_raw(b"\n.\r\nend", &mut out);
        s.finish_raw(&mut out);
        assert_eq!(s.violation(), None);
        assert_eq!(out, b"a\r\n..b\r\n..\r\nend\r\n");

        let mut s = DataScanner::new(Mode::Raw, LIMITS);
        let mut out = Vec::new();
        s.feed_raw(b"a\n.\nb", &mut out);
        s.finish_raw(&mut out);
        assert_eq!(s.violation(), Some(Violation::BareNewline));
        assert!(!out.contains(&b'\n'));

        let mut s = DataScanner::new(Mode::Raw, LIMITS);
        let mut out = Vec::new();
        s.feed_raw(b"x\r", &mut out);
        s.finish_raw(&mut out);
        assert_eq!(s.violation(), Some(Violation::BareNewline));
    }
}
