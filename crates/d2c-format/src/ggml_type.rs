//! ggml's tensor types as GGUF files store them: the layout of every type id (so that any
//! file's tensor directory can be checked), and encoders/decoders for the types adapters are
//! read and written in.
//!
//! The codecs follow ggml's reference (de)quantisers step by step (`quantize_row_*_ref`,
//! `dequantize_row_*`), so files are bit-for-bit what llama.cpp's own tools write; the runtime
//! crate's tests hold both against ggml itself (table, every encoder, every decoder).

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q5_0: u32 = 6;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

/// ggml's `GGML_TYPE_COUNT` in the llama.cpp this project is pinned to.
pub const TYPE_COUNT: u32 = 43;

/// Layout of one ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo {
    pub name: &'static str,
    /// Elements per block (1 for plain numbers).
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
    pub is_quantized: bool,
}

const fn t(name: &'static str, block_size: u64, type_size: u64, is_quantized: bool) -> Option<TypeInfo> {
    Some(TypeInfo { name, block_size, type_size, is_quantized })
}

/// By type id; `None` for ids ggml has removed (4, 5, 31-33, 36-38).
const TYPES: [Option<TypeInfo>; TYPE_COUNT as usize] = [
    t("f32", 1, 4, false),
    t("f16", 1, 2, false),
    t("q4_0", 32, 18, true),
    t("q4_1", 32, 20, true),
    None,
    None,
    t("q5_0", 32, 22, true),
    t("q5_1", 32, 24, true),
    t("q8_0", 32, 34, true),
    t("q8_1", 32, 36, true),
    t("q2_K", 256, 84, true),
    t("q3_K", 256, 110, true),
    t("q4_K", 256, 144, true),
    t("q5_K", 256, 176, true),
    t("q6_K", 256, 210, true),
    t("q8_K", 256, 292, true),
    t("iq2_xxs", 256, 66, true),
    t("iq2_xs", 256, 74, true),
    t("iq3_xxs", 256, 98, true),
    t("iq1_s", 256, 50, true),
    t("iq4_nl", 32, 18, true),
    t("iq3_s", 256, 110, true),
    t("iq2_s", 256, 82, true),
    t("iq4_xs", 256, 136, true),
    t("i8", 1, 1, false),
    t("i16", 1, 2, false),
    t("i32", 1, 4, false),
    t("i64", 1, 8, false),
    t("f64", 1, 8, false),
    t("iq1_m", 256, 56, true),
    t("bf16", 1, 2, false),
    None,
    None,
    None,
    t("tq1_0", 256, 54, true),
    t("tq2_0", 256, 66, true),
    None,
    None,
    None,
    t("mxfp4", 32, 17, true),
    t("nvfp4", 64, 36, true),
    t("q1_0", 128, 18, true),
    t("q2_0", 64, 18, true),
];

/// The layout of `ggml_type`, or `None` for an unknown or removed type id.
pub fn type_info(ggml_type: u32) -> Option<TypeInfo> {
    TYPES.get(ggml_type as usize).copied().flatten()
}

/// Every type id with a layout.
pub fn known_types() -> impl Iterator<Item = u32> {
    (0..TYPE_COUNT).filter(|&t| type_info(t).is_some())
}

/// The types [`decode_to_f32`] reads and [`encode_from_f32`] writes.
pub const CODEC_TYPES: [u32; 6] = [F32, F16, BF16, Q8_0, Q5_0, Q4_0];

const BLOCK: usize = 32;

fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn f16_value(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN kept a (quiet) NaN.
fn bf16_bits(v: f32) -> [u8; 2] {
    let u = v.to_bits();
    let h = if u & 0x7fff_ffff > 0x7f80_0000 { (u >> 16) | 64 } else { (u + (0x7fff + ((u >> 16) & 1))) >> 16 };
    (h as u16).to_le_bytes()
}

fn checked_len(ggml_type: u32, bytes: usize, n: usize) -> Result<TypeInfo, String> {
    let info = type_info(ggml_type).ok_or_else(|| format!("unknown ggml type {ggml_type}"))?;
    if n as u64 % info.block_size != 0 {
        return Err(format!("{n} elements are not a whole number of {} blocks", info.name));
    }
    let expect = n as u64 / info.block_size * info.type_size;
    if bytes as u64 != expect {
        return Err(format!("{bytes} bytes for {n} {} elements (expected {expect})", info.name));
    }
    Ok(info)
}

/// Decodes `n` elements of `ggml_type` from `bytes`, which must hold exactly their encoded size.
pub fn decode_to_f32(ggml_type: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let info = checked_len(ggml_type, bytes.len(), n)?;
    let mut out = Vec::with_capacity(n);
    match ggml_type {
        F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        F16 => out.extend(bytes.chunks_exact(2).map(f16_value)),
        BF16 => out.extend(bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))),
        Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_value(&b[..2]);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16_value(&b[..2]);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        Q5_0 => {
            for b in bytes.chunks_exact(22) {
                let d = f16_value(&b[..2]);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..];
                let low = qs.iter().enumerate().map(|(j, &q)| (q & 0x0f) as u32 | (((qh >> j) << 4) & 0x10));
                out.extend(low.map(|x| (x as i32 - 16) as f32 * d));
                let high = qs.iter().enumerate().map(|(j, &q)| (q >> 4) as u32 | ((qh >> (j + 12)) & 0x10));
                out.extend(high.map(|x| (x as i32 - 16) as f32 * d));
            }
        }
        _ => return Err(format!("reading {} tensors is not supported (f32, f16, bf16, q8_0, q5_0 and q4_0 are)", info.name)),
    }
    Ok(out)
}

