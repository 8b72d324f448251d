//! Progress bars on stderr for the long steps (hidden when a caller asks for quiet output).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `msg`, or a hidden one when `enabled` is false.
pub fn bar(enabled: bool, len: u64, msg: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}").expect("valid template").progress_chars("=> "));
    pb.set_message(msg.to_string());
    pb
}
