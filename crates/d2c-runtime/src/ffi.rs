//! Every `unsafe` line of the runtime lives here, behind safe functions.
//!
//! What `llama-cpp-2` wraps safely (model, context, batch, adapters, logits) is used from there;
//! this module covers what it lacks: log silencing, the CPU backend's feature list, the
//! SIGPIPE disposition, and a context with a graph eval callback ([`InputCapture`]: the inputs
//! of the base model's projections, the mechanism llama-imatrix uses; llama-cpp-2 0.1.160 has
//! no setter for `cb_eval` and hides its model pointer, so this one owns its model). Its tests hold the format crate's pure-Rust tensor codecs against
//! ggml's own type table and reference (de)quantisers.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::ffi::{c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;

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

/// The rows one projection received: `rows` x `n_in`, row-major, in the order captured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectionInputs {
    pub n_in: usize,
    pub rows: usize,
    pub data: Vec<f32>,
}

/// What the eval callback reads and writes. It lives in a `Box` whose raw pointer the context
/// holds; Rust touches it only between decodes, the callback only during one.
struct CaptureState {
    /// Base weight names (`blk.3.attn_q.weight`) whose matmul inputs are kept.
    wanted: HashSet<String>,
    /// Tokens of the batch being decoded, and which of their positions to keep.
    n_tokens: usize,
    keep: Vec<usize>,
    out: BTreeMap<String, ProjectionInputs>,
    error: Option<String>,
}

impl CaptureState {
    /// The weight a node multiplies by, when it is a matmul by one of the wanted weights.
    ///
    /// # Safety
    /// `t` is a live node of the graph being computed (ggml hands the callback only those).
    unsafe fn wanted_weight(&self, t: &sys::ggml_tensor) -> Option<String> {
        if t.op != sys::GGML_OP_MUL_MAT || t.src[0].is_null() || t.src[1].is_null() {
            return None;
        }
        // SAFETY: src[0] is non-null and a tensor of the same graph; ggml names are
        // NUL-terminated within their 64 bytes.
        let name = unsafe { CStr::from_ptr((*t.src[0]).name.as_ptr()) }.to_str().ok()?;
        self.wanted.contains(name).then(|| name.to_string())
    }

    /// Appends the kept rows of `x` (the matmul's input, just computed) under `weight`.
    ///
    /// # Safety
    /// `x` is the computed input of the node the callback was just given.
    unsafe fn keep_rows(&mut self, weight: String, x: &sys::ggml_tensor) -> Result<(), String> {
        let (n_in, n_rows) = (x.ne[0] as usize, x.ne[1] as usize);
        if x.type_ != sys::GGML_TYPE_F32 || x.nb[0] != 4 || x.ne[2] != 1 || x.ne[3] != 1 {
            return Err(format!("the input of {weight} is not a plain f32 matrix"));
        }
        if n_rows != self.n_tokens {
            return Err(format!("the input of {weight} has {n_rows} rows for a batch of {} tokens", self.n_tokens));
        }
        if x.data.is_null() || n_rows == 0 {
            return Err(format!("the input of {weight} has no data"));
        }
        let row_stride = x.nb[1];
        let n_bytes = (n_rows - 1) * row_stride + n_in * 4;
        let mut copied = Vec::new();
        // SAFETY: a host buffer's data pointer addresses the tensor's bytes; otherwise ggml
        // copies them out of the device into `copied`, sized to hold them.
        let bytes: &[u8] = unsafe {
            if x.buffer.is_null() || sys::ggml_backend_buffer_is_host(x.buffer) {
                std::slice::from_raw_parts(x.data.cast::<u8>(), n_bytes)
            } else {
                copied.resize(n_bytes, 0u8);
                sys::ggml_backend_tensor_get(x, copied.as_mut_ptr().cast(), 0, n_bytes);
                &copied
            }
        };
        let entry = self.out.entry(weight).or_insert_with(|| ProjectionInputs { n_in, ..Default::default() });
        if entry.n_in != n_in {
            return Err(format!("the input width changed from {} to {n_in}", entry.n_in));
        }
        for &p in &self.keep {
            let row = &bytes[p * row_stride..p * row_stride + n_in * 4];
            entry.data.extend(row.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])));
            entry.rows += 1;
        }
        Ok(())
    }
}

/// ggml's scheduler asks (`ask`) whether a node is wanted, then calls again once it is computed;
/// returning false from the second call stops the graph. Panics never cross into C.
unsafe extern "C" fn capture_projection_inputs(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: user_data is the CaptureState the context was created with, and no Rust
        // reference to it exists while llama_decode runs; t is a live graph node.
        let (state, t) = unsafe { (&mut *user_data.cast::<CaptureState>(), &*t) };
        // SAFETY: as above.
        let Some(weight) = (unsafe { state.wanted_weight(t) }) else {
            return !ask;
        };
        if ask {
            return true;
        }
        // SAFETY: t was just computed, so its input src[1] holds its values.
        match unsafe { state.keep_rows(weight, &*t.src[1]) } {
            Ok(()) => true,
            Err(e) => {
                state.error = Some(e);
                false
            }
        }
    }))
    .unwrap_or(false)
}

