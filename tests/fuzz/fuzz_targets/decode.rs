//! Fuzz target: arbitrary bytes through the decoder and the transaction
//! assembler. Anything may come back as an error; nothing may panic.
//!
//! Run with `cargo +nightly fuzz run --fuzz-dir tests/fuzz decode`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walgraph::decode::decode_message;
use walgraph::transactions::Assembler;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = decode_message(&bytes, false);
    let _ = decode_message(&bytes, true);
    // The first byte splits the rest into a sequence of messages, so the
    // assembler sees streams, relations and changes in any order.
    let Some((&n, rest)) = data.split_first() else { return };
    let parts = usize::from(n % 8) + 1;
    let chunk = rest.len() / parts + 1;
    let mut assembler = Assembler::new();
    for part in rest.chunks(chunk) {
        let _ = assembler.push_raw(&Bytes::copy_from_slice(part));
    }
});
