//! Puts the task back as `model` in llama-server's OpenAI-style answers. llama-server reports
//! its own model file there (a path on the server), while OpenAI clients expect the model they
//! asked for: here, the task. Plain JSON answers are rewritten whole; streamed ones (SSE) event
//! by event, as they pass, so streaming is not delayed.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// Bodies larger than this pass through unchanged (an answer is a few kB; this only bounds
/// the memory a strange upstream answer can take).
const MAX_BUFFERED: usize = 16 << 20;

enum Mode {
    /// `application/json`: the whole body, rewritten at its end.
    Whole,
    /// `text/event-stream`: each complete `data: {...}` event.
    Events,
    /// Gave up (too large): what is left passes through.
    PassThrough,
}

pub struct ModelRewrite {
    model: String,
    mode: Mode,
    pending: BytesMut,
}

impl ModelRewrite {
    /// For a response of `content_type`; `None` when it carries no `model` to rewrite.
    pub fn for_content_type(content_type: &str, model: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let mode = match essence {
            "application/json" => Mode::Whole,
            "text/event-stream" => Mode::Events,
            _ => return None,
        };
        Some(ModelRewrite { model: model.to_owned(), mode, pending: BytesMut::new() })
    }

    /// Takes a chunk of the upstream body; returns what can be sent on now (maybe empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if matches!(self.mode, Mode::PassThrough) {
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        if self.pending.len() > MAX_BUFFERED {
            self.mode = Mode::PassThrough;
            return self.pending.split().freeze();
        }
        match self.mode {
            Mode::Whole | Mode::PassThrough => Bytes::new(),
            Mode::Events => {
                let Some(end) = last_event_end(&self.pending) else { return Bytes::new() };
                let complete = self.pending.split_to(end);
                let mut out = BytesMut::with_capacity(complete.len() + 64);
                for event in split_events(&complete) {
                    out.extend_from_slice(&self.rewrite_event(event));
                }
                out.freeze()
            }
        }
    }

    /// The upstream body ended: whatever is left, rewritten where it can be.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        match self.mode {
            Mode::Whole => self.rewrite_json(&rest).map(Bytes::from).unwrap_or_else(|| rest.freeze()),
            Mode::Events => Bytes::from(self.rewrite_event(&rest)),
            Mode::PassThrough => rest.freeze(),
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn rewrite_json(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut value: Value = serde_json::from_slice(body).ok()?;
        let slot = value.as_object_mut()?.get_mut("model")?;
        *slot = Value::String(self.model.clone());
        serde_json::to_vec(&value).ok()
    }

    /// One event, delimiter included; anything but a JSON `data:` line with a `model` is kept.
    fn rewrite_event(&self, event: &[u8]) -> Vec<u8> {
        let Some(payload) = event.strip_prefix(b"data: ") else { return event.to_vec() };
        let body_len = payload.iter().rposition(|&b| b != b'\n' && b != b'\r').map_or(0, |i| i + 1);
        let (body, delimiter) = payload.split_at(body_len);
        match self.rewrite_json(body) {
            Some(json) => [b"data: ".as_slice(), &json, delimiter].concat(),
            None => event.to_vec(),
        }
    }
}

/// The end of the last complete event (after its blank line) in `buf`.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2)
}

/// Events of `buf` (which ends with a complete one), each with its delimiter.
fn split_events(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest.windows(2).position(|w| w == b"\n\n").map_or(rest.len(), |i| i + 2);
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_answer_names_the_task() {
        let mut r = ModelRewrite::for_content_type("application/json; charset=utf-8", "translate").unwrap();
        let body = br#"{"model":"/models/base.gguf","choices":[{"text":"hi"}]}"#;
        assert!(r.push(&body[..10]).is_empty(), "nothing is sent before the JSON is whole");
        assert!(r.push(&body[10..]).is_empty());
        let out: Value = serde_json::from_slice(&r.finish()).unwrap();
        assert_eq!(out["model"], "translate");
        assert_eq!(out["choices"][0]["text"], "hi");
        let mut error = ModelRewrite::for_content_type("application/json", "translate").unwrap();
        error.push(br#"{"error":{"code":500}}"#);
        assert_eq!(&error.finish()[..], br#"{"error":{"code":500}}"#, "no model, no change");
        assert!(ModelRewrite::for_content_type("text/plain", "t").is_none());
    }

    #[test]
    fn streamed_events_are_rewritten_as_they_complete_whatever_the_chunking() {
        let stream = b"data: {\"model\":\"/m.gguf\",\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"model\":\"/m.gguf\",\"choices\":[{\"text\":\"b\"}]}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        let expected = "data: {\"choices\":[{\"text\":\"a\"}],\"model\":\"t\"}\n\ndata: {\"choices\":[{\"text\":\"b\"}],\"model\":\"t\"}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        for chunk in [1, 3, 7, 40, stream.len()] {
            let mut r = ModelRewrite::for_content_type("text/event-stream", "t").unwrap();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                out.extend_from_slice(&r.push(piece));
            }
            assert!(!r.has_pending(), "chunk {chunk}: a complete stream leaves nothing behind");
            out.extend_from_slice(&r.finish());
            // serde_json orders keys: compare events as JSON where they are JSON.
            let normalise = |s: &str| -> Vec<Value> {
                s.split("\n\n")
                    .map(|e| e.strip_prefix("data: ").and_then(|d| serde_json::from_str(d).ok()).unwrap_or(Value::String(e.into())))
                    .collect()
            };
            assert_eq!(normalise(std::str::from_utf8(&out).unwrap()), normalise(expected), "chunk size {chunk}");
        }
        // The first event goes out as soon as it is complete.
        let mut r = ModelRewrite::for_content_type("text/event-stream", "t").unwrap();
        assert!(!r.push(&stream[..stream.len() / 2]).is_empty());
    }
}
