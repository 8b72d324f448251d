//! Read-only memory maps, the format layer's only `unsafe`.
#![allow(unsafe_code)]

use std::fs::File;

use memmap2::Mmap;

/// Maps a file read-only. The caller treats the bytes as untrusted input.
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only; if another process truncates the file while it is mapped
    // the process may fault, which is the accepted trade-off of every mmap-based model loader
    // (llama.cpp included). Nothing here writes through the map.
    unsafe { Mmap::map(file) }
}
