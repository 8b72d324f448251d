//! Every `unsafe` line of the crate lives here, behind safe functions and RAII types.
//!
//! What `llama-cpp-2` wraps safely (model, context, batch, adapters, logits) is used from there;
//! this module covers what it lacks: ggml's type table and its reference (de)quantisers, so that
//! what we write is bit-for-bit what llama.cpp itself would produce, and memory maps.

use std::ffi::CStr;
use std::fs::File;

use llama_cpp_sys_2 as sys;
use memmap2::Mmap;

pub const GGML_TYPE_F32: u32 = sys::GGML_TYPE_F32 as u32;
pub const GGML_TYPE_F16: u32 = sys::GGML_TYPE_F16 as u32;
pub const GGML_TYPE_BF16: u32 = sys::GGML_TYPE_BF16 as u32;
pub const GGML_TYPE_Q8_0: u32 = sys::GGML_TYPE_Q8_0 as u32;
pub const GGML_TYPE_Q5_0: u32 = sys::GGML_TYPE_Q5_0 as u32;
pub const GGML_TYPE_Q4_0: u32 = sys::GGML_TYPE_Q4_0 as u32;

/// Layout of one ggml tensor type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub name: String,
    /// Elements per block (1 for plain floats).
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
    pub is_quantized: bool,
}

fn traits(ggml_type: u32) -> Option<&'static sys::ggml_type_traits> {
    if ggml_type >= sys::GGML_TYPE_COUNT as u32 {
        return None;
    }
    // SAFETY: the index is below GGML_TYPE_COUNT, so ggml returns a pointer into its static
    // type table, which lives for the whole program.
    let t = unsafe { &*sys::ggml_get_type_traits(ggml_type as sys::ggml_type) };
    // Removed types keep a slot in the table with a zero block size.
    if t.blck_size <= 0 || t.type_size == 0 || t.type_name.is_null() {
        return None;
    }
    Some(t)
}

/// ggml's layout of `ggml_type`, or `None` for an unknown or removed type id.
pub fn ggml_type_info(ggml_type: u32) -> Option<TypeInfo> {
    let t = traits(ggml_type)?;
    // SAFETY: non-null, NUL-terminated static string from ggml's type table.
    let name = unsafe { CStr::from_ptr(t.type_name) }.to_string_lossy().into_owned();
    Some(TypeInfo { name, block_size: t.blck_size as u64, type_size: t.type_size as u64, is_quantized: t.is_quantized })
}

/// Decodes `n` elements of `ggml_type` from `bytes` with ggml's reference dequantiser.
/// `bytes` must hold exactly the encoded size of `n` elements.
pub fn decode_to_f32(ggml_type: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let info = ggml_type_info(ggml_type).ok_or_else(|| format!("unknown ggml type {ggml_type}"))?;
    if n as u64 % info.block_size != 0 {
        return Err(format!("{n} elements are not a whole number of {} blocks", info.name));
    }
    let expect = n as u64 / info.block_size * info.type_size;
    if bytes.len() as u64 != expect {
        return Err(format!("{} bytes for {n} {} elements (expected {expect})", bytes.len(), info.name));
    }
    if ggml_type == GGML_TYPE_F32 {
        return Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
    }
    let to_float = traits(ggml_type).and_then(|t| t.to_float).ok_or_else(|| format!("ggml cannot decode {} to f32", info.name))?;
    let mut out = vec![0f32; n];
    // SAFETY: `bytes` holds exactly n/block blocks of this type (checked above) and `out` has
    // room for n floats; the reference dequantisers read and write exactly those ranges.
    unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    Ok(out)
}

