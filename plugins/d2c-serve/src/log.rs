//! Structured logs: one JSON object per line on stderr, so that `jq` or a log shipper can read
//! them without a parser for a human format.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Writes `{"ts", "event", ...fields}` as one line. `fields` must be a JSON object.
pub fn event(name: &str, fields: Value) {
    let mut line = Map::new();
    line.insert("ts".into(), json!((unix_seconds() * 1e3).round() / 1e3));
    line.insert("event".into(), json!(name));
    if let Value::Object(fields) = fields {
        line.extend(fields);
    }
    write_line(&Value::Object(line));
}

fn write_line(value: &Value) {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    // One write per line: concurrent requests never interleave inside a line, and a closed
    // stderr must not take the server down.
    let _ = std::io::stderr().lock().write_all(&bytes);
}
