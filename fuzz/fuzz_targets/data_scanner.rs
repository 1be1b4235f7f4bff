//! The DATA/BDAT scanner: whatever the client sends, nothing forwarded holds a bare CR or
//! LF, chunking never changes the decision, and BDAT output is valid dot-stuffed DATA.
#![no_main]

use coexist::smtp::data::{DataScanner, Limits, Mode};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_size: 1 << 16,
    max_line: 200,
    max_received: 5,
};

fn no_bare_newlines(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF forwarded");
        }
        if b == b'\r' {
            assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR forwarded");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    // Half the inputs get limits small enough to be crossed inside a run or a CRLF.
    let limits = if split & 0x80 == 0 {
        LIMITS
    } else {
        Limits {
            max_size: 16 + usize::from(split & 0x3f),
            max_line: 4 + usize::from(split % 23),
            max_received: 1,
        }
    };
    // All at once.
    let mut a = DataScanner::new(Mode::Dot, limits);
    let mut out_a = Vec::new();
    let end_a = a.feed(input, &mut out_a);
    no_bare_newlines(&out_a);
    // The slow path alone, byte by byte: the reference the fast paths must match.
    let mut refr = DataScanner::new(Mode::Dot, limits);
    let mut out_ref = Vec::new();
    let end_ref = refr.feed_bytewise(input, &mut out_ref);
    assert_eq!(end_a, end_ref);
    assert_eq!(a.violation(), refr.violation());
    // Before the end, the slow path may still hold a byte or two that the fast paths have
    // already decided and forwarded; once the data has ended both have forwarded it all.
    if end_a.is_some() && a.violation().is_none() {
        assert_eq!(out_a, out_ref);
    }
    // In chunks of a size the input chooses.
    let mut b = DataScanner::new(Mode::Dot, limits);
    let mut out_b = Vec::new();
    let mut end_b = None;
    let step = usize::from(split % 7) + 1;
    let mut pos = 0;
    for chunk in input.chunks(step) {
        if let Some(n) = b.feed(chunk, &mut out_b) {
            end_b = Some(pos + n);
            break;
        }
        pos += chunk.len();
    }
    no_bare_newlines(&out_b);
    assert_eq!(end_a, end_b);
    assert_eq!(a.violation(), b.violation());
    if end_a.is_some() && a.violation().is_none() {
        assert_eq!(out_a, out_b);
    }
    // BDAT: raw in, dot-stuffed out.
    let mut r = DataScanner::new(Mode::Raw, limits);
    let mut out_r = Vec::new();
    for chunk in input.chunks(step) {
        r.feed_raw(chunk, &mut out_r);
        r.flush(&mut out_r);
    }
    r.finish_raw(&mut out_r);
    no_bare_newlines(&out_r);
    if r.violation().is_none() {
        // Re-reading the stuffed output as DATA must end exactly at our terminator.
        out_r.extend_from_slice(b".\r\n");
        let mut d = DataScanner::new(
            Mode::Dot,
            Limits {
                max_size: usize::MAX,
                max_line: usize::MAX,
                max_received: usize::MAX,
            },
        );
        let mut sink = Vec::new();
        assert_eq!(d.feed(&out_r, &mut sink), Some(out_r.len()));
    }
});
