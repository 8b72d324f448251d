//! Seeded random adapters shaped for a real base model: the raw material of tests, benchmarks
//! and the demo when no trained adapters are at hand. Reproducible across platforms (ChaCha8).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{LoraAdapter, LoraTarget};
use crate::base::BaseModel;
use crate::error::{Error, Result};

/// The projections PEFT users target, by their llama.cpp names.
pub const ATTENTION: [&str; 4] = ["attn_q", "attn_k", "attn_v", "attn_output"];
pub const MLP: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Approximately standard normal values (sum of uniforms; exact Gaussianity does not matter
/// for test data, reproducibility and speed do).
pub fn normal(rng: &mut impl Rng) -> f32 {
    let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
    (s - 2.0) * 1.732_050_8
}

/// A random `rows x cols` matrix with entries of standard deviation `std`.
pub fn matrix(rng: &mut impl Rng, rows: usize, cols: usize, std: f32) -> Vec<f32> {
    (0..rows * cols).map(|_| normal(rng) * std).collect()
}

/// A random rank-`rank` adapter on `modules` of every layer of `base`, with delta entries of
/// roughly `delta_std` standard deviation.
pub fn random_adapter(base: &BaseModel, modules: &[&str], rank: usize, alpha: f32, delta_std: f32, seed: u64) -> Result<LoraAdapter> {
    let n_layer = base.hparam("block_count").ok_or_else(|| Error::invalid(&base.path, format!("{}.block_count", base.architecture), "missing"))?;
    let mut rng = rng(seed);
    let mut adapter = LoraAdapter::new(base.architecture.clone(), alpha);
    for layer in 0..n_layer {
        for m in modules {
            let name = format!("blk.{layer}.{m}.weight");
            let dims = base.tensor_dims(&name).ok_or_else(|| Error::invalid(&base.path, &name, "the base model has no such tensor"))?;
            let (n_in, n_out) = (dims[0] as usize, dims[1] as usize);
            // With A ~ N(0, sa^2), B ~ N(0, sb^2): entries of scale * B A have std
            // scale * sa * sb * sqrt(r); pick sa = 1/sqrt(in) and solve for sb.
            let sa = 1.0 / (n_in as f32).sqrt();
            let scale = adapter.scale_for_rank(rank);
            let sb = delta_std / (scale * sa * (rank as f32).sqrt());
            let a = matrix(&mut rng, rank, n_in, sa);
            let b = matrix(&mut rng, n_out, rank, sb);
            adapter.targets.insert(name, LoraTarget::new(a, b, rank, n_in, n_out));
        }
    }
    Ok(adapter)
}
