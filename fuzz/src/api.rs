//! Control-socket input: bytes as a client sends them, cut into reads of
//! any size, framed into lines and parsed into requests, and every answer
//! the server would write for them.

use std::io::Read;
use std::os::unix::net::UnixStream;

use kvmrun::api::{self, LineReader, Request};

use crate::Input;

/// Input: one byte giving the size of each read (1 to 256), then the bytes.
pub fn lines(data: &[u8]) {
    let mut input = Input::new(data);
    let read = usize::from(input.u8()) + 1;
    let bytes = input.rest();
    let mut reader = LineReader::default();
    let mut answers = Vec::new();
    for chunk in bytes.chunks(read) {
        let Ok(lines) = reader.feed(chunk) else {
            assert!(reader.pending() + chunk.len() > api::MAX_LINE);
            answers.push(Err("too long".to_string()));
            break;
        };
        for line in lines {
            match api::parse_request(&line) {
                Ok(None) => {}
                Ok(Some(req)) => {
                    // What a client sends for a request reads back as it.
                    let text = serde_json::to_string(&req).expect("a request serializes");
                    let back: Request = serde_json::from_str(&text).expect("and parses back");
                    assert_eq!(back, req);
                    answers.push(Ok(serde_json::json!({})));
                }
                Err(e) => answers.push(Err(e)),
            }
        }
        assert!(reader.pending() <= api::MAX_LINE);
    }
    // Every answer is one line of JSON with `ok` and `state`.
    let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
    let count = answers.len();
    // The socket buffer holds a few answers; enough to check the form.
    for answer in answers.into_iter().take(8) {
        api::reply(ours.try_clone().expect("dup"), answer, false);
    }
    drop(ours);
    let mut text = String::new();
    theirs.read_to_string(&mut text).expect("the answers");
    assert_eq!(text.lines().count(), count.min(8), "{text:?}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("answer is JSON");
        assert!(v["ok"].is_boolean() && v["state"].is_string(), "{line}");
    }
}