/// The value of largest magnitude in a block (the first of them on ties), as ggml's q4_0 and
/// q5_0 quantisers choose it: its sign sets the sign of the scale.
fn signed_absmax(block: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Encodes a row-major `rows x row_len` matrix into `ggml_type`.
pub fn encode_from_f32(ggml_type: u32, data: &[f32], row_len: usize) -> Result<Vec<u8>, String> {
    let info = type_info(ggml_type).ok_or_else(|| format!("unknown ggml type {ggml_type}"))?;
    if row_len == 0 || data.len() % row_len != 0 {
        return Err(format!("{} values do not form rows of {row_len}", data.len()));
    }
    if row_len as u64 % info.block_size != 0 {
        return Err(format!("row length {row_len} is not a multiple of the {} block size {}", info.name, info.block_size));
    }
    let mut out = Vec::with_capacity((data.len() as u64 / info.block_size * info.type_size) as usize);
    match ggml_type {
        F32 => out.extend(data.iter().flat_map(|v| v.to_le_bytes())),
        F16 => out.extend(data.iter().flat_map(|&v| f16_bits(v))),
        BF16 => out.extend(data.iter().flat_map(|&v| bf16_bits(v))),
        Q8_0 => {
            for block in data.chunks_exact(BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bits(d));
                // C's roundf: halves away from zero, as f32::round.
                out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
            }
        }
        Q4_0 => {
            for block in data.chunks_exact(BLOCK) {
                let d = signed_absmax(block) / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16_bits(d));
                // `(int8_t)(x + 8.5f)`: truncation toward zero, then capped at 15.
                let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                out.extend((0..BLOCK / 2).map(|j| q(block[j]) | (q(block[j + BLOCK / 2]) << 4)));
            }
        }
        Q5_0 => {
            for block in data.chunks_exact(BLOCK) {
                let d = signed_absmax(block) / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
                let mut qh = 0u32;
                let mut qs = [0u8; BLOCK / 2];
                for j in 0..BLOCK / 2 {
                    let (lo, hi) = (q(block[j]), q(block[j + BLOCK / 2]));
                    qs[j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
                    qh |= (((lo & 0x10) >> 4) as u32) << j;
                    qh |= (((hi & 0x10) >> 4) as u32) << (j + BLOCK / 2);
                }
                out.extend(f16_bits(d));
                out.extend(qh.to_le_bytes());
                out.extend(qs);
            }
        }
        _ => return Err(format!("writing {} is not supported (use f32, f16, bf16, q8_0, q5_0 or q4_0)", info.name)),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_type_round_trips_within_one_quantisation_step() {
        let data: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        for ty in CODEC_TYPES {
            let bytes = encode_from_f32(ty, &data, 64).unwrap();
            let info = type_info(ty).unwrap();
            assert_eq!(bytes.len() as u64, 256 / info.block_size * info.type_size, "{}", info.name);
            let back = decode_to_f32(ty, &bytes, data.len()).unwrap();
            let amax = data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = match ty {
                F32 => 0.0,
                F16 => amax / 1024.0,
                BF16 => amax / 128.0,
                Q8_0 => amax / 127.0,
                Q5_0 => amax / 16.0,
                _ => amax / 8.0,
            };
            for (a, b) in data.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{}: {a} -> {b}", info.name);
            }
        }
    }

    #[test]
    fn lengths_that_are_not_whole_blocks_are_refused() {
        assert!(encode_from_f32(Q8_0, &[0.0; 48], 48).unwrap_err().contains("block size 32"));
        assert!(decode_to_f32(Q4_0, &[0u8; 17], 32).unwrap_err().contains("expected 18"));
        assert!(decode_to_f32(4, &[], 0).unwrap_err().contains("unknown"));
    }
}
