//! Parses arbitrary bytes as Redis (RESP2) replies, with the one-shot parser and with the
//! incremental scanner fed one byte more at a time; both must agree on where a reply ends.
#![no_main]

use citadel_work::resp::{self, Scanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = resp::parse(data);
    let mut scanner = Scanner::default();
    let mut scanned = None;
    for end in 0..=data.len().min(4096) {
        match scanner.scan(&data[..end]) {
            Ok(Some(n)) => {
                scanned = Some(n);
                break;
            }
            Ok(None) => {}
            Err(_) => {
                scanned = Some(usize::MAX);
                break;
            }
        }
    }
    match (&whole, scanned) {
        (Ok(Some((_, n))), Some(m)) => assert_eq!(*n, m, "parser and scanner disagree on the end"),
        (Ok(Some((_, n))), None) => assert!(*n > 4096 || data.len() > 4096),
        _ => {}
    }
    if let Ok(Some((v, n))) = whole {
        assert!(n <= data.len());
        assert_eq!(resp::parse(&data[..n]).expect("the reply alone parses").map(|(w, m)| (w, m)), Some((v, n)));
    }
});
