//! Every `unsafe` line of the runtime lives here, behind safe functions.
//!
//! What `llama-cpp-2` wraps safely (model, context, batch, adapters, logits) is used from there;
//! this module covers what it lacks: log silencing, the CPU backend's feature list and the
//! SIGPIPE disposition. Its tests hold the format crate's pure-Rust tensor codecs against
//! ggml's own type table and reference (de)quantisers.
#![allow(unsafe_code)]

use std::ffi::CStr;

use llama_cpp_sys_2 as sys;

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

#[cfg(test)]
mod tests {
    use super::sys;
    use d2c_format::ggml_type::{self, CODEC_TYPES};

    fn ggml_traits(ggml_type: u32) -> &'static sys::ggml_type_traits {
        assert!(ggml_type < sys::GGML_TYPE_COUNT);
        // SAFETY: the index is below GGML_TYPE_COUNT, so ggml returns a pointer into its
        // static type table, which lives for the whole program.
        unsafe { &*sys::ggml_get_type_traits(ggml_type as sys::ggml_type) }
    }

    fn ggml_encode(ggml_type: u32, data: &[f32], row_len: usize) -> Vec<u8> {
        let rows = data.len() / row_len;
        let info = ggml_type::type_info(ggml_type).unwrap();
        let mut out = vec![0u8; (row_len as u64 / info.block_size * info.type_size) as usize * rows];
        // SAFETY: `data` holds rows*row_len floats and `out` exactly their encoded size; these
        // types need no importance matrix and no global init.
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
        assert_eq!(written, out.len());
        out
    }

    fn ggml_decode(ggml_type: u32, bytes: &[u8], n: usize) -> Vec<f32> {
        let to_float = ggml_traits(ggml_type).to_float.expect("ggml decodes this type");
        let mut out = vec![0f32; n];
        // SAFETY: `bytes` holds exactly n elements of this type (the format crate's decoder
        // accepted that length first) and `out` has room for n floats.
        unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
        out
    }

    #[test]
    fn the_type_table_is_ggmls() {
        assert_eq!(ggml_type::TYPE_COUNT, sys::GGML_TYPE_COUNT);
        for id in 0..sys::GGML_TYPE_COUNT {
            let t = ggml_traits(id);
            let removed = t.blck_size <= 0 || t.type_size == 0 || t.type_name.is_null();
            let ours = ggml_type::type_info(id);
            if removed {
                assert_eq!(ours, None, "type {id} is removed in ggml");
                continue;
            }
            let ours = ours.unwrap_or_else(|| panic!("type {id} missing from the table"));
            // SAFETY: non-null, NUL-terminated static string from ggml's type table.
            let name = unsafe { std::ffi::CStr::from_ptr(t.type_name) }.to_str().unwrap();
            assert_eq!(
                (ours.name, ours.block_size, ours.type_size, ours.is_quantized),
                (name, t.blck_size as u64, t.type_size as u64, t.is_quantized),
                "type {id}"
            );
        }
    }

    #[test]
    fn the_codecs_are_bit_for_bit_ggmls() {
        use rand::Rng;
        let mut rng = d2c_format::synth::rng(7);
        // Random rows at several scales, plus the cases quantisers special-case: all zeros,
        // one dominant value of either sign, ties in magnitude, values on rounding halves.
        let mut rows: Vec<Vec<f32>> = (0..40).map(|i| (0..64).map(|_| (rng.random::<f32>() - 0.5) * 10f32.powi(i % 7 - 3)).collect()).collect();
        rows.push(vec![0.0; 64]);
        rows.push((0..64).map(|i| if i == 5 { -3.0 } else { 0.01 * i as f32 }).collect());
        rows.push((0..64).map(|i| if i % 2 == 0 { 2.0 } else { -2.0 }).collect());
        rows.push((0..64).map(|i| (i as f32 - 32.0) * 0.5).collect());
        rows.push((0..64).map(|i| f32::from_bits(0x3f80_0000 + (i << 12))).collect());
        let data: Vec<f32> = rows.concat();
        for ty in CODEC_TYPES {
            let ours = ggml_type::encode_from_f32(ty, &data, 64).unwrap();
            let theirs = if ty == ggml_type::F32 { data.iter().flat_map(|v| v.to_le_bytes()).collect() } else { ggml_encode(ty, &data, 64) };
            assert!(ours == theirs, "{}: encoded bytes differ from ggml's", ggml_type::type_info(ty).unwrap().name);
            let back = ggml_type::decode_to_f32(ty, &ours, data.len()).unwrap();
            // ggml has no f32 -> f32 decoder; f32 is the identity both ways.
            let theirs = if ty == ggml_type::F32 { data.clone() } else { ggml_decode(ty, &ours, data.len()) };
            assert!(
                back.iter().zip(&theirs).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: decoded values differ",
                ggml_type::type_info(ty).unwrap().name
            );
        }
    }
}