/// A base model in a context whose eval callback keeps the inputs of chosen projections (the
/// `x` of `W x` for weights such as `blk.0.attn_q.weight`) at chosen positions. Owns its model
/// and context, freed on drop. One sequence per decode, every position an output, so the last
/// layer's projections see every position too (llama.cpp drops non-output rows there).
pub struct InputCapture {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    state: NonNull<CaptureState>,
    n_ctx: usize,
}

impl InputCapture {
    /// Loads `path` with llama.cpp's default model parameters into a context of `n_ctx` tokens.
    /// The backend must be initialised (`llama::backend()`).
    pub fn new(path: &Path, n_ctx: u32, threads: i32, wanted: HashSet<String>) -> Result<Self, String> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "path holds a NUL byte".to_string())?;
        let state = NonNull::from(Box::leak(Box::new(CaptureState { wanted, n_tokens: 0, keep: Vec::new(), out: BTreeMap::new(), error: None })));
        // SAFETY: a NUL-terminated path and default parameters; null means failure.
        let model = NonNull::new(unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), sys::llama_model_default_params()) });
        let Some(model) = model else {
            // SAFETY: the state was leaked above and nothing else points to it yet.
            drop(unsafe { Box::from_raw(state.as_ptr()) });
            return Err("llama.cpp could not load the model".into());
        };
        // SAFETY: default parameters with the callback and its state set; the state outlives
        // the context (both are freed in drop, the context first).
        let ctx = unsafe {
            let mut params = sys::llama_context_default_params();
            params.n_ctx = n_ctx;
            params.n_batch = n_ctx;
            params.n_ubatch = n_ctx;
            params.n_seq_max = 1;
            params.n_threads = threads;
            params.n_threads_batch = threads;
            params.no_perf = true;
            params.cb_eval = Some(capture_projection_inputs);
            params.cb_eval_user_data = state.as_ptr().cast();
            NonNull::new(sys::llama_init_from_model(model.as_ptr(), params))
        };
        let Some(ctx) = ctx else {
            // SAFETY: the model was loaded above and nothing uses it; the state is unshared.
            unsafe {
                sys::llama_model_free(model.as_ptr());
                drop(Box::from_raw(state.as_ptr()));
            }
            return Err("llama.cpp could not create a context".into());
        };
        Ok(InputCapture { model, ctx, state, n_ctx: n_ctx as usize })
    }

    /// Decodes `tokens` as one fresh sequence and appends, for every wanted projection, its
    /// input rows at the positions in `keep` (in that order).
    pub fn run(&mut self, tokens: &[i32], keep: &[usize]) -> Result<(), String> {
        let n = tokens.len();
        if n == 0 || n > self.n_ctx {
            return Err(format!("{n} tokens for a context of {}", self.n_ctx));
        }
        if let Some(&p) = keep.iter().find(|&&p| p >= n) {
            return Err(format!("position {p} is past the {n} tokens"));
        }
        {
            // SAFETY: no decode is running, so this is the only reference to the state.
            let state = unsafe { self.state.as_mut() };
            state.n_tokens = n;
            state.keep = keep.to_vec();
            state.error = None;
        }
        // SAFETY: the context is live; a batch of n tokens for one sequence is allocated,
        // filled within its n slots, decoded and freed. The callback is the only user of the
        // state during llama_decode.
        let rc = unsafe {
            sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true);
            let batch = sys::llama_batch_init(n as i32, 0, 1);
            for (i, &tok) in tokens.iter().enumerate() {
                *batch.token.add(i) = tok;
                *batch.pos.add(i) = i as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = 0;
                *batch.logits.add(i) = 1;
            }
            let mut batch = batch;
            batch.n_tokens = n as i32;
            let rc = sys::llama_decode(self.ctx.as_ptr(), batch);
            sys::llama_batch_free(batch);
            rc
        };
        // SAFETY: the decode has returned; no other reference exists.
        let state = unsafe { self.state.as_mut() };
        if let Some(e) = state.error.take() {
            return Err(e);
        }
        if rc != 0 {
            return Err(format!("llama_decode returned {rc}"));
        }
        Ok(())
    }

    /// Everything captured since the last take, by weight name.
    pub fn take(&mut self) -> BTreeMap<String, ProjectionInputs> {
        // SAFETY: no decode is running, so this is the only reference to the state.
        std::mem::take(&mut unsafe { self.state.as_mut() }.out)
    }
}

impl Drop for InputCapture {
    fn drop(&mut self) {
        // SAFETY: the context, then its model, then the state the callback used, each freed
        // once; nothing refers to them afterwards.
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
            drop(Box::from_raw(self.state.as_ptr()));
        }
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