/// Encodes a row-major `rows x row_len` matrix into `ggml_type` with ggml's own quantiser
/// (F16/BF16 rounding included), so files match what llama.cpp tools write.
pub fn encode_from_f32(ggml_type: u32, data: &[f32], row_len: usize) -> Result<Vec<u8>, String> {
    let info = ggml_type_info(ggml_type).ok_or_else(|| format!("unknown ggml type {ggml_type}"))?;
    if row_len == 0 || data.len() % row_len != 0 {
        return Err(format!("{} values do not form rows of {row_len}", data.len()));
    }
    if row_len as u64 % info.block_size != 0 {
        return Err(format!("row length {row_len} is not a multiple of the {} block size {}", info.name, info.block_size));
    }
    if ggml_type == GGML_TYPE_F32 {
        return Ok(data.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    if !matches!(ggml_type, GGML_TYPE_F16 | GGML_TYPE_BF16 | GGML_TYPE_Q8_0 | GGML_TYPE_Q5_0 | GGML_TYPE_Q4_0) {
        return Err(format!("writing {} is not supported (use f32, f16, bf16, q8_0, q5_0 or q4_0)", info.name));
    }
    let rows = data.len() / row_len;
    let size = (row_len as u64 / info.block_size * info.type_size) as usize * rows;
    let mut out = vec![0u8; size];
    // SAFETY: `data` holds rows*row_len floats, `out` holds exactly the encoded size of that
    // many elements; these types need no importance matrix and no global init.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ggml_type as sys::ggml_type,
            data.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            rows as i64,
            row_len as i64,
            std::ptr::null(),
        )
    };
    if written != size {
        return Err(format!("ggml wrote {written} bytes, expected {size}"));
    }
    Ok(out)
}

/// Maps a file read-only. The caller treats the bytes as untrusted input.
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only; if another process truncates the file while it is mapped
    // the process may fault, which is the accepted trade-off of every mmap-based model loader
    // (llama.cpp included). Nothing here writes through the map.
    unsafe { Mmap::map(file) }
}

/// Make a closed stdout end the process the way it ends `cat` or `grep`.
///
/// Rust ignores SIGPIPE, so `d2c-gguf inspect ... | head` would otherwise panic in `println!`
/// once `head` exits. Called once, first thing in `main`, before any thread exists.
#[cfg(unix)]
pub fn die_quietly_on_closed_stdout() {
    // SAFETY: setting a signal disposition to SIG_DFL installs no handler code; it is done before
    // the program starts any thread.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
pub fn die_quietly_on_closed_stdout() {}

extern "C" fn discard_log(_level: sys::ggml_log_level, _text: *const std::os::raw::c_char, _user_data: *mut std::ffi::c_void) {}

/// Sends llama.cpp's and ggml's log lines nowhere. Needed before the CPU variant modules are
/// loaded (each load logs a line), which happens before `LlamaBackend` exists to do it.
pub fn silence_llama_logs() {
    // SAFETY: registers a callback that ignores its arguments and a null user pointer that is
    // never dereferenced; the callback is a plain function that lives for the whole program.
    unsafe { sys::llama_log_set(Some(discard_log), std::ptr::null_mut()) }
}

/// The features ggml's CPU backend was compiled with (`("AVX2", "1")`, `("SVE_CNT", "32")`,
/// ...): with run-time CPU variants, those of the variant loaded, not of this binary's build.
/// Empty when no CPU backend is registered yet.
pub fn cpu_backend_features() -> Vec<(String, String)> {
    // SAFETY: ggml_backend_reg_by_name and get_proc_address take a NUL-terminated name and
    // return null or a registry / function owned by ggml for the program's lifetime. The
    // function, when present, has ggml's documented `ggml_backend_get_features_t` signature and
    // returns an array terminated by an entry with a null name, whose strings are static.
    unsafe {
        let reg = sys::ggml_backend_reg_by_name(c"CPU".as_ptr());
        if reg.is_null() {
            return Vec::new();
        }
        let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_get_features".as_ptr());
        if f.is_null() {
            return Vec::new();
        }
        let get: unsafe extern "C" fn(sys::ggml_backend_reg_t) -> *mut sys::ggml_backend_feature = std::mem::transmute(f);
        let mut out = Vec::new();
        let mut p = get(reg);
        while !p.is_null() && !(*p).name.is_null() {
            let text = |s: *const std::os::raw::c_char| if s.is_null() { String::new() } else { CStr::from_ptr(s).to_string_lossy().into_owned() };
            out.push((text((*p).name), text((*p).value)));
            p = p.add(1);
        }
        out
    }
}
